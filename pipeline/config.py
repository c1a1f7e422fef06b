"""Typed configuration: YAML (safe-loaded) + dotted overrides, validated into dataclasses.

Every key a user may set is a field below, with its default (its one home) and a one-line why. The
typed builder (:func:`pipeline.schema.build`) rejects unknown keys and wrong types,
:func:`pipeline.config_checks.validate` out-of-range values; both raise
:class:`~pipeline.schema.ConfigError`, whose message names the key and what is allowed; the CLI prints
it as one line and exits 2 before anything is written to any store.
Configs are frozen: a changed copy is ``dataclasses.replace`` (or :func:`with_values`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.schema import (
    build,
    deep_merge,
    flatten,
    parse_overrides,
    read_yaml,
    set_dotted,
)

TASKS = ("adding", "copy", "temporal_order", "digits")
INITS = ("default", "gaussian", "orthogonal", "identity")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
CLIP_MODES = ("none", "norm", "value")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
SKIP_SIGNALS = ("both", "grad_norm", "loss")

# Upper bounds of integer keys (README "Configuration reference"). Sizes (batch, val_size, probe_size,
# seq_len, hidden_size) are bounded by the memory estimate of the machine that runs (pipeline.training.budget).
SEED_MAX = 2**64 - 3  # torch.Generator.manual_seed takes an unsigned 64-bit seed; seed + 2 seeds the probe
ULP_SEED_MAX = 2**64 - 1  # model.init_ulp_seed seeds its own generator
STEPS_MAX = (
    2**63 - 1
)  # the training stream's len() is a C ssize_t (OverflowError beyond); Lightning counts in int64
THREADS_MAX = 1024  # more intra-op threads than any machine's cores only oversubscribes them
# digits (README, "Tasks"): scikit-learn's bundled 8x8 images, read pixel by pixel, so T is fixed; the
# held-out split (task.val_size images) holds at least one image per class (it is stratified) and at most
# half of the 1,797 images, so most are left to train on. The tests check the dataset against these numbers.
DIGITS_IMAGES = 1797
DIGITS_SEQ_LEN = 64
DIGITS_VAL_SIZE = (10, DIGITS_IMAGES // 2)  # (low, high) of task.val_size for digits


@dataclass(frozen=True)
class TaskConfig:
    name: str = "adding"  # adding | copy | temporal_order | digits (README, "Tasks")
    seq_len: int = 50  # T: sequence length (copy: T blanks between symbols and recall, total T+20)
    batch_size: int = 50  # training batch size; batches are generated on the device each step
    val_size: int = 500  # size of the fixed validation set (seed + 1); digits: of the fixed held-out split
    # digits only: one fixed pixel permutation, the same for every run (the psMNIST protocol of Le, Jaitly
    # & Hinton 2015 at 8x8), so nearby pixels are no longer nearby steps and memory must span the sequence
    permute: bool = False


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "tanh"  # tanh | relu | lstm | gru | orthogonal (expRNN) | indrnn (IndRNN) | lru | mingru | lem | cornn
    hidden_size: int = 64  # H
    init: str = "default"  # recurrent-weight init: default | gaussian | orthogonal | identity
    init_scale: float = 1.0  # g: gaussian N(0, g^2/H); orthogonal g*Q; identity g*I (IRNN)
    forget_bias: float = 1.0  # LSTM forget-gate bias (b_ih + b_hh of the f gate); Gers 2000, Jozefowicz 2015
    init_ulp_seed: int = 0  # > 0: nudge every initial weight by one float32 ulp, signs drawn from this seed
    # lru only: the ring init of Orvieto et al. 2023 (section 3.3): |lambda|^2 uniform on [r_min^2, r_max^2],
    # phases uniform on [0, max_phase]; the defaults are the paper's.
    r_min: float = 0.9  # smallest initial |lambda| (in [0, r_max])
    r_max: float = 0.999  # largest initial |lambda| (< 1: |lambda| = 1 is nu_log = -inf, no gradient)
    max_phase: float = math.pi / 10  # largest initial phase of lambda, radians (in (0, 2 pi])
    # lem only: the time step dt of Rusch, Erichson, Mahoney 2022 (eq. 3), in (0, 1]: each unit's learned
    # step is dt * sigmoid(...), so 1 - dt bounds how much of z and y a step keeps at least. 1 is the
    # authors' default; their adding runs use 0.0242 (steps near 0.012: a slow, long memory).
    dt: float = 1.0
    # cornn only (Rusch & Mishra 2021, eq. 3): the oscillator's stiffness gamma and damping epsilon (>= 0);
    # 1 and 1 are the authors' cell defaults (their tasks tune them, e.g. 2.7 and 4.7 for psMNIST). cornn
    # reads model.dt too; the authors use small steps (0.01-0.05).
    gamma: float = 1.0
    epsilon: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"  # sgd | adam | rmsprop
    lr: float = 1e-3  # learning rate (> 0)
    momentum: float = 0.0  # sgd / rmsprop momentum in [0, 1)
    weight_decay: float = 0.0  # L2 penalty (>= 0)


@dataclass(frozen=True)
class ClipConfig:
    mode: str = "none"  # none | norm (Pascanu 2013 Alg. 1, global norm) | value (element-wise clamp)
    threshold: float = 1.0  # c: the norm (mode=norm) or absolute value (mode=value) to clip at


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    accelerator: str = "auto"  # auto | cpu | gpu
    val_every: int = 100  # validate every N steps (and at the end)
    log_every: int = 10  # send step metrics to MLflow every N steps (computed every step on device)
    threads: int = 1  # intra-op threads per process on CPU (1 is 3-30x faster for small RNNs)
    progress_bar: bool = False  # Lightning's per-step bar (off: sweeps show their own progress)


@dataclass(frozen=True)
class DiagnosticsConfig:
    profile_every: int = 100  # BPTT profile + spectra every N steps (0: only at start and end)
    probe_size: int = 32  # fixed probe batch for the profile (seed + 2)
    horizon_decades: float = 3.0  # gradient horizon: steps back until ||dL/dh_t|| < 10^-d ||dL/dh_T||
    # Verdict thresholds in decades per step (bptt/log10_ratio_per_step), so they mean the same at any T:
    # -0.03 = 3 decades lost per 100 steps (README, "Regime verdict").
    vanish_log10_per_step: float = -0.03  # vanishing if every gradient path decays faster than this
    explode_log10_per_step: float = 0.03  # exploding if any gradient path grows faster than this ...
    explode_norm: float = 1000.0  # ... or if the max pre-clip gradient norm over training exceeds this
    plots: bool = True  # write plots/bptt_profile.png and plots/grad_norms.png
    reference_check: bool = (
        False  # also compute the profile by an independent recursion: bptt/reference_max_err
    )


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "rnn-gradients"  # MLflow experiment name
    run_name: str | None = None  # None: <task>-T<T>-<cell>-<init>-g<g>-lr<lr>-s<seed>-<HHMMSS>-<4 hex>
    enabled: bool = True  # false: train without recording (tests, benchmarks)
    # true: MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU where present) logs
    # system/* metrics every 10 s (README, "The MLflow record"); needs the `system-metrics` extra (psutil)
    system_metrics: bool = False
    # true: log the trained weights as the artifact model/weights.pt (RNNModel state_dict, beside config.yaml),
    # loadable with pipeline.load_run(run_id) (README, "Saved models and resuming")
    log_model: bool = True


@dataclass(frozen=True)
class FlossConfig:
    # Gradient flossing (Engelken 2023): weight * sum_{i<=k} lambda_i^2 added to the loss, the lambda_i the
    # k largest Lyapunov exponents by a differentiable QR along the trajectory (README, "Remedies beyond clipping")
    weight: float = 0.0  # weight of sum lambda_i^2 in the loss; 0: off
    exponents: int = 1  # k: how many of the largest exponents are pushed toward 0 (<= H; <= 2H for lstm)
    every: int = 1  # floss on the steps with step % N == 0; the steps between train on the task alone
    until: int | None = None  # floss only on steps < N (~ flossing before training); None: the whole run
    batch: int = 8  # trajectories: the first N sequences of the training batch (<= task.batch_size)


@dataclass(frozen=True)
class SkipConfig:
    # Spike skipping (OLMo-core's SkipStepOptimizer): drop an update whose pre-clip gradient norm and/or loss
    # lies more than `zscore` standard deviations above the mean of the last `window` steps
    zscore: float = 0.0  # the threshold in standard deviations (OLMo-core: 6); 0: off
    window: int = 128  # rolling window of finite steps the mean and standard deviation come from
    warmup: int = 64  # no skipping until the window holds this many finite steps (OLMo-core: window / 2)
    signal: str = "both"  # both | grad_norm | loss: which z-score may skip a step (both: either one)
    max_consecutive: int = 10  # this many skips in a row (spikes or non-finite) stop the run: diverged


@dataclass(frozen=True)
class RemedyConfig:
    # Pascanu, Mikolov, Bengio 2013, eq. 9: weight of the regulariser Omega (mean over steps and sequences of
    # (||dL/ds_k ds_k/ds_{k-1}|| / ||dL/ds_k|| - 1)^2) in the loss; 0: off
    omega: float = 0.0
    floss: FlossConfig = field(default_factory=FlossConfig)
    skip: SkipConfig = field(default_factory=SkipConfig)

    @property
    def active(self) -> tuple[str, ...]:
        """The remedies switched on, in a fixed order: the run's ``remedy`` tag."""
        on = (("omega", self.omega > 0), ("floss", self.floss.weight > 0), ("skip", self.skip.zscore > 0))
        return tuple(name for name, is_on in on if is_on)


@dataclass(frozen=True)
class Config:
    seed: int = 0  # seeds data (seed, seed+1 val, seed+2 probe) and weights
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    remedy: RemedyConfig = field(default_factory=RemedyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flattened ``{"task.name": ..., ...}``: the MLflow params and the sweep's key space."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, patch: dict[str, Any] | None = None
) -> Config:
    """YAML file (optional) + nested patch + dotted overrides -> validated :class:`Config`."""
    data = read_yaml(path) if path is not None else {}
    if patch:
        data = deep_merge(data, patch)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> Config:
    """A nested mapping -> validated :class:`Config` (missing keys take the defaults above)."""
    from pipeline.config_checks import validate  # the checks import this module's sections

    cfg = build(Config, data)
    validate(cfg)
    return cfg


def config_keys() -> list[str]:
    """Every dotted key a config may set (for sweep-space validation)."""
    return list(Config().flat().keys())


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys set (``{"optim.lr": 0.01}``) and validated: the frozen config's copy-on-change."""
    data = cfg.to_dict()
    for k, v in values.items():
        set_dotted(data, k, v)
    return from_dict(data)
