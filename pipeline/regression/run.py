"""Regression suites: fixed, seeded runs checked against laws (the science) and an accepted baseline.

A suite file (``configs/regression/*.yaml``) is a list of entries; each entry is a training config
(an optional base file plus an inline patch, same keys as ``configs/train``) and its checks (laws,
:mod:`pipeline.regression.laws`) and the metrics whose accepted values live in the baseline file beside it,
with a tolerance band each. The CLI (:mod:`pipeline.cli.regress`) and the Airflow DAG
(``dags/rnn_gradient_regression.py``) share the functions here: :func:`load_suite` validates
everything before any store is touched; :func:`start_suite_run` opens the parent MLflow run;
:func:`run_entry` trains one entry as a nested run; :func:`collect` reads the runs back from the
store; :func:`evaluate` turns them into table rows; :func:`finish_suite_run` records the verdict.

Top-level imports stay light (stdlib, yaml, pipeline.config/laws): the DAG and ``--help`` import this.
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import Config, from_dict
from pipeline.regression.baselines import (
    baseline_diff,
    baseline_row,
    load_baseline,
    new_baseline,
    parse_band,
    write_baseline,
)
from pipeline.regression.laws import FAILING, LAW, EntryResult, Row, check_metric, parse_check
from pipeline.schema import ConfigError, as_mapping, deep_merge, parse_overrides, read_yaml

EXPERIMENT = "regression"
KIND_TAG = "pipeline.kind"
SUITE_KEYS = ("name", "description", "include", "baseline", "defaults", "entries", "compare")
ENTRY_KEYS = ("name", "config", "patch", "checks", "baseline")
ROOT = Path(__file__).resolve().parents[1]

# What `--update-baseline` runs each baselined entry again under, standing in for another machine
# (README, "Baselines that hold on another machine"): another intra-op thread count (other reduction
# orders in the BLAS kernels), and two 1-ulp nudges of every initial weight (the size of the rounding
# difference another CPU or BLAS build makes; in the chaotic phase it grows at the Lyapunov exponent).
PERTURBATIONS: dict[str, tuple[str, ...]] = {
    "threads2": ("trainer.threads=2",),
    "ulp1": ("model.init_ulp_seed=1",),
    "ulp2": ("model.init_ulp_seed=2",),
}


@dataclass
class Entry:
    name: str
    cfg: Config
    checks: list = field(default_factory=list)
    bands: dict[str, Any] = field(default_factory=dict)  # metric -> laws.Band
    # Where its accepted numbers live: None for the suite's own baseline file; an included suite's
    # entries keep theirs (one source of truth: smoke's numbers are smoke.baseline.yaml's, in nightly too).
    baseline_path: Path | None = None


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    baseline_path: Path
    entries: list[Entry]
    compare: list = field(default_factory=list)

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise ConfigError("entry", f"no entry named {name!r} in suite {self.name}")

    @property
    def uri(self) -> str | None:
        return self.entries[0].cfg.tracking.uri


# ------------------------------------------------------------------------------------------ loading


def _resolve(p: str, base: Path) -> Path:
    """Paths in a suite are relative to the suite file, else to the repository root."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    for cand in (base / path, ROOT / path):
        if cand.exists():
            return cand
    return base / path


def _is_name(s: str) -> bool:
    """Names go into MLflow filter strings and run names: keep them to letters, digits, _ - ."""
    return bool(s) and all(c.isalnum() or c in "_-." for c in s)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], key: str = "--set") -> Config:
    """``cfg`` with dotted ``key=value`` overrides applied and validated (ConfigError names ``key``)."""
    if not overrides:
        return cfg
    try:
        return from_dict(deep_merge(cfg.to_dict(), parse_overrides(list(overrides))))
    except ConfigError as e:
        raise ConfigError(key, str(e)) from None


def _entry_config(raw: dict, defaults: dict, suite_dir: Path, suite: str, name: str, key: str) -> Config:
    data: dict[str, Any] = {}
    if raw.get("config") is not None:
        if not isinstance(raw["config"], str):
            raise ConfigError(f"{key}.config", f"must be a path, got {raw['config']!r}")
        try:
            data = read_yaml(_resolve(raw["config"], suite_dir))
        except ConfigError as e:
            raise ConfigError(f"{key}.config", str(e)) from None
    data = deep_merge(deep_merge(data, defaults), as_mapping(raw.get("patch"), f"{key}.patch"))
    # Regression runs always land in experiment `regression`, named <suite>/<entry> (README, "The MLflow record").
    data = deep_merge(data, {"tracking": {"experiment": EXPERIMENT, "enabled": True,
                                          "run_name": f"{suite}/{name}"}})
    try:
        return from_dict(data)
    except ConfigError as e:
        msg = str(e).split(": ", 1)[1] if e.key else str(e)
        raise ConfigError(f"{key}.{e.key}" if e.key else key, msg) from None


def _included(data: dict, path: Path, seen: tuple[Path, ...]) -> list[Suite]:
    """``include: [smoke.yaml]``: entries and comparisons of other suites, run under this suite's name."""
    inc = data.get("include") or []
    inc = [inc] if isinstance(inc, str) else inc
    if not isinstance(inc, list) or not all(isinstance(p, str) for p in inc):
        raise ConfigError("include", f"must be a suite path or a list of them, got {inc!r}")
    out = []
    for j, p in enumerate(inc):
        sub = _resolve(p, path.parent)
        if sub.resolve() in seen:
            raise ConfigError(f"include[{j}]", f"{p} includes itself")
        try:
            out.append(load_suite(sub, seen))
        except ConfigError as e:
            raise ConfigError(f"include[{j}]", f"{p}: {e}") from None
    return out


def load_suite(path: str | Path, _seen: tuple[Path, ...] = ()) -> Suite:
    """Read and validate a suite file; raises :class:`ConfigError` naming the first bad key."""
    path = Path(path)
    data = read_yaml(path)
    for k in data:
        if k not in SUITE_KEYS:
            raise ConfigError(k, f"unknown key (allowed at the top of a suite: {', '.join(SUITE_KEYS)})")
    name = data.get("name", path.name.split(".")[0])
    if not isinstance(name, str) or not _is_name(name):
        raise ConfigError("name", f"must be a name of letters, digits, _ - . (got {name!r})")
    defaults = as_mapping(data.get("defaults"), "defaults")
    raw_entries = data.get("entries") or []
    if not isinstance(raw_entries, list) or not (raw_entries or data.get("include")):
        raise ConfigError("entries", "must be a non-empty list of entries")
    names: list[str] = []
    for i, raw in enumerate(raw_entries):
        if not isinstance(raw, dict):
            raise ConfigError(f"entries[{i}]", f"must be a mapping, got {raw!r}")
        n = raw.get("name")
        if not isinstance(n, str) or not _is_name(n):
            raise ConfigError(f"entries[{i}].name", f"must be a name of letters, digits, _ - . (got {n!r})")
        if n in names:
            raise ConfigError(f"entries[{i}].name", f"duplicate entry name {n!r}")
        names.append(n)
    included = _included(data, path, (*_seen, path.resolve()))
    inherited = [e for sub in included for e in sub.entries]
    for sub in included:
        for e in sub.entries:
            e.baseline_path = e.baseline_path or sub.baseline_path
    for e in inherited:
        if e.name in names:
            raise ConfigError(f"entries.{e.name}.name", "duplicate entry name (also in an included suite)")
        names.append(e.name)
        e.cfg = replace(e.cfg, tracking=replace(e.cfg.tracking, run_name=f"{name}/{e.name}"))
    known = set(names)
    entries = list(inherited)
    for raw in raw_entries:
        key = f"entries.{raw['name']}"
        for k in raw:
            if k not in ENTRY_KEYS:
                raise ConfigError(f"{key}.{k}", f"unknown key (allowed in an entry: {', '.join(ENTRY_KEYS)})")
        cfg = _entry_config(raw, defaults, path.parent, name, raw["name"], key)
        checks = raw.get("checks") or []
        if not isinstance(checks, list):
            raise ConfigError(f"{key}.checks", "must be a list of checks")
        bands = {}
        for metric, band in as_mapping(raw.get("baseline"), f"{key}.baseline").items():
            check_metric(f"{key}.baseline.{metric}", metric)
            bands[metric] = parse_band(band, f"{key}.baseline.{metric}")
        entries.append(Entry(raw["name"], cfg, [parse_check(c, f"{key}.checks[{j}]", raw["name"], cfg, known)
                                                 for j, c in enumerate(checks)], bands))
    compare = data.get("compare") or []
    if not isinstance(compare, list):
        raise ConfigError("compare", "must be a list of checks")
    checks = [c for sub in included for c in sub.compare]
    checks += [parse_check(c, f"compare[{j}]", None, None, known) for j, c in enumerate(compare)]
    uris = {e.cfg.tracking.uri for e in entries}
    if len(uris) > 1:
        raise ConfigError("defaults.tracking.uri", "all entries of a suite must use one tracking store")
    bpath = data.get("baseline", f"{path.name.split('.')[0]}.baseline.yaml")
    if not isinstance(bpath, str):
        raise ConfigError("baseline", f"must be a path, got {bpath!r}")
    return Suite(name.strip(), path, str(data.get("description", "")).strip(),
                 path.parent / Path(bpath).expanduser(), entries, checks)


# ------------------------------------------------------------------------------------------ running


def _search(client, exp_id: str, flt: str):
    return client.search_runs([exp_id], filter_string=flt, max_results=1000, order_by=["attributes.start_time DESC"])


def start_suite_run(suite: Suite, key: str | None = None, uri: str | None = None) -> tuple[str, str]:
    """Create the store and experiment (once, before any worker) and the suite's parent run.

    With ``key`` (the DAG's data interval), an existing parent run with that key is reused, so a
    retried or cleared DAG run does not start a second record. Returns (parent_run_id, experiment_id).
    """
    from pipeline.tracking import Recorder, client, ensure_experiment, version_tags

    uri = uri or suite.uri
    exp_id = ensure_experiment(uri, EXPERIMENT)
    if key:
        found = _search(client(uri), exp_id, f"tags.regression_key = '{key}' and tags.regression_role = 'suite'")
        if found:
            client(uri).update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id, exp_id
    tags = {KIND_TAG: "regression", "suite": suite.name, "regression_role": "suite", **version_tags()}
    if key:
        tags["regression_key"] = key
    name = f"regress-{key}" if key else f"regress-{suite.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    rec = Recorder.start(uri, EXPERIMENT, name, tags=tags, experiment_id=exp_id)
    rec.log_text(suite.path.read_text(), f"suite/{suite.path.name}")
    if suite.baseline_path.exists():
        rec.log_text(suite.baseline_path.read_text(), f"suite/{suite.baseline_path.name}")
    return rec.run_id, exp_id


def quiet() -> None:
    """Warnings a suite run would print once per entry and that say nothing about the science."""
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*num_workers.*")


def run_entry(suite: Suite, name: str, parent_run_id: str, experiment_id: str, key: str | None = None,
              uri: str | None = None, overrides: tuple[str, ...] = (), perturbation: str | None = None) -> str:
    """Train one entry as a run nested under the suite's parent; returns its MLflow run id.

    ``overrides``: dotted ``key=value`` settings applied on top of the entry (``--set``, perturbations);
    ``perturbation``: its label, recorded as tag ``perturbation`` and in the run name (``<suite>/<entry>~label``).
    With ``key``: a FINISHED run of this entry with the same key is reused (idempotent retries);
    runs left RUNNING by a killed attempt are closed as KILLED first. Raises what ``train.run`` raises
    (the run itself is then already closed FAILED or KILLED).
    """
    from pipeline.tracking import client
    from pipeline.training.run import run

    quiet()
    entry = suite.entry(name)
    cfg = with_overrides(entry.cfg, overrides)
    if uri:
        cfg = replace(cfg, tracking=replace(cfg.tracking, uri=uri))
    tags = {KIND_TAG: "regression", "suite": suite.name, "entry": name, "regression_role": "entry"}
    if overrides:
        tags["overrides"] = " ".join(overrides)
    if perturbation:
        tags["perturbation"] = perturbation
        cfg = replace(cfg, tracking=replace(cfg.tracking, run_name=f"{cfg.tracking.run_name}~{perturbation}"))
    if key:
        c = client(cfg.tracking.uri)
        for r in _search(c, experiment_id, f"tags.regression_key = '{key}' and tags.entry = '{name}'"):
            if r.info.status == "FINISHED":
                return r.info.run_id
            if r.info.status == "RUNNING":
                c.set_terminated(r.info.run_id, status="KILLED")
        tags["regression_key"] = key
    return run(cfg, parent_run_id=parent_run_id, experiment_id=experiment_id, extra_tags=tags).run_id


def _entry_worker(suite_path: str, name: str, parent_run_id: str, experiment_id: str, uri: str | None,
                  overrides: tuple[str, ...] = (), perturbation: str | None = None):
    """Process-pool target (spawn): returns (name, run_id or None, error or None)."""
    try:
        return name, run_entry(load_suite(suite_path), name, parent_run_id, experiment_id, uri=uri,
                               overrides=overrides, perturbation=perturbation), None
    except Exception as e:  # the run is closed FAILED by train.run; report and let the others go on
        return name, None, f"{type(e).__name__}: {e}"


def cost(e: Entry) -> float:
    """Rough relative cost (steps x T x H x gates) to start the longest entries first."""
    gates = {"lstm": 4, "gru": 3}.get(e.cfg.model.cell, 1)
    return e.cfg.trainer.max_steps * e.cfg.task.seq_len * e.cfg.model.hidden_size * gates


def run_all(suite: Suite, parent_run_id: str, experiment_id: str, workers: int = 1, uri: str | None = None,
            progress=print, entries: list[str] | None = None, overrides: tuple[str, ...] = (),
            perturbation: str | None = None) -> dict[str, tuple[str | None, str | None]]:
    """Run every entry, or those named in ``entries`` (``workers`` spawned processes, or in-process for 1).

    Returns {name: (run_id, error)}. ``overrides`` and ``perturbation`` go to :func:`run_entry`.
    """
    import time

    out: dict[str, tuple[str | None, str | None]] = {}
    chosen = [e for e in suite.entries if entries is None or e.name in entries]
    order = sorted(chosen, key=cost, reverse=True) if workers > 1 else chosen
    t0, n = time.time(), len(order)
    label = f" ~{perturbation}" if perturbation else ""
    args = (parent_run_id, experiment_id, uri, tuple(overrides), perturbation)

    def done(name, run_id, err):
        out[name] = (run_id, err)
        progress(f"  [{len(out)}/{n}] {name}{label}: {'ok' if err is None else 'FAILED: ' + err} "
                 f"({time.time() - t0:.0f} s)")

    if workers <= 1:
        for e in order:
            done(*_entry_worker(str(suite.path), e.name, *args))
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futs = [pool.submit(_entry_worker, str(suite.path), e.name, *args) for e in order]
        try:
            for f in cf.as_completed(futs):
                done(*f.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # workers close their runs as KILLED
            raise
    return out


def baselined(suite: Suite) -> list[str]:
    """The suite's own entries with a baseline metric: the ones ``--update-baseline`` runs perturbed.

    Entries of an included suite are accepted in that suite's own baseline file, not here.
    """
    return [e.name for e in suite.entries if e.bands and e.baseline_path is None]


def suite_baseline(suite: Suite) -> dict[str, dict[str, dict[str, float]]]:
    """Accepted numbers for every entry: the suite's own file, and each included suite's file for its entries."""
    own = load_baseline(suite.baseline_path)
    out = {e.name: own[e.name] for e in suite.entries if e.baseline_path is None and e.name in own}
    files: dict[Path, dict] = {}
    for e in suite.entries:
        if e.baseline_path is not None:
            if e.baseline_path not in files:
                files[e.baseline_path] = load_baseline(e.baseline_path)
            if e.name in files[e.baseline_path]:
                out[e.name] = files[e.baseline_path][e.name]
    return out


# ------------------------------------------------------------------------------------ compare, record


def collect(suite: Suite, run_ids: dict[str, str | None], parent_run_id: str | None = None,
            uri: str | None = None, perturbation: str | None = None) -> dict[str, EntryResult]:
    """Read each entry's run back from the store: status, final metrics, tags (what was recorded).

    With ``perturbation``, only the entries in ``run_ids`` (the ones run under it) are read.
    """
    from pipeline.tracking import client

    c = client(uri or suite.uri)
    out = {}
    for e in suite.entries:
        if perturbation and e.name not in run_ids:
            continue
        rid = run_ids.get(e.name)
        if rid is None and parent_run_id:  # a run that failed before returning its id
            exp = c.get_run(parent_run_id).info.experiment_id
            found = [r for r in _search(c, exp, f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                f"and tags.entry = '{e.name}'")
                     if r.data.tags.get("perturbation") == perturbation]
            rid = found[0].info.run_id if found else None
        if rid is None:
            out[e.name] = EntryResult(e.name, None, "MISSING", error="no run recorded")
            continue
        r = c.get_run(rid)
        out[e.name] = EntryResult(e.name, rid, r.info.status, dict(r.data.metrics), dict(r.data.tags),
                                  r.data.tags.get("error"))
    return out


def evaluate(suite: Suite, results: dict[str, EntryResult], baseline: dict) -> list[Row]:
    """All rows: each entry's laws, then its baseline metrics, then the comparisons between entries."""
    from pipeline.regression.laws import run_check

    rows = []
    for e in suite.entries:
        r = results[e.name]
        if r.status != "FINISHED":
            rows.append(Row(f"{e.name}: run", "FINISHED", r.status, "-", "error", r.error or ""))
        rows += [run_check(c, results) for c in e.checks]
        rows += [baseline_row(e.name, m, r, baseline.get(e.name, {}).get(m)) for m in e.bands]
    rows += [run_check(c, results) for c in suite.compare]
    return rows


def evaluate_perturbed(suite: Suite, results: dict[str, EntryResult], label: str) -> list[Row]:
    """The entry-level laws of the entries run under perturbation ``label``, rows marked ``entry~label``.

    A baseline is only accepted if every law also holds under the perturbations: a law that holds on
    one machine's rounding alone would fail on the next machine.
    """
    from pipeline.regression.laws import run_check

    rows = []
    for e in suite.entries:
        if e.name not in results:
            continue
        r = results[e.name]
        if r.status != "FINISHED":
            rows.append(Row(f"{e.name}~{label}: run", "FINISHED", r.status, "-", "error", r.error or ""))
        for c in e.checks:
            row = run_check(c, results)
            rows.append(replace(row, check=row.check.replace(f"{e.name}: ", f"{e.name}~{label}: ", 1)))
    return rows


def verdict(rows: list[Row]) -> str:
    return "regression" if any(r.failing for r in rows) else "pass"


def format_table(rows: list[Row]) -> str:
    head = ("check", "baseline", "now", "band", "verdict")
    cells = [head] + [(r.check, r.baseline, r.now, r.band, r.verdict) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = ["  ".join(c[i].ljust(w[i]) for i in range(5)).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    bad = [r for r in rows if r.failing]
    if bad:
        lines += ["", "failures:"] + [f"  {r.verdict}: {r.check}: {r.detail}" for r in bad]
    return "\n".join(lines)


def finish_suite_run(suite: Suite, parent_run_id: str, rows: list[Row], uri: str | None = None,
                     status: str = "FINISHED") -> str:
    """Table and verdict onto the parent run (artifacts regression/table.txt and .json), then close it."""
    import json

    from pipeline.tracking import Recorder

    rec = Recorder(uri or suite.uri, parent_run_id, "")
    v = verdict(rows)
    try:
        rec.log_text(format_table(rows) + "\n", "regression/table.txt")
        rec.log_text(json.dumps([r.__dict__ for r in rows], indent=1), "regression/table.json")
        failing = [r for r in rows if r.failing]
        rec.log_metrics({"regression/checks": len(rows), "regression/failed": len(failing),
                         "regression/laws_violated": sum(r.verdict == LAW for r in rows)}, 0)
        rec.set_tags({"verdict": v, "failed_checks": "; ".join(r.check for r in failing)[:4900]})
    finally:
        rec.close(status)
    return v


__all__ = ["FAILING", "PERTURBATIONS", "Entry", "Suite", "load_suite", "with_overrides", "baselined", "suite_baseline", "load_baseline", "new_baseline", "write_baseline",
           "baseline_diff", "start_suite_run", "run_entry", "run_all", "collect", "evaluate", "verdict",
           "evaluate_perturbed", "format_table", "finish_suite_run"]
