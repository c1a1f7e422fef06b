"""A sweep's stores at the scale of thousands of trials, fabricated in minutes instead of days of training:
``.venv/bin/python benchmarks/scale_store.py DIR [--trials 5000] [--killed 100] [--history full|last]``.

``DIR`` then holds what ``make sweep`` leaves in its working directory (the embedded default stores):
``mlflow.db`` (SQLite, WAL, made by the pipeline's own ``ensure_experiment``), ``mlruns/<experiment id>/``
(artifacts) and ``optuna/default.journal``, for the sweep ``configs/sweeps/default.yaml``:

* MLflow, through ``MlflowClient``: the sweep's parent run (``pipeline.kind=sweep``, the parent's params,
  ``sweep.yaml``, the summary tags) and one child run per trial, with the params, metrics, tags and
  artifacts a real trial records (copied from a real one of ``make sweep ARGS='n_trials=4'``): the 55
  params of ``Config.flat`` (built by the worker's own ``trial_run_config``), 24 metrics with their step
  histories (``--history full``: 30 logging steps of ``train/loss`` and ``grad/*``, 6 validations, 3
  profile passes; ``last``: the final values only), the run's identity, outcome and verdict tags, and
  ``config.yaml``, ``diagnostics/{bptt_profile,grad_norms}.{parquet,csv}`` and ``plots/*.png`` (hard
  links to one synthetic set per (cell, regime)). Regimes, divergences (some without a validation loss,
  some with a ``nonfinite.`` tag), prunings and clipping follow the sampled point loosely, as a real
  sweep of the default space finds them; ``--killed`` trials were interrupted: run KILLED, trial FAIL
  (``interrupted``) and retried once with the same params, as a SIGTERM leaves them.
* Optuna, in the journal: the study as the sweep creates it (user attrs, the start-up design enqueued),
  then each trial through the calls a worker makes (``ask``, ``suggest_*``, ``set_user_attr``,
  ``report``, ``tell``; one journal record each, about 23 a trial), so a resume replays a journal of
  the real size. The journal is written in memory and saved at the end (one append per record, each
  fsynced, would take minutes).

Resume it with more trials, in DIR: ``cd DIR && /path/to/.venv/bin/python -m pipeline sweep --config
/path/to/configs/sweeps/default.yaml n_trials=5110``; report it: ``... -m pipeline report --no-log``.
Made on the 2-core machine (2026-12-06): 5,000 + 100 trials, ``--history full``, in 9.5 minutes: a 543 MB
``mlflow.db``, 82 MB of artifacts (hard links), a journal of 98,587 records (17 MB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "configs" / "sweeps" / "default.yaml"
GRAD_KEYS = [
    "norm_preclip",
    "norm_postclip",
    "clip_coef",
    "norm_input",
    "norm_recurrent",
    "norm_bias",
    "norm_readout",
]
PROFILE_KEYS = ["bptt/log10_ratio", "bptt/log10_ratio_per_step", "bptt/decay_rate", "bptt/horizon",
                "bptt/overflow_step", "spectral/sigma_max", "spectral/radius", "spectral/pascanu_log10_bound",
                "spectral/lyapunov_max"]  # fmt: skip
T0_MS = 1_790_000_000_000  # the first trial's start (2026-09-21), 8 s apart: start_time orders the runs


class _Memory:
    """An Optuna journal backend in memory (``BaseJournalBackend``'s two methods), saved as the file backend
    writes it: one compact JSON record a line."""

    def __init__(self):
        self.logs: list[dict[str, Any]] = []

    def read_logs(self, log_number_from: int):
        return self.logs[log_number_from:]

    def append_logs(self, logs) -> None:
        self.logs.extend(logs)

    def save(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for log in self.logs:
                f.write(json.dumps(log, separators=(",", ":")) + "\n")


def _sampler(values: dict[str, Any]):
    """An Optuna sampler that proposes ``values`` (the point drawn for the trial being asked)."""
    import optuna

    class Given(optuna.samplers.BaseSampler):
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            return values[param_name]

    return Given()


def outcome(rng, v: dict[str, Any], number: int) -> dict[str, Any]:
    """How a trial at point ``v`` ends: regime, loss ratio, steps, divergence, pruning (loosely as the
    default sweep finds them: small g vanishes in tanh, large g with a large lr and no clipping diverges)."""
    cell, g, lr, clip = v["model.cell"], v["model.init_scale"], v["optim.lr"], v["clip.mode"]
    gated = cell != "tanh"
    o: dict[str, Any] = {"diverged_step": None, "pruned": False, "nonfinite": False, "steps": 300}
    if (g > (2.0 if gated else 1.4)) and lr > 0.01 and (clip == "none" or rng.random() < 0.2):
        o["regime"] = "diverged"
        o["diverged_step"] = int(rng.integers(5, 290))
        o["steps"] = o["diverged_step"]
        # diverged before the first validation: no loss at all; later: the last finite one, or NaN (a tag)
        o["ratio"] = None if o["diverged_step"] < 50 else float(10 ** rng.uniform(0, 3))
        o["nonfinite"] = o["ratio"] is not None and rng.random() < 0.5
        return o
    if g < (0.5 if gated else 0.9):
        o["regime"], o["ratio"] = "vanishing", float(rng.uniform(0.95, 1.1))
    elif g > (3.0 if gated else 1.6):
        o["regime"], o["ratio"] = "exploding", float(10 ** rng.uniform(-0.5, 0.6))
    else:
        o["regime"] = "healthy"
        o["ratio"] = float(10 ** rng.uniform(-2.2 if gated else -1.5, 0.05))
    if number >= 6 and o["ratio"] > 0.5 and rng.random() < 0.35:  # the median pruner after its start-up
        o["pruned"], o["steps"] = True, int(rng.choice([100, 150, 200, 250]))
    return o


def _history(o: dict[str, Any], clip: str, rng, full: bool) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) history as the run logs it."""
    steps, ratio = o["steps"], o["ratio"]
    end = [steps]
    log_steps = list(range(10, steps + 1, 10)) if full else end
    val_steps = list(range(50, steps + 1, 50)) if full else end
    prof_steps = [s for s in (0, 150, 300) if s <= steps] if full else end
    grow = 1e3 if o["regime"] in ("exploding", "diverged") else 1.0
    h: dict[str, list[tuple[int, float]]] = {"task/baseline": [(0, 1 / 6)]}
    h["train/loss"] = [(s, float(rng.uniform(0.01, 0.3))) for s in log_steps]
    for k in GRAD_KEYS:
        h[f"grad/{k}"] = [
            (s, float(rng.uniform(0.01, 5) * (1 if k == "clip_coef" else grow))) for s in log_steps
        ]
    rate = float(rng.uniform(0, 0.6)) if clip == "norm" else 0.0
    h["grad/clip_rate"] = [(s, rate) for s in log_steps]
    h["grad/max_norm_preclip"] = [(s, float(rng.uniform(1, 10) * grow)) for s in log_steps]
    if ratio is not None and val_steps:
        h["val/loss_ratio"] = [(s, float(ratio * rng.uniform(1, 1.5))) for s in val_steps[:-1]]
        h["val/loss_ratio"].append((val_steps[-1], ratio))
        h["val/loss"] = [(s, x / 6) for s, x in h["val/loss_ratio"]]
        h["val/best_loss"] = [(steps, min(x for _, x in h["val/loss"]))]
    decades = {"vanishing": -10.0, "healthy": -1.0, "exploding": 4.0, "diverged": 8.0}[o["regime"]]
    for k in PROFILE_KEYS:
        h[k] = [(s, float(decades * rng.uniform(0.5, 1.5))) for s in prof_steps]
    h["train/steps"] = [(steps, float(steps))]
    return h


def _artifact_set(cache: Path, cell: str, regime: str, cfg_yaml: str) -> Path:
    """One synthetic artifact folder per (cell, regime), hard-linked into each run's: the files a trial
    logs (``config.yaml`` of the first run of the pair; the report reads only ``diagnostics/``)."""
    import pandas as pd

    d = cache / f"{cell}-{regime}"
    if d.is_dir():
        return d
    (d / "diagnostics").mkdir(parents=True)
    (d / "plots").mkdir()
    rng = np.random.default_rng(abs(hash((cell, regime))) % 2**32)
    slope = {"vanishing": -0.3, "healthy": -0.02, "exploding": 0.1, "diverged": 0.2}[regime]
    prof = pd.DataFrame(
        [
            {"step": s, "t": t, "state": "h", "log10_norm": slope * (50 - t) + rng.normal(0, 0.1)}
            for s in (0, 150, 300)
            for t in range(1, 51)
        ]
    )
    norms = pd.DataFrame({"step": np.arange(1, 301)})
    for c in ("loss", "norm_preclip", "norm_postclip", "clip_coef", "clipped", "skipped", "omega", "floss",
              "norm_input", "norm_recurrent", "norm_bias", "norm_readout"):  # fmt: skip
        norms[c] = rng.uniform(0.01, 5, 300)
    for name, df in (("bptt_profile", prof), ("grad_norms", norms)):
        df.to_parquet(d / "diagnostics" / f"{name}.parquet", index=False)
        df.to_csv(d / "diagnostics" / f"{name}.csv", index=False)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # placeholders: nothing reads a trial's plots
    for name in ("bptt_profile.png", "grad_norms.png"):
        (d / "plots" / name).write_bytes(png)
    (d / "config.yaml").write_text(cfg_yaml)
    return d


def _link_tree(src: Path, dst: Path) -> None:
    for f in src.rglob("*"):
        if f.is_file():
            t = dst / f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, t)


def _tags(
    cfg, o: dict[str, Any], versions: dict[str, str], study: str, number: int, parent: str, killed: bool
) -> dict:
    """The run's tags: identity (at its start), then its verdict (at its end: none for a killed run)."""
    from pipeline.names import KIND, KIND_TRIAL, STUDY, TRIAL_NUMBER

    t = {"task": cfg.task.name, "cell": cfg.model.cell, "init": cfg.model.init, **versions}
    t.update({KIND: KIND_TRIAL, STUDY: study, TRIAL_NUMBER: str(number), "mlflow.parentRunId": parent})
    if killed:
        return t
    reason = {"vanishing": "profile falls -0.22 decades/step < -0.03", "healthy": "profile within +-0.03 decades/step",
              "exploding": "profile grows 0.08 decades/step > 0.03",
              "diverged": "the loss was not finite"}[o["regime"]]  # fmt: skip
    ratio = o["ratio"]
    solved = o["regime"] != "diverged" and ratio is not None and ratio < 0.06
    t.update({"regime": o["regime"], "regime_init": "healthy", "solved": str(solved).lower(),
              "pruned": str(o["pruned"]).lower(), "regime_reason": reason, "remedy": "none",
              "mlflow.note.content": f"Regime **{o['regime']}** ({reason})."})  # fmt: skip
    if o["diverged_step"] is not None:
        t["diverged_step"] = str(o["diverged_step"])
    if o["nonfinite"]:
        t["nonfinite.val/loss_ratio"] = t["nonfinite.val/loss"] = "nan"
    return t


def _parent_run(c, sw, exp_id: str, n_done: int, versions: dict[str, str]) -> str:
    """The sweep's parent run, as ``pipeline.sweep.parent._parent_run`` makes it (started before its trials)."""
    from dataclasses import asdict

    import yaml
    from mlflow.entities import Param

    from pipeline.sweep.config import parent_run_name

    tags = {"pipeline.kind": "sweep", "study": sw.study, "storage": f"optuna/{sw.study}.journal", **versions}
    parent = c.create_run(exp_id, start_time=T0_MS - 60_000, run_name=parent_run_name(sw.study), tags=tags)
    rid = parent.info.run_id
    space = {f"space.{p.key}": json.dumps(list(p.choices) if p.kind == "categorical"
             else {"low": p.low, "high": p.high, "log": p.log}) for p in sw.space}  # fmt: skip
    params = {"n_trials": n_done, "sampler": json.dumps(asdict(sw.sampler)), "pruner": json.dumps(asdict(sw.pruner)),
              "penalty": sw.penalty, "prune.max_grad_norm": sw.prune.max_grad_norm, **space}  # fmt: skip
    c.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    c.log_text(rid, yaml.safe_dump(sw.source, sort_keys=False), "sweep.yaml")
    return rid


def _study(sw, parent: str, exp_id: str, exp_name: str):
    """The study as ``create_stores`` makes it, on a journal in memory: user attrs, start-up design."""
    import optuna
    from optuna.storages import JournalStorage

    from pipeline.sweep.settings import SETTINGS_ATTR, study_settings
    from pipeline.sweep.study import startup_design

    backend = _Memory()
    study = optuna.create_study(study_name=sw.study, storage=JournalStorage(backend), direction="minimize")
    study.set_user_attr(SETTINGS_ATTR, study_settings(sw))
    study.set_user_attr("mlflow_parent_run_id", parent)
    study.set_user_attr("mlflow_experiment_id", exp_id)
    study.set_user_attr("mlflow_experiment", exp_name)
    design = startup_design(sw)
    for params in design:
        study.enqueue_trial(params, user_attrs={"startup": True})
    study.set_user_attr("startup_design", len(design))
    return study, backend


def _tell(c, sw, study, trial, rid: str, o: dict[str, Any], end_ms: int) -> None:
    """A trial that ran to its end, told as ``Worker.tell`` tells it, its run tagged and FINISHED."""
    from mlflow.entities import RunTag
    from optuna.trial import TrialState

    from pipeline.sweep.study import divergence_value, trained_value

    attrs = {"regime": o["regime"], "solved": o["ratio"] is not None and o["ratio"] < 0.06
             and o["regime"] != "diverged", "steps": o["steps"], "val_loss_ratio": o["ratio"],
             "val_accuracy": None, "diverged": o["diverged_step"] is not None}  # fmt: skip
    if o["diverged_step"] is not None:
        attrs["diverged_step"] = o["diverged_step"]
    if o["pruned"]:
        attrs["pruned_by"] = "val_loss"
    for k, x in attrs.items():
        trial.set_user_attr(k, x)
    if attrs["diverged"]:
        value, state = divergence_value(study, sw.penalty), "COMPLETE"
        study.tell(trial, value)
    elif o["pruned"]:  # its value: the last one it reported (None where it reported none)
        value, state = study.tell(trial, state=TrialState.PRUNED).value, "PRUNED"
    else:
        value, state = trained_value(study, o["ratio"], sw.penalty), "COMPLETE"
        study.tell(trial, value)
    tags = {"optuna_state": state, "diverged": str(attrs["diverged"]).lower()}
    if value is not None:
        tags["optuna_value"] = repr(float(value))
    if o["pruned"]:
        tags["pruned_by"] = "val_loss"
    c.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()])
    c.set_terminated(rid, "FINISHED", end_ms)


def _kill(c, study, trial, rid: str, end_ms: int) -> None:
    """A trial interrupted by SIGTERM: run KILLED, trial FAIL (``interrupted``), its params retried once."""
    from optuna.trial import TrialState

    from pipeline.sweep.owners import enqueue_retry

    c.set_tag(rid, "status", "killed")
    c.set_terminated(rid, "KILLED", end_ms)
    study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
    study.tell(trial, state=TrialState.FAIL)
    enqueue_retry(study, study._storage.get_trial(trial._trial_id))


def build(out: Path, n_done: int, n_killed: int, full: bool, seed: int) -> dict[str, Any]:
    import optuna
    from mlflow.entities import Metric, Param, RunTag
    from optuna.trial import FixedTrial, TrialState

    from pipeline.provenance import version_tags
    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.study import suggest
    from pipeline.sweep.worker import trial_run_config
    from pipeline.tracking import client, ensure_experiment

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sw = load_sweep(SWEEP)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    exp_name = sw.base_config().tracking.experiment
    exp_id = ensure_experiment(uri, exp_name)  # cwd is out: artifacts in ./mlruns/<id>, as make sweep's
    c, versions, rng, cache = client(uri), version_tags(), np.random.default_rng(seed), out / ".artifact-sets"
    parent = _parent_run(c, sw, exp_id, n_done, versions)
    study, backend = _study(sw, parent, exp_id, exp_name)

    killed_at = set(rng.choice(np.arange(10, n_done + n_killed), size=n_killed, replace=False).tolist())
    t_start = time.perf_counter()
    number, done, start_ms, log_every = 0, 0, T0_MS, max(1, (n_done + n_killed) // 20)
    while done < n_done:
        values = {p.key: suggest(FixedTrial(_draw(rng, sw.space)), p) for p in sw.space}
        study.sampler = _sampler(values)
        trial = study.ask()
        values = {p.key: suggest(trial, p) for p in sw.space}  # a popped retry or start-up point: its own
        trial.set_user_attr("worker", f"vm|{10_000 + number % 4}|{36_000 + number % 4}")
        cfg = trial_run_config(sw, {"experiment": exp_name}, uri, FixedTrial(values, number=trial.number))
        o = outcome(rng, values, trial.number)
        killed = trial.number in killed_at
        if killed:  # interrupted at a random step: its partial record, run KILLED
            o = {**o, "steps": int(rng.integers(10, max(11, o["steps"]))), "pruned": False}
        run = c.create_run(exp_id, start_time=start_ms, run_name=cfg.tracking.run_name[:250],
                           tags=_tags(cfg, o, versions, sw.study, trial.number, parent, killed))  # fmt: skip
        rid = run.info.run_id
        trial.set_user_attr("mlflow_run_id", rid)
        hist = _history(o, values["clip.mode"], rng, full)
        if killed:  # no summary metrics: the run ended before record_end
            hist = {k: [(s, x) for s, x in h if s % 10 == 0 and 0 < s <= o["steps"]] for k, h in hist.items()}
            hist = {k: h for k, h in hist.items() if k.startswith(("train/loss", "grad/", "val/loss")) and h}
        metrics = [Metric(k, x, start_ms + s * 20, s) for k, h in hist.items() for s, x in h]
        params = [Param(k, str(v)) for k, v in cfg.flat().items()]
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit: 1,000 metrics a call
            c.log_batch(rid, metrics=metrics[i : i + 1000], params=params if i == 0 else [])
        _link_tree(_artifact_set(cache, cfg.model.cell, o["regime"], cfg.to_yaml()),
                   Path(run.info.artifact_uri.removeprefix("file://")))  # fmt: skip
        for s, x in hist.get("val/loss_ratio", []):
            trial.report(x, s)
        if killed:
            _kill(c, study, trial, rid, start_ms + o["steps"] * 20)
        else:
            _tell(c, sw, study, trial, rid, o, start_ms + o["steps"] * 20)
            done += 1
        number, start_ms = number + 1, start_ms + 8_000
        if number % log_every == 0:
            print(f"  {number} trials ({done} done) in {time.perf_counter() - t_start:.0f} s", flush=True)

    # the summary tags finalize writes; the parent run FINISHED
    best = min((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if not t.user_attrs.get("diverged")), key=lambda t: t.value)  # fmt: skip
    c.log_batch(parent, tags=[RunTag(k, str(v)) for k, v in {
        "sweep_complete": "true", "n_trials": n_done, "n_trials_done": done, "best_trial": best.number,
        "best_run_id": best.user_attrs["mlflow_run_id"]}.items()])  # fmt: skip
    c.set_terminated(parent, "FINISHED", start_ms)
    (out / "optuna").mkdir(exist_ok=True)
    backend.save(out / "optuna" / f"{sw.study}.journal")
    shutil.rmtree(cache)
    return {"trials": number, "done": done, "journal_records": len(backend.logs), "parent_run_id": parent}


def _draw(rng, space) -> dict[str, Any]:
    """A point of the space, drawn at random (a stand-in for TPE: the report does not care which)."""
    out: dict[str, Any] = {}
    for p in space:
        if p.kind == "categorical":
            out[p.key] = p.choices[int(rng.integers(len(p.choices)))]
        elif p.log:
            out[p.key] = float(math.exp(rng.uniform(math.log(p.low), math.log(p.high))))
        else:
            out[p.key] = float(rng.uniform(p.low, p.high))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="a new (or empty) folder for mlflow.db, mlruns/ and optuna/")
    ap.add_argument("--trials", type=int, default=5000, help="trials done (COMPLETE + PRUNED)")
    ap.add_argument("--killed", type=int, default=100, help="trials interrupted and retried")
    ap.add_argument(
        "--history", choices=["full", "last"], default="full", help="metric histories or final values"
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = a.dir.resolve()
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    t0 = time.perf_counter()
    res = build(out, a.trials, a.killed, a.history == "full", a.seed)
    print(f"{out}: {res} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
