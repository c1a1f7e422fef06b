"""Sweep configuration: a YAML file that names a base training config, a search space and a budget.

Validated like training configs, before anything touches a store: the typed builder
(:func:`pipeline.schema.build`) rejects unknown keys and wrong types, :func:`validate` out-of-range
values, and the space parser every bad range or choice list; each raises
:class:`~pipeline.schema.ConfigError` naming the key (the CLI prints one line and exits 2). The result
is frozen: a worker receives it as data (:func:`to_data` / :func:`from_data`), never re-reading the file.
Light imports only (stdlib, yaml, pipeline.config): the CLI's ``--help`` must not pay for torch,
Optuna or MLflow.

Layout (every top-level key is optional except ``space``; defaults in the dataclasses below)::

    study: default                  # Optuna study name (also the MLflow tag `study`)
    storage: null                   # null: journal file optuna/<study>.journal; or postgresql://...
    n_trials: 24                    # budget: COMPLETE + PRUNED trials (diverged ones are COMPLETE)
    workers: auto                   # auto: up to 12 per visible GPU, else one per CPU core (max 4)
    trials_per_worker: auto         # trials one worker trains at once as a stack (1: one at a time)
    base: configs/train/x.yaml      # or an inline training config mapping
    sampler: {name: tpe, seed: 0, n_startup_trials: 8}
    pruner: {name: median, n_startup_trials: 4, n_warmup_steps: 100}
    prune: {max_grad_norm: 1.0e6}   # gradient-health pruning bound on the pre-clip norm (null: off)
    penalty: 2.0                    # objective of a diverged trial, cap of a trained one (1.0 = learned nothing)
    heartbeat: {interval: 10, grace: 30}
    space:
      model.init_scale: {low: 0.25, high: 4.0, log: true}
      model.cell: {choices: [tanh, gru, lstm]}
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import STEPS_MAX, Config, from_dict
from pipeline.schema import ConfigError, build, check, deep_merge, parse_overrides, read_yaml, set_dotted
from pipeline.sweep.space import Param, candidates, nest_space, parse_space
from pipeline.uris import check_storage_url, is_rdb, sqlite_file, study_storage

# Upper bounds (README "Sweep file"): n_trials and start-up counts: the journal replays every record of
# every trial on each open, so 10^6 trials is already a journal of gigabytes; workers: processes on one
# machine; sampler.seed: numpy's RandomState takes 32-bit seeds (Optuna's samplers); heartbeat: a day,
# beyond which stale-trial detection means nothing (and datetime.timedelta overflows far beyond).
N_TRIALS_MAX = 10**6
WORKERS_MAX = 1024
TRIALS_PER_WORKER_MAX = 4096  # members of one worker's stacks: beyond it one process holds too many runs
SAMPLER_SEED_MAX = 2**32 - 1
HEARTBEAT_MAX = 86_400
STUDY_MAX = 100  # bytes of UTF-8, for a study whose store is a file: see check_study_name
STUDY_MAX_RDB = 512  # characters: Optuna's RDB storages keep the name in a VARCHAR(512)
# Keys a sweep must not search: they change where or whether a trial is recorded, not what it trains.


@dataclass(frozen=True)
class SamplerConfig:
    # tpe: learns from every finished trial (diverged ones included, see pipeline/sweep/study.py); random: a baseline.
    name: Literal["tpe", "random"] = "tpe"
    seed: int = 0  # seeds the start-up design and, with the worker index, each worker's sampler
    # Random points before TPE models anything; drawn once by the parent, the same for any worker count.
    n_startup_trials: int = 8
    multivariate: bool = True  # TPE models the keys jointly (lr and init_scale interact near the edge)


@dataclass(frozen=True)
class PrunerConfig:
    # median: stop a trial below the median of earlier ones at the same step; hyperband; none: never prune.
    name: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = 4  # median: trials that finish unpruned before pruning starts
    n_warmup_steps: int = 0  # median: steps of each trial before it can be pruned
    min_resource: int | None = None  # hyperband: the smallest budget in steps (None: trainer.val_every)
    reduction_factor: int = 3  # hyperband: 1/reduction_factor of the trials go on at each rung


@dataclass(frozen=True)
class PruneConfig:
    # Gradient-health pruning: a pre-clip gradient norm above this stops the trial as pruned (None: off).
    max_grad_norm: float | None = 1.0e6


@dataclass(frozen=True)
class HeartbeatConfig:
    interval: int = 10  # seconds between heartbeats of a running trial (RDB storages)
    grace: int = 30  # seconds without a heartbeat before a trial is stale (failed and retried once)


@dataclass(frozen=True)
class SweepConfig:
    study: str = "default"  # the Optuna study name and the MLflow tag `study`: resuming is by this name
    storage: str | None = None  # None: the journal file optuna/<study>.journal (this machine)
    n_trials: int = 24  # the budget: COMPLETE + PRUNED trials (FAILed ones are retried, not counted)
    workers: int | None = None  # None ("auto" in YAML): pipeline.sweep.parent.choose_workers
    # Trials one worker trains at once as a stack (README, "Batched trials"); None ("auto" in YAML): the
    # measured default per device (pipeline.sweep.batch.AUTO_CPU / AUTO_GPU); 1: one trial at a time.
    trials_per_worker: int | None = None
    timeout: float | None = None  # seconds; stop starting trials after this (None: no limit)
    base: dict[str, Any] = field(default_factory=dict)  # training config as a nested dict (validated)
    sampler: SamplerConfig = SamplerConfig()  # how trials are proposed
    pruner: PrunerConfig = PrunerConfig()  # how trials are stopped early on their validation loss
    prune: PruneConfig = PruneConfig()  # how trials are stopped early on gradient health
    penalty: float = 2.0  # objective of a diverged trial, cap of a trained one (1.0 = learned nothing)
    heartbeat: HeartbeatConfig = HeartbeatConfig()  # stale-trial detection on RDB storages
    space: tuple[Param, ...] = ()  # the search space, in file order
    # best: a trial logs model/weights.pt when it finishes as the best so far, so the final best trial always
    # has them (README, "Saved models and resuming"); all: every trial (as tracking.log_model on a train run)
    log_models: Literal["best", "all"] = "best"
    # The merged YAML as read (base resolved), logged on the parent run as sweep.yaml; not sent to workers.
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    def base_config(self) -> Config:
        return from_dict(copy.deepcopy(self.base))

    def trial_config(self, values: dict[str, Any]) -> Config:
        """The base config with the sampled values set (validated)."""
        data = copy.deepcopy(self.base)
        for k, v in values.items():
            set_dotted(data, k, v)
        return from_dict(data)

    def storage_url(self, override: str | None = None) -> str:
        return study_storage(self.study, override or self.storage)


def check_study_name(study: str, url: str) -> None:
    """A study kept in files (a journal, or a SQLite storage) names them: optuna/<study>.journal, its lock
    <study>.journal.lock.rename (20 characters added) and the budget lock <study>.journal.<study>.sweeplock
    (the name twice, 19 added), which must fit a file name (255 bytes on Linux and macOS): 2 * 118 + 19 =
    255; 100 leaves room. Beyond it the sweep failed with "File name too long" after mlflow.db and optuna/
    were written (found by a fuzzing review). A study on a database server names no file: it keeps
    :data:`STUDY_MAX_RDB` (checked in :func:`validate`), so a longer one made there still resumes."""
    if is_rdb(url) and sqlite_file(url) is None:
        return
    if len(study.encode()) > STUDY_MAX:
        raise ConfigError(
            "study",
            f"must be at most {STUDY_MAX} bytes for a study kept in files (it names them; on a database "
            f"server it may have {STUDY_MAX_RDB} characters), got {len(study.encode())}",
        )


def unread_searched_keys(sw: SweepConfig) -> list[str]:
    """Notes on the searched ``model.*`` keys that no trial's model reads (:func:`pipeline.cell_keys.reads_key`):
    e.g. ``model.init_scale`` searched while every trial keeps ``model.init: default`` (budget spent on a
    dimension that changes nothing)."""
    from pipeline.cell_keys import reads_key

    base = sw.base_config().model
    by_key = {p.key: p for p in sw.space}

    def values(key: str, fixed: str) -> list[str]:
        p = by_key.get(key)
        return [str(c) for c in p.choices] if p is not None and p.kind == "categorical" else [fixed]

    cells, inits = values("model.cell", base.cell), values("model.init", base.init)
    notes = []
    for p in sw.space:
        if not p.key.startswith("model.") or p.key in ("model.cell", "model.init"):
            continue
        key = p.key.removeprefix("model.")
        if not any(reads_key(c, i, key) for c in cells for i in inits):
            notes.append(
                f"space key {p.key} is read by no trial (model.cell in {cells}, model.init in {inits}): "
                "every value trains the same model"
            )
    return notes


def parent_run_name(study: str) -> str:
    """The sweep's parent MLflow run name: ``sweep-<study>``, cut to the 250 characters of MLflow's
    database stores (a study on a database server may have 512: a PostgreSQL-backed ``mlflow server``
    refused the longer name with a traceback)."""
    return f"sweep-{study}"[:250]


TOP_KEYS = {f.name for f in dataclasses.fields(SweepConfig)} - {"source"}


def _in_range(key: str, v: int, lo: int, hi: int) -> None:
    check(key, v >= lo, f">= {lo}", v)
    check(key, v <= hi, f"<= {hi}", v)


def validate(sw: SweepConfig) -> None:
    """Ranges and cross-field rules of a built sweep (types were checked by :func:`pipeline.schema.build`)."""
    try:
        from_dict(copy.deepcopy(sw.base))
    except ConfigError as e:
        raise e.under("base") from None
    check(
        "study",
        bool(sw.study.strip()) and not any(c in sw.study for c in "/\\ "),
        "a non-empty name without '/', '\\' or spaces",
        sw.study,
    )
    # Whatever the store: Optuna's RDB storages keep the name in a VARCHAR(512); the bound of a study kept
    # in files (tighter) is checked once the store is known, --storage included (check_study_name).
    if len(sw.study) > STUDY_MAX_RDB:
        raise ConfigError("study", f"must be at most {STUDY_MAX_RDB} characters, got {len(sw.study)}")
    if sw.storage is not None:
        check("storage", bool(sw.storage.strip()), "a URL or a journal file path", sw.storage)
        check_storage_url("storage", sw.storage)
    _in_range("n_trials", sw.n_trials, 1, N_TRIALS_MAX)
    if sw.workers is not None:
        _in_range("workers", sw.workers, 1, WORKERS_MAX)
    if sw.trials_per_worker is not None:
        _in_range("trials_per_worker", sw.trials_per_worker, 1, TRIALS_PER_WORKER_MAX)
    if sw.timeout is not None:
        check("timeout", math.isfinite(sw.timeout), "a number of seconds", sw.timeout)
        check("timeout", sw.timeout > 0, "> 0 seconds or null (no limit)", sw.timeout)
    _in_range("sampler.seed", sw.sampler.seed, 0, SAMPLER_SEED_MAX)
    _in_range("sampler.n_startup_trials", sw.sampler.n_startup_trials, 0, N_TRIALS_MAX)
    p = sw.pruner
    _in_range("pruner.n_startup_trials", p.n_startup_trials, 0, N_TRIALS_MAX)
    _in_range("pruner.n_warmup_steps", p.n_warmup_steps, 0, STEPS_MAX)
    if p.min_resource is not None:
        _in_range("pruner.min_resource", p.min_resource, 1, STEPS_MAX)
    _in_range("pruner.reduction_factor", p.reduction_factor, 2, STEPS_MAX)
    bound = sw.prune.max_grad_norm
    if bound is not None:
        check("prune.max_grad_norm", math.isfinite(bound), "a number", bound)
        check("prune.max_grad_norm", bound > 0, "> 0 or null", bound)
    check("penalty", math.isfinite(sw.penalty), "a number", sw.penalty)
    # below 1 the cap on trained trials would tie trials that learned something (ratio < 1) with diverged ones
    check("penalty", sw.penalty >= 1, ">= 1 (1.0: the loss of a model that learned nothing)", sw.penalty)
    hb = sw.heartbeat
    _in_range("heartbeat.interval", hb.interval, 1, HEARTBEAT_MAX)
    _in_range("heartbeat.grace", hb.grace, 1, HEARTBEAT_MAX)
    check("heartbeat.grace", hb.grace > hb.interval, "larger than heartbeat.interval", hb.grace)


# -------------------------------------------------------------------------------------------- load


def _merged(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The sweep file with ``base`` read (a path is relative to the sweep file) and the overrides laid over."""
    raw = read_yaml(path)
    over = parse_overrides(overrides)
    for d in (raw, over):
        if isinstance(d.get("space"), dict):
            d["space"] = nest_space(d["space"])
    if isinstance(raw.get("base"), str):  # a path, relative to the sweep file (else the working directory)
        raw["base"] = _read_base(
            raw["base"], Path(path).parent, f"neither beside {path} nor in the working directory"
        )
    if "base" in over and not isinstance(over["base"], (dict, list)) and over["base"] is not None:
        # `base=FILE` on the command line is a path, relative to the working directory, whatever YAML
        # makes of it (`base=3` is the file 3, not the integer): it was said to be "not a path" (found by
        # a fuzzing review)
        # It replaces the sweep file's base, as a base: path in the file would: merged into an inline base
        # it kept that base's keys the file does not set (init, clip, ... of another model; a review).
        text = next(o.split("=", 1)[1] for o in reversed(overrides) if o.split("=", 1)[0].strip() == "base")
        raw["base"] = _read_base(text, None, "in the working directory")
        del over["base"]
    data = deep_merge(raw, over)
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(k, f"unknown key (allowed in a sweep: {', '.join(sorted(TOP_KEYS))})")
    if not isinstance(data.get("base") or {}, dict):
        raise ConfigError("base", f"must be a path to a training config or a mapping, got {data['base']!r}")
    return data


def _read_base(base: str, beside: Path | None, where: str) -> dict[str, Any]:
    """The training config ``base`` names: a path beside the sweep file (``beside``), else from the working
    directory; every problem (not found, a directory, unreadable, not a mapping) is one line naming ``base``."""
    if not base.strip():
        raise ConfigError("base", "empty path: name a training config file, or give a mapping")
    cand = beside / base if beside is not None else None
    chosen = cand if cand is not None and cand.exists() else Path(base)
    if not chosen.exists():
        raise ConfigError("base", f"config file not found: {base} ({where})")
    try:
        return read_yaml(chosen)
    except ConfigError as e:
        raise e.under("base") from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read, merge overrides (``n_trials=4``, ``base.optim.lr=0.01``, ``space.optim.lr.high=0.1``), validate."""
    data = _merged(path, list(overrides or []))
    typed = {k: v for k, v in data.items() if k != "space"}
    for key in ("workers", "trials_per_worker"):  # auto is None in the typed config; nothing is no value
        if key in typed and (typed[key] is None or isinstance(typed[key], str) and typed[key] != "auto"):
            raise ConfigError(
                key,
                f"must be auto or an integer, got {'nothing' if typed[key] is None else repr(typed[key])}",
            )
        if typed.get(key) == "auto":
            typed[key] = None
    if isinstance(typed.get("study"), (int, float)) and not isinstance(typed["study"], bool):
        typed["study"] = str(typed["study"])  # `study: 2024` names a study, as it always did
    sw = build(SweepConfig, typed)
    validate(sw)
    return dataclasses.replace(sw, space=parse_space(data.get("space"), sw.base), source=data)


def to_data(sw: SweepConfig) -> dict[str, Any]:
    """The validated sweep as JSON-able data, for a worker's spawn spec (without ``source``)."""
    data = dataclasses.asdict(sw)
    del data["source"]
    return data


def from_data(data: dict[str, Any]) -> SweepConfig:
    """:func:`to_data`'s output back into a SweepConfig, checked again (a worker never re-reads the file)."""
    sw = build(SweepConfig, data)
    validate(sw)
    return sw


def largest_trial(sw: SweepConfig) -> Config:
    """The trial config of the space that needs the most memory (by :func:`pipeline.training.budget.estimate`).

    The estimate grows with every size key, so its maximum over a box lies at a corner; coordinate ascent
    over the ends of each range and every choice (two rounds) finds it without enumerating the corners.
    Corners that are not valid training configs are skipped (each end was validated on its own).
    """
    from pipeline.training.budget import estimate

    def need(values: dict[str, Any]) -> int | None:
        try:
            return estimate(sw.trial_config(values)).peak()
        except ConfigError:
            return None

    best: dict[str, Any] = {}
    for _ in range(2):
        for p in sw.space:
            scored = [(need({**best, p.key: v}), i, v) for i, v in enumerate(candidates(p))]
            scored = [s for s in scored if s[0] is not None]
            if scored:
                best[p.key] = max(scored)[2]
    return sw.trial_config(best)


def check_sweep_fits(
    sw: SweepConfig, workers: int, device_workers: int | None = None, members: int = 1
) -> None:
    """Every trial the space can produce must fit, ``workers`` at once (each training ``members`` trials
    as a stack), before any store is created.

    Raises :class:`ConfigError` naming the key (prefixed ``space.`` when the space sets it, else ``base.``).
    """
    from pipeline.training.budget import check_fits

    cfg = largest_trial(sw)
    searched = {p.key for p in sw.space}
    try:
        check_fits(
            cfg,
            copies=workers,
            device_copies=device_workers,
            members=members,
            what="the largest trial of the space ",
        )
    except ConfigError as e:
        if e.key in ("workers", "trials_per_worker"):
            raise
        prefix = "space" if e.key in searched else "base"
        raise ConfigError(f"{prefix}.{e.key}", str(e).split(": ", 1)[1]) from None
