"""The exact BPTT profile of one RNN inside ANY LightningModule, during training (README, "Your own model").

:class:`BPTTProfileMonitor` runs :func:`pipeline.training.probe.probe` on a fixed batch at step 0, every
``every_n_steps`` and at train end, and logs through ``trainer.loggers`` (with an MLFlowLogger also the
profile artifact, the plot and the ``regime`` tag) or a ``sink``. The project's own trainer uses it as a
configured subclass (:mod:`pipeline.training.callbacks`): one implementation.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from pipeline.bptt.foreign import check_memory_steps
from pipeline.config import DiagnosticsConfig
from pipeline.config_checks import checked_diagnostics
from pipeline.training import probe as probing
from pipeline.training.copy64 import to_cpu64
from pipeline.training.grad_monitor import GradientNormMonitor, check_arg
from pipeline.training.grad_window import Sink, _Logs
from pipeline.training.profile_passes import _Passes

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def probe_metrics(res: probing.Probe) -> dict[str, Any]:
    """A pass's metrics: the top layer's under the plain names, every layer's as ``<stage>/layer<k>/<name>``
    (k = 0 is the bottom), and ``bptt/loss``."""
    top = len(res.profiles) - 1
    metrics: dict[str, Any] = dict(res.metrics[top])
    for k, m in enumerate(res.metrics):
        for name, v in m.items():
            stage, rest = name.split("/", 1)
            metrics[f"{stage}/layer{k}/{rest}"] = v
    metrics["bptt/loss"] = res.loss
    return metrics


def named(metrics: dict[str, Any], name: str | None) -> dict[str, Any]:
    """``metrics`` as a monitor with ``name`` logs them: ``<stage>/<name>/<rest>`` (unchanged for None)."""
    if name is None:
        return metrics
    return {f"{k.split('/', 1)[0]}/{name}/{k.split('/', 1)[1]}": v for k, v in metrics.items()}


def log_profile_artifacts(lg, frame, plot: Callable[[Any], Any] | None, name: str | None = None) -> None:
    """To the MLflow run of logger ``lg``: ``frame`` as ``diagnostics/bptt_profile.parquet`` and, when not
    empty and ``plot`` is given, ``plot(frame)`` as ``plots/bptt_profile.png`` (``bptt_profile_<name>.*``
    for a named monitor)."""
    stem = "bptt_profile" if name is None else f"bptt_profile_{name}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stem}.parquet"
        frame.to_parquet(path, index=False)
        lg.experiment.log_artifact(lg.run_id, str(path), "diagnostics")
        if len(frame) and plot is not None:
            fig = plot(frame)
            png = Path(tmp) / f"{stem}.png"
            fig.savefig(png)
            from pipeline.plots import plt

            plt.close(fig)
            lg.experiment.log_artifact(lg.run_id, str(png), "plots")


class _Verdict:
    """The end of a :class:`BPTTProfileMonitor`'s training: the verdict on its last pass (with the largest
    pre-clip norm and the divergence of a :class:`GradientNormMonitor` in the same Trainer) and, with an
    MLFlowLogger, the ``regime`` tag, its reason and the profile artifacts."""

    rnn: str
    name: str | None
    passes: list[dict[str, Any]]
    diagnostics: DiagnosticsConfig
    regime: str | None
    regime_reason: str
    profile_frame: Callable[[], Any]

    def _grad_monitor(self, trainer) -> GradientNormMonitor | None:
        return next((c for c in trainer.callbacks if isinstance(c, GradientNormMonitor)), None)

    def _finish(self, trainer) -> None:
        from pipeline.training.callbacks import judge

        gm = self._grad_monitor(trainer)
        if gm is not None:
            gm.drain(trainer)  # its last window, whichever callback's on_train_end Lightning runs first
        last = next((p for p in reversed(self.passes) if len(p) > 1), None)
        # Weights left non-finite by the last update (a finite gradient, an overflowing step: the guard
        # reads gradients before the step, and no later step read them) diverged as surely as a
        # non-finite gradient: the last pass found them so (a pass on such weights records its step alone).
        ended_nonfinite = bool(self.passes) and len(self.passes[-1]) == 1
        self.regime, self.regime_reason = judge(
            (gm is not None and gm.diverged_step is not None) or ended_nonfinite,
            last,
            gm.max_norm_preclip if gm is not None else None,
            self.diagnostics,
        )
        from pytorch_lightning.loggers import MLFlowLogger

        for lg in trainer.loggers if getattr(trainer, "is_global_zero", True) else ():  # as log_everywhere
            if isinstance(lg, MLFlowLogger):
                self._mlflow_artifacts(lg)

    def _mlflow_artifacts(self, lg) -> None:
        from pipeline.names import REGIME

        tag = REGIME if self.name is None else f"{REGIME}.{self.name}"
        lg.experiment.set_tag(lg.run_id, tag, self.regime)
        if self.regime_reason:  # which rule decided (README, "Regime verdict")
            why = "regime_reason" if self.name is None else f"regime_reason.{self.name}"
            lg.experiment.set_tag(lg.run_id, why, self.regime_reason)
        plot = self.plot if self.diagnostics.plots else None  # plots=False: the parquet alone
        log_profile_artifacts(lg, self.profile_frame(), plot, self.name)

    def plot(self, frame):
        """log10 ||dL/dh_t|| of the top layer against t, one line per pass (at most 6), c dashed."""
        from pipeline.plots import profile_figure

        top = frame[frame["layer"] == frame["layer"].max()]
        return profile_figure(
            top,
            f"{self.rnn}: BPTT profile; regime {self.regime}"
            + (f" ({self.regime_reason})" if self.regime_reason else ""),
            ylabel=r"$\log_{10}\,\|\partial L/\partial h_t\|$ (top layer)",
        )


# DiagnosticsConfig fields the project's trainer reads, for which this monitor has arguments instead: set
# to anything but their defaults they were accepted and did nothing (a walkthrough)
UNREAD = {
    "profile_every": "the passes are every_n_steps=",
    "probe_size": "the probe batch is batch= (default: the first training batch)",
    "reference_check": "the independent recursion is the project's trainer's, for its own cells",
}


def check_unread(d: DiagnosticsConfig, unread: Mapping[str, str], who: str) -> None:
    """Refuse a field of ``unread`` set to anything but its default, naming what does it instead."""
    default = DiagnosticsConfig()
    for field, instead in unread.items():
        if getattr(d, field) != getattr(default, field):
            raise ValueError(
                f"diagnostics.{field}={getattr(d, field)!r} is not read by {who}: {instead}; leave it at "
                f"its default ({getattr(default, field)!r})"
            )


class BPTTProfileMonitor(_Passes, _Verdict, _Logs, pl.Callback):
    """The exact float64 BPTT profile of the RNN at dotted path ``rnn`` inside the LightningModule.

    ``rnn``: e.g. ``"encoder.lstm"``; an nn.RNN, nn.LSTM or nn.GRU, unidirectional, without projection,
    any num_layers, batch_first or not (anything else fails at ``setup`` in one line; a PackedSequence
    input fails at the first pass, before the first update). ``every_n_steps``: passes at step 0, every
    N optimizer steps (at the first batch end at or past each multiple of N) and at train end (0: only
    the first and the last). ``batch``: the probe batch
    (default: the first training batch, kept). The loss is the module's own ``training_step`` loss on a
    float64 CPU copy in eval mode (:func:`pipeline.training.probe.probe`), or ``loss_fn(module, batch)``'s
    on that copy: required in manual optimization (e.g. truncated BPTT, where it gives the whole
    sequence's loss, so the profile shows what the truncation leaves out). ``memory_steps``: the
    long-range profile keeps the loss terms of the last N steps the loss reads (README, "The long-range
    profile"; default 1: a loss at every step, as a language model's, would otherwise read O(1) at every
    t whatever the Jacobians do), its whole gradient then kept as state ``h_total``; None: the total
    gradient alone.

    Logs the top layer's summaries under the plain names (``bptt/log10_ratio``, ``bptt/decay_rate``,
    ``spectral/sigma_max``, ...) and every layer's as ``bptt/layer<k>/<name>`` (k = 0 is the bottom);
    with an MLFlowLogger also ``diagnostics/bptt_profile.parquet``, ``plots/bptt_profile.png`` and the
    tag ``regime`` (the verdict of :func:`pipeline.training.callbacks.verdict` on the top layer, with the
    largest pre-clip norm and the divergence of a :class:`GradientNormMonitor` in the same Trainer).
    ``name``: a monitor of a second RNN logs as ``bptt/<name>/...``, ``spectral/<name>/...``,
    ``bptt_profile_<name>.*`` and the tag ``regime.<name>``; two monitors logging under one name are
    refused at ``setup``.

    The project's own trainer is a configuration of this class
    (:class:`pipeline.training.callbacks.ProfileMonitor`): the pass scheduling, the finite check, the
    record (:attr:`passes`, :attr:`frames`), the logging, the verdict and the artifacts are here; a
    subclass overrides :meth:`params_finite` and :meth:`profile_pass` (how the float64 parameters and the
    loss are obtained) and :meth:`stopping`. ``sink`` as for :class:`GradientNormMonitor`.
    """

    UNREAD: Mapping[str, str] = UNREAD  # the diagnostics fields refused (the project's trainer: none)
    step_type: type = float  # the type of the "step" entry of each pass
    keeps_state: bool = True  # passes, frames and the default probe batch go into a Lightning checkpoint
    frame_columns: tuple[str, ...] = ("step", "layer", "t", "state", "log10_norm")

    def __init__(
        self,
        rnn: str,
        every_n_steps: int = 100,
        batch: Any = None,
        diagnostics: DiagnosticsConfig | None = None,
        *,
        sink: Sink | None = None,
        loss_fn: probing.LossFn | None = None,
        memory_steps: int | None = 1,
        name: str | None = None,
    ):
        if name is not None and (
            not isinstance(name, str) or not _NAME.fullmatch(name) or re.fullmatch(r"layer\d+", name)
        ):
            raise ValueError(
                f"name must be letters, digits, '_', '.' or '-' (and not layer<k>), got {name!r}"
            )
        self.name = name
        check_arg("every_n_steps", every_n_steps, "int")
        if sink is not None:
            check_arg("sink", sink, "callable")
        if int(every_n_steps) < 0:
            raise ValueError(
                f"every_n_steps must be >= 0 (0: passes at the start and the end only), got {every_n_steps}"
            )
        self.memory_steps = check_memory_steps(memory_steps)
        self.rnn, self.every_n_steps = rnn, int(every_n_steps)
        self.loss_fn = loss_fn
        self.batch = None if batch is None else to_cpu64(batch)
        self._batch_given = batch is not None
        if diagnostics is not None and not isinstance(diagnostics, DiagnosticsConfig):
            raise TypeError(
                f"diagnostics must be a pipeline.DiagnosticsConfig, got {type(diagnostics).__name__}"
            )
        # the config's own types and checks (ConfigError, a ValueError)
        self.diagnostics = checked_diagnostics(diagnostics or DiagnosticsConfig())
        check_unread(self.diagnostics, self.UNREAD, type(self).__name__)
        self.sink = sink
        self.passes: list[dict[str, Any]] = []  # metrics logged per pass, with "step"
        self.frames: list[dict[str, Any]] = []  # long-format columns per pass
        self.regime: str | None = None
        self.regime_reason = ""  # which verdict rule decided (callbacks.judge)
        self._last_step: int | None = None
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        probing.resolve(pl_module, self.rnn)
        probing.check_loss_source(pl_module, self.loss_fn)
        self._check_names(trainer)
        if stage == "fit":  # a new fit records afresh (a checkpoint's state is restored after this)
            self.passes, self.frames, self.regime, self._last_step = [], [], None, None
            if not self._batch_given:
                self.batch = None

    def _check_names(self, trainer) -> None:
        """Two monitors that log to the Trainer's loggers under one name would mix their metrics, and
        the last to finish would replace the other's artifacts and ``regime`` tag: refused in one line."""
        if self.sink is not None or not trainer.loggers:
            return
        for other in trainer.callbacks:
            if (
                other is not self
                and isinstance(other, BPTTProfileMonitor)
                and other.sink is None
                and other.name == self.name
            ):
                said = "no name" if self.name is None else f"name={self.name!r}"
                raise ValueError(
                    f"two BPTTProfileMonitors ({self.rnn!r} and {other.rnn!r}) with {said} would log under "
                    'the same metric names, artifacts and regime tag: give each its own name= (README, "Your '
                    'own model")'
                )

    # -- scheduling
    # The first pass, before the first update; none at a resume step when a checkpoint's passes came back
    # (the schedule goes on from them, as in the uninterrupted run).
    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        if self.batch is not None and not self.passes:
            self.measure(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = to_cpu64(batch)
            if not self.passes:
                self.measure(trainer, pl_module)

    def stopping(self, trainer, pl_module) -> bool:
        """No scheduled pass once training is stopping (the last pass still runs at train end)."""
        return bool(trainer.should_stop)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # At the first batch end at or past each multiple of N: one batch may take several optimizer
        # steps (truncated BPTT in manual optimization), so global_step can jump over the multiple.
        n, step = self.every_n_steps, trainer.global_step
        last = self._last_step if self._last_step is not None else 0
        if n and step // n > last // n and not self.stopping(trainer, pl_module):
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.measure(trainer, pl_module)
        self._finish(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        # A fit resumed from a checkpoint taken at max_steps (a job stopped during its end-of-run work)
        # trains no step, and Lightning runs no train-end hook: the last pass, the verdict and the
        # artifacts are made here, as the uninterrupted run made them (a walkthrough: no regime tag and
        # no profile artifacts; this project's own trainer did it already, README "Saved models").
        if self.regime is None and self.passes:
            self.on_train_end(trainer, pl_module)

    # -- one pass
    def params_finite(self, pl_module) -> bool:
        """Whether the weights a pass would read are finite (a subclass may keep what it read for
        :meth:`profile_pass`, which runs right after on the same weights)."""
        return all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())

    def profile_pass(self, pl_module, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """One pass on finite weights: (metrics to log, long-format profile columns with ``step``)."""
        res = probing.probe(
            pl_module,
            self.rnn,
            self.batch,
            self.diagnostics.horizon_decades,
            loss_fn=self.loss_fn,
            memory_steps=self.memory_steps,
            check_input=not self.passes,  # the probe batch's own NaN: at the first pass, in one line
        )
        return probe_metrics(res), res.long_format(step)

    def measure(self, trainer, pl_module) -> dict[str, Any]:
        """Run a pass at ``trainer.global_step`` (once per step), record and log it."""
        step = trainer.global_step
        if self._last_step == step or self.batch is None:
            return self.passes[-1] if self.passes else {}
        metrics: dict[str, Any] = {}
        if self.params_finite(pl_module):
            metrics, frame = self.profile_pass(pl_module, step)
            self.frames.append(frame)
        self._last_step = step
        self.passes.append({"step": self.step_type(step), **metrics})
        if metrics:
            self._trainer = trainer
            self.publish(named(metrics, self.name), step)
        return metrics
