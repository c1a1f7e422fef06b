"""What a sweep prints and leaves: the parent's plain-text progress while it runs (:class:`Progress`), and
at its end the per-trial table, the best trial, Optuna's plots, all on the sweep's parent run.

Parent run contents (public names, see the README, "Sweeps"): tags ``best_run_id``, ``best_model_uri``
(``runs:/<best_run_id>/model``), params ``best_<key>`` (only once the study has
reached n_trials; a resume that raises n_trials may change them, so they are also tags ``best_<key>``),
metrics ``best_value``, ``best_trial``, ``trials/{complete,pruned,diverged,failed,running}``, artifacts
``trials.parquet`` and ``plots/optuna_history.png``, ``plots/param_importances.png`` (PED-ANOVA: no
random forest to fit, unlike Optuna's default fANOVA evaluator),
``plots/contour_init_scale_lr.png`` (when both keys are searched).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pipeline.names import DIVERGED, EXPLODING, HEALTHY, UNKNOWN, VANISHING
from pipeline.sweep.config import SweepConfig, parent_run_name
from pipeline.sweep.study import best_trial, counts, trial_ratio
from pipeline.uris import is_server, ui_command

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REGIME_ORDER = (HEALTHY, VANISHING, EXPLODING, DIVERGED, UNKNOWN)


def trials_frame(study):
    """One row per trial: number, state, value, diverged, regime, pruned_by, run_id, params (``p.<key>``)."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "diverged": bool(t.user_attrs.get("diverged", False)),
            "regime": t.user_attrs.get("regime"),
            "pruned_by": t.user_attrs.get("pruned_by"),
            "solved": t.user_attrs.get("solved"),
            "val_loss_ratio": t.user_attrs.get("val_loss_ratio"),
            "val_accuracy": t.user_attrs.get("val_accuracy"),
            "diverged_step": t.user_attrs.get("diverged_step"),
            "steps": t.user_attrs.get("steps"),
            "run_id": t.user_attrs.get("mlflow_run_id"),
            "retry_of": t.user_attrs.get("retry_of"),
            "duration_s": dur,
        }
        row.update({f"p.{k}": v for k, v in t.params.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in [c for c in df.columns if c.startswith("p.")]:
        if df[c].map(type).nunique() > 1:  # mixed int/str choices: parquet needs one type per column
            df[c] = df[c].astype(str)
    return df


def regime_table(df, base_cell: str | None = None) -> str:
    """Counts by regime (COMPLETE and PRUNED trials), with the best value and the cells in each:
    searched (``p.model.cell``), else every trial's ``base_cell`` (the column was blank: a walkthrough)."""
    if df.empty:
        return "  (no trials)"
    d = df[df["state"].isin(["COMPLETE", "PRUNED"])].copy()
    if d.empty:
        return "  (no finished trials)"
    d["regime"] = d["regime"].fillna(UNKNOWN)
    lines = [f"  {'regime':<10} {'trials':>6} {'pruned':>6} {'best':>8}  cells"]
    cell_col = "p.model.cell" if "p.model.cell" in d else None
    for reg in REGIME_ORDER:
        sub = d[d["regime"] == reg]
        if sub.empty:
            continue
        ok = sub[(sub["state"] == "COMPLETE") & ~sub["diverged"]]["value"]
        best = f"{ok.min():.4f}" if len(ok) else "-"
        counted = (
            sub[cell_col].value_counts().items() if cell_col else [(base_cell, len(sub))] if base_cell else []
        )
        cells = ", ".join(f"{k} {v}" for k, v in counted)
        lines.append(
            f"  {reg:<10} {len(sub):>6} {int((sub['state'] == 'PRUNED').sum()):>6} {best:>8}  {cells}"
        )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe(t) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())


def _plots(rec, study, keys: list[str]) -> list[str]:
    """Optuna's matplotlib plots as artifacts; returns notes for the ones that could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import PedAnovaImportanceEvaluator

    notes = []
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("plots/optuna_history.png", lambda: ovm.plot_optimization_history(study)),
        (
            "plots/param_importances.png",
            lambda: ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator()),
        ),
    ]
    if {"model.init_scale", "optim.lr"} <= set(keys):
        jobs.append(
            (
                "plots/contour_init_scale_lr.png",
                lambda: ovm.plot_contour(study, params=["model.init_scale", "optim.lr"]),
            )
        )
    else:
        notes.append("contour skipped: model.init_scale and optim.lr are not both searched")
    for name, make in jobs:
        try:
            with warnings.catch_warnings():
                # Optuna labels its matplotlib plots experimental (Optuna docs, "optuna.visualization.matplotlib").
                warnings.filterwarnings("ignore", r".*plot_\w+ is experimental", ExperimentalWarning)
                ax = make()
            fig = cast("Figure", (ax.flat[0] if hasattr(ax, "flat") else ax).figure)
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            rec.log_figure(fig, name)
            plt.close(fig)
        except Exception as e:  # too few trials, no variance...: say so rather than fail the sweep
            notes.append(f"{name} skipped: {type(e).__name__}: {e}"[:300])
    return notes


def finalize(rec, study, sw, *, complete: bool, plots: bool = True) -> dict[str, Any]:
    """Write the end-of-sweep record on the parent run ``rec`` (a :class:`~pipeline.tracking.Recorder`)."""
    from mlflow.exceptions import MlflowException

    df = trials_frame(study)
    c = counts(study)
    best = best_trial(study)
    metrics: dict[str, float] = {
        f"trials/{k}": c[k] for k in ("complete", "pruned", "diverged", "fail", "running", "waiting")
    }
    # n_trials as a tag too: the param is the first invocation's (MLflow params cannot change), and a
    # resume may raise the budget (README, "Faults and resuming")
    tags: dict[str, Any] = {
        "n_trials": sw.n_trials,
        "n_trials_done": c["done"],
        "sweep_complete": str(complete).lower(),
    }
    if best is not None:
        metrics.update({"best_value": trial_ratio(best, best.value), "best_trial": best.number})
        best_run = best.user_attrs.get("mlflow_run_id")
        tags.update({"best_trial": best.number, "best_run_id": best_run})
        if best_run:  # its model: pipeline.load_run(best_run_id) (README, "Saved models and resuming")
            tags["best_model_uri"] = f"runs:/{best_run}/model"
        tags.update({f"best_{k}": v for k, v in best.params.items()})
        if complete:
            with contextlib.suppress(MlflowException):  # a resume with a larger n_trials may move the best
                rec.log_params({f"best_{k}": v for k, v in best.params.items()} | {"best_trial": best.number})
    rec.log_metrics(metrics, c["done"])
    rec.set_tags(tags)
    if not df.empty:
        rec.log_frame(df, "trials.parquet")
    notes = _plots(rec, study, [p.key for p in sw.space]) if plots and c["complete"] >= 2 else []
    if notes:
        rec.log_text("\n".join(notes) + "\n", "plots/NOTES.txt")
    rec.flush()
    return {"frame": df, "counts": c, "best": best, "notes": notes}


def print_summary(res: dict[str, Any], sw, mlflow_uri: str, experiment: str, out) -> None:
    """The end-of-sweep lines: counts, the best trial, the table by regime, notes, how to open the UI."""
    best, c = res["best"], res["counts"]
    print(
        f"\nsweep {sw.study}: {c['done']}/{sw.n_trials} done ({c['complete']} complete, of which "
        f"{c['diverged']} diverged; {c['pruned']} pruned; {c['fail']} failed/killed)",
        file=out,
    )
    if best is not None:
        print(
            f"best trial #{best.number}: val/loss_ratio={trial_ratio(best, best.value):.4f} "
            f"regime={best.user_attrs.get('regime')}"
            f" run={best.user_attrs.get('mlflow_run_id')}\n  {describe(best)}",
            file=out,
        )
    else:
        why = "every trial that completed diverged" if c["complete"] else "no trial has completed"
        print(f"best trial: none yet ({why})", file=out)
    print("by regime:\n" + regime_table(res["frame"], sw.base_config().model.cell), file=out)
    for n in res["notes"]:
        print(f"note: {n}", file=out)
    ui = ui_command(mlflow_uri)
    where = f"experiment '{experiment}', run '{parent_run_name(sw.study)}'"
    print(
        f"review in MLflow: {ui}, {where}"  # a tracking server's own UI
        if is_server(mlflow_uri)
        else f"review in MLflow: {ui}   (then open http://127.0.0.1:5000, {where})",
        file=out,
        flush=True,
    )


class Progress:
    """Plain-text progress (logs, CI): a line per trial that ended since the last call, then a status line."""

    def __init__(self, sw: SweepConfig, study, t0: float, out):
        self.sw, self.study, self.t0, self.out = sw, study, t0, out
        self.already_done = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.done_at_start = counts(study)["done"]
        self.printed: set[int] = set()

    def update(self, force: bool = False, stopped: bool = False) -> bool:
        """Print what changed; True when something was printed. ``stopped``: the sweep was stopped by a
        signal, and the status line says so where an ETA would be (it read "ETA 0.8 min" after a Ctrl-C:
        a walkthrough)."""
        trials = self.study.get_trials(deepcopy=False)
        new = [t for t in trials if t.state.is_finished() and t.number not in self.printed]
        for t in sorted(new, key=lambda t: t.number):
            self.printed.add(t.number)
            if t.number in self.already_done:
                continue
            ua = t.user_attrs
            what = ("DIVERGED" if ua.get("diverged") else t.state.name) + (
                f"({ua['pruned_by']})" if ua.get("pruned_by") else ""
            )
            val = f"{t.value:.4f}" if t.value is not None else "-"
            dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_start else 0
            print(
                f"  trial {t.number:>3} {what:<18} value={val:<8} regime={ua.get('regime', '-'):<9} "
                f"{dur:5.0f}s  {describe(t)}",
                file=self.out,
                flush=True,
            )
        if not new and not force:
            return False
        c, best = counts(self.study), best_trial(self.study)
        done_now = c["done"] - self.done_at_start
        elapsed = time.time() - self.t0
        left = max(0, self.sw.n_trials - c["done"])
        eta = f"{left * elapsed / done_now / 60:.1f} min" if done_now > 0 else "?"
        eta = "- (stopped: the same command resumes)" if stopped and left else eta
        b = f"{best.value:.4f} (#{best.number})" if best else "-"
        print(
            f"[{self.sw.study}] {c['done']}/{self.sw.n_trials} done | running {c['running']} | pruned "
            f"{c['pruned']} | diverged {c['diverged']} | failed {c['fail']} | best {b} | "
            f"elapsed {elapsed / 60:.1f} min | ETA {eta}",
            file=self.out,
            flush=True,
        )
        return True
