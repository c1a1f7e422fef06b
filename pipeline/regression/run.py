"""Regression suites run: fixed, seeded runs checked against laws (the science) and an accepted baseline.

The suite file is read by :mod:`pipeline.regression.suite`. The CLI (:mod:`pipeline.cli.regress`) and
the Airflow DAG (``dags/rnn_gradient_regression.py``) share the functions here:
:func:`start_suite_run` opens the parent MLflow run; :func:`run_entry` trains one entry as a nested run
(:func:`pipeline.regression.pool.run_all` runs them all, in worker processes);
:func:`collect` reads the runs back from the store; :func:`judge_entries` turns them into table rows;
:func:`finish_suite_run` records the verdict. :func:`run_suite` is the CLI's whole flow. The rows and
their text are :mod:`pipeline.regression.judge`'s; the ``--update-baseline`` flow (perturbed reruns,
measured bands, the file) is :mod:`pipeline.regression.update`'s.

Top-level imports stay light (stdlib, yaml, pipeline.config/laws): the DAG and ``--help`` import this.
Run status changes only through :mod:`pipeline.tracking` (``Recorder``, ``end_run``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from pipeline.names import (
    ENTRY,
    HEARTBEAT,
    KIND,
    KIND_REGRESSION,
    OVERRIDES,
    OWNER,
    PERTURBATION,
    ROLE,
    STATUS,
    SUITE,
)
from pipeline.provenance import owner_alive, owner_tag, version_tags
from pipeline.regression.baselines import check_writable, suite_baseline
from pipeline.regression.judge import format_table, judge_entries, suite_verdict
from pipeline.regression.laws import LAW, NO_BASELINE, EntryResult, Row
from pipeline.regression.pool import Say, run_all
from pipeline.regression.suite import EXPERIMENT, Suite, judged_under, with_overrides

ROLE_SUITE, ROLE_ENTRY = "suite", "entry"  # the values of tag ROLE: the parent run, an entry's run
KEY = "regression_key"  # tag: the DAG's idempotency key (suite + data interval) on the parent and entries
# tag on a keyed entry run: what it trained (config_fingerprint). A DAG attempt reuses a FINISHED run of
# its key only when it trained the entry as the suite now says: an edited suite's second attempt of one
# night judged the first attempt's runs against the new file (a platform-team walkthrough)
FINGERPRINT = "regression_fingerprint"

# What `--update-baseline` runs each baselined entry again under, standing in for another machine
# (README, "Baselines that hold on another machine"): another intra-op thread count (other reduction
# orders in the BLAS kernels), and two 1-ulp nudges of every initial weight (the size of the rounding
# difference another CPU or BLAS build makes; in the chaotic phase it grows at the Lyapunov exponent).
PERTURBATIONS: dict[str, tuple[str, ...]] = {
    "threads2": ("trainer.threads=2",),
    "ulp1": ("model.init_ulp_seed=1",),
    "ulp2": ("model.init_ulp_seed=2",),
}

# A command-line regress's parent run carries tag HEARTBEAT, the unix time its process last beat, every
# HEARTBEAT_S; a later regress of the suite closes KILLED the runs of a parent silent for over STALE_S
# whose process it cannot see (another host, another container: README, "What is recorded" under
# "Regression suites"). STALE_S is ten beats, so a store unreachable for a few minutes or clocks a few
# minutes apart do not close a live suite's runs.
HEARTBEAT_S = 60.0
STALE_S = 600.0

# ------------------------------------------------------------------------------------------ running


def _search(client, exp_id: str, flt: str):
    return client.search_runs(
        [exp_id], filter_string=flt, max_results=1000, order_by=["attributes.start_time DESC"]
    )


def config_fingerprint(cfg) -> str:
    """16 hex digits of the SHA-256 of what a run trains: the resolved config less ``tracking`` (where and
    under which name it records)."""
    import hashlib

    data = {k: v for k, v in cfg.to_dict().items() if k != "tracking"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log_suite_files(rec, suite: Suite) -> None:
    rec.log_text(suite.path.read_text(), f"suite/{suite.path.name}")
    if suite.baseline_path.exists():
        rec.log_text(suite.baseline_path.read_text(), f"suite/{suite.baseline_path.name}")


def start_suite_run(
    suite: Suite, key: str | None = None, uri: str | None = None, flag: str = "defaults.tracking.uri"
) -> tuple[str, str]:
    """Create the store and experiment (once, before any worker) and the suite's parent run.

    With ``key`` (the DAG's data interval), an existing parent run with that key is reused, so a
    retried or cleared DAG run does not start a second record; its ``suite/`` files are logged again, as
    they are now (an edited suite's second attempt kept the first's). Returns (parent_run_id,
    experiment_id). ``flag``: what a store error names as giving ``uri``.
    """
    from pipeline.tracking import Recorder, client, ensure_experiment

    uri = uri or suite.uri
    exp_id = ensure_experiment(uri, EXPERIMENT, flag)
    if key:
        found = _search(client(uri), exp_id, f"tags.{KEY} = '{key}' and tags.{ROLE} = '{ROLE_SUITE}'")
        if found:
            rec = Recorder.attach(uri, found[0].info.run_id, reopen=True)
            _log_suite_files(rec, suite)
            return found[0].info.run_id, exp_id
    tags = {KIND: KIND_REGRESSION, SUITE: suite.name, ROLE: ROLE_SUITE, **version_tags()}
    if key:
        tags[KEY] = key
    else:  # a command-line run: a later one closes it KILLED if this process dies (close_dead_runs)
        tags[OWNER], tags[HEARTBEAT] = owner_tag(), str(int(time.time()))
    # a command-line run's name ends in 4 random hex digits, as a training run's does: two runs of one
    # suite started in the same second (two machines, a scheduler's retries) shared a name
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    name = f"regress-{key}" if key else f"regress-{suite.name}-{stamp}"
    rec = Recorder.start(uri, EXPERIMENT, name, tags=tags, experiment_id=exp_id)
    _log_suite_files(rec, suite)
    return rec.run_id, exp_id


@contextlib.contextmanager
def heartbeat(uri: str, run_id: str, every: float | None = None) -> Iterator[None]:
    """Set tag :data:`HEARTBEAT` of ``run_id`` to the unix time every ``every`` seconds
    (:data:`HEARTBEAT_S`) from a daemon thread, while the block runs. A beat the store refuses (locked,
    unreachable) is skipped, not raised: the next one tries again, and the suite goes on."""
    from pipeline.tracking import client

    stop = threading.Event()

    def beat() -> None:
        c = None
        while not stop.wait(HEARTBEAT_S if every is None else every):
            with contextlib.suppress(Exception):  # a missed beat costs nothing until STALE_S
                c = c or client(uri)  # made in the loop: an error here must not end the beats
                c.set_tag(run_id, HEARTBEAT, str(int(time.time())))

    t = threading.Thread(target=beat, name="regress-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5.0)  # a beat inside a slow store call is left to end with the process


def _silent(tags: dict[str, str]) -> bool:
    """A parent run's heartbeat older than :data:`STALE_S`; False without one (an earlier version's run,
    or a DAG's: nothing tells)."""
    try:
        return time.time() - float(tags[HEARTBEAT]) > STALE_S
    except (KeyError, ValueError):
        return False


def close_dead_runs(uri: str, experiment_id: str, suite_name: str) -> int:
    """Close KILLED the runs of suite ``suite_name`` left RUNNING by a command-line ``regress`` that is
    gone (kill -9, OOM, a lost machine or container: it could not close them itself); returns how many.
    Gone: its process on this host is (PID and start time, :func:`pipeline.provenance.owner_alive`), or,
    where that cannot be seen (another host, another PID namespace), the suite's parent run has not beaten
    for :data:`STALE_S` (an entry is judged by its parent's heartbeat). A run of the DAG (keyed: a DAG run's
    parent stays open across its tasks' processes, and its retries close their own leftovers) or without
    an owner is left as it is."""
    from pipeline.tracking import client, end_run

    c = client(uri)
    running = _search(c, experiment_id, f"tags.{SUITE} = '{suite_name}' and attributes.status = 'RUNNING'")
    parents = {r.info.run_id: r.data.tags for r in running}

    def parent_silent(tags: dict[str, str]) -> bool:
        pid = tags.get("mlflow.parentRunId")
        if tags.get(ROLE) == ROLE_SUITE or not pid:
            return _silent(tags)
        if pid not in parents:  # a parent closed under a RUNNING entry: its beats stopped when it closed
            try:
                parents[pid] = c.get_run(pid).data.tags
            except Exception:  # a deleted parent: nothing tells
                parents[pid] = {}
        return _silent(parents[pid])

    n = 0
    for r in running:
        owner = r.data.tags.get(OWNER)
        if KEY in r.data.tags or not owner:
            continue
        alive = owner_alive(owner)
        if alive is None:
            alive = not parent_silent(r.data.tags)
        if alive is not False:
            continue
        c.set_tag(r.info.run_id, STATUS, "killed")
        end_run(uri, r.info.run_id, "KILLED")
        n += 1
    return n


def run_entry(
    suite: Suite,
    name: str,
    parent_run_id: str,
    experiment_id: str,
    key: str | None = None,
    uri: str | None = None,
    overrides: tuple[str, ...] = (),
    perturbation: str | None = None,
) -> str:
    """Train one entry as a run nested under the suite's parent; returns its MLflow run id.

    ``overrides``: dotted ``key=value`` settings applied on top of the entry (``--set``, perturbations);
    ``perturbation``: its label, recorded as tag ``perturbation`` and in the run name (``<suite>/<entry>~label``).
    With ``key``: a FINISHED run of this entry with the same key and :data:`FINGERPRINT` is reused
    (idempotent retries; an entry the suite changed since is trained again);
    runs left RUNNING by a killed attempt are closed as KILLED first. Raises what ``train.run`` raises
    (the run itself is then already closed FAILED or KILLED). ``train.run`` quiets Lightning's
    warnings itself (``pipeline.training.run.quiet_lightning``).
    """
    from pipeline.tracking import client, end_run
    from pipeline.training.run import run

    cfg = with_overrides(suite.entry(name).cfg, overrides)
    if uri:
        cfg = replace(cfg, tracking=replace(cfg.tracking, uri=uri))
    tags = {KIND: KIND_REGRESSION, SUITE: suite.name, ENTRY: name, ROLE: ROLE_ENTRY}
    if overrides:
        tags[OVERRIDES] = " ".join(overrides)
    if perturbation:
        tags[PERTURBATION] = perturbation
        cfg = replace(cfg, tracking=replace(cfg.tracking, run_name=f"{cfg.tracking.run_name}~{perturbation}"))
    if key:
        fingerprint = config_fingerprint(cfg)
        for r in _search(
            client(cfg.tracking.uri), experiment_id, f"tags.{KEY} = '{key}' and tags.{ENTRY} = '{name}'"
        ):
            if r.info.status == "FINISHED" and r.data.tags.get(FINGERPRINT) == fingerprint:
                return r.info.run_id  # FINISHED with another config: trained again as the suite now says
            if r.info.status == "RUNNING":
                end_run(cfg.tracking.uri, r.info.run_id, "KILLED")
        tags[KEY], tags[FINGERPRINT] = key, fingerprint
    else:
        tags[OWNER] = owner_tag()
    run_id = run(cfg, parent_run_id=parent_run_id, experiment_id=experiment_id, extra_tags=tags).run_id
    assert run_id is not None, name  # None only with tracking off, and a suite turns it on (suite.py)
    return run_id


def check_suite_fits(suite: Suite, overrides: tuple[str, ...], workers: int, update: bool = False) -> None:
    """Every override must give a valid config that fits in memory, on an accelerator this machine has,
    before the store is touched."""
    from pipeline.training.budget import check_fits
    from pipeline.training.machine import check_accelerator, check_data

    for e in suite.entries:
        cfg = with_overrides(e.cfg, overrides)
        # a GPU suite on a CPU runner is a misrouted job (exit 2), not a scientific regression: each entry
        # failed in Lightning and the suite read "REGRESSION", exit 1 (a platform-team walkthrough)
        check_accelerator(
            cfg,
            f"entries.{e.name}.trainer.accelerator",
            "run the suite where torch sees a GPU" + ("" if update else ", or --set trainer.accelerator=cpu"),
        )
        check_data(cfg, f"entries.{e.name}.task.name")
        check_fits(cfg, copies=min(workers, len(suite.entries)), what=f"entry {e.name!r} ")


# ------------------------------------------------------------------------------------ compare, record


def collect(
    suite: Suite,
    run_ids: dict[str, str | None],
    parent_run_id: str | None = None,
    uri: str | None = None,
    perturbation: str | None = None,
) -> dict[str, EntryResult]:
    """Read each entry's run back from the store: status, final metrics, tags (what was recorded).

    With ``perturbation``, only the entries in ``run_ids`` (the ones run under it) are read.
    """
    from pipeline.recorded import recorded_metrics
    from pipeline.tracking import client

    c = client(uri or suite.uri)
    out = {}
    for e in suite.entries:
        if perturbation and e.name not in run_ids:
            continue
        rid = run_ids.get(e.name)
        if rid is None and parent_run_id:  # a run that failed before returning its id
            exp = c.get_run(parent_run_id).info.experiment_id
            now = config_fingerprint(e.cfg)  # not an earlier attempt's run of an entry since edited
            found = [
                r
                for r in _search(
                    c, exp, f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.{ENTRY} = '{e.name}'"
                )
                if r.data.tags.get(PERTURBATION) == perturbation
                and r.data.tags.get(FINGERPRINT) in (None, now)
            ]
            rid = found[0].info.run_id if found else None
        if rid is None:
            out[e.name] = EntryResult(e.name, None, "MISSING", error="no run recorded")
            continue
        r = c.get_run(rid)
        # a metric whose latest value was NaN reads NaN, not the last finite value MLflow kept: a digits
        # entry that diverged after a validation at 0.8 read val/accuracy 0.8 and passed (a review)
        metrics = recorded_metrics(r.data.metrics, r.data.tags)
        out[e.name] = EntryResult(
            e.name, rid, r.info.status, metrics, dict(r.data.tags), r.data.tags.get("error")
        )
    return out


def finish_suite_run(
    suite: Suite, parent_run_id: str, rows: list[Row], uri: str | None = None, status: str = "FINISHED"
) -> str:
    """Table and verdict onto the parent run (artifacts regression/table.txt and .json), then close it."""
    from pipeline.tracking import Recorder

    rec = Recorder(uri or suite.uri, parent_run_id, "")
    v = suite_verdict(rows)
    try:
        rec.log_text(format_table(rows) + "\n", "regression/table.txt")
        rec.log_text(json.dumps([r.__dict__ for r in rows], indent=1), "regression/table.json")
        failing = [r for r in rows if r.failing]
        rec.log_metrics(
            {
                "regression/checks": len(rows),
                "regression/failed": len(failing),
                "regression/laws_violated": sum(r.verdict == LAW for r in rows),
            },
            0,
        )
        rec.set_tags({"verdict": v, "failed_checks": "; ".join(r.check for r in failing)[:4900]})
    finally:
        rec.close(status)
    return v


# ------------------------------------------------------------------------------- the CLI's flows


@dataclass(frozen=True)
class Outcome:
    """What one ``regress`` invocation ended with."""

    parent_run_id: str
    rows: list[Row]
    verdict: str | None  # None: --update-baseline refused (the parent run is already closed)

    @property
    def missing(self) -> int:
        return sum(r.verdict == NO_BASELINE for r in self.rows)


def run_suite(
    suite: Suite,
    baseline: dict,
    uri: str,
    workers: int = 1,
    overrides: tuple[str, ...] = (),
    update: bool = False,
    say: Say = print,
) -> Outcome:
    """Open the parent run, run every entry, judge them (and with ``update`` accept a new baseline), record.

    Prints the table through ``say``. Any exception closes the parent run KILLED (an interrupt) or FAILED.
    """
    from pipeline.signals import Terminated
    from pipeline.tracking import Recorder, end_run

    if update:
        check_writable(suite.baseline_path)  # before any entry runs (the CLI checks first, naming its flag)
    parent, exp_id = start_suite_run(suite)
    closed = close_dead_runs(uri, exp_id, suite.name)
    if closed:
        say(
            f"closed {closed} run(s) of suite {suite.name} as KILLED: left RUNNING by a regress whose process "
            f"is gone (on this host) or silent for over {STALE_S / 60:g} minutes (another host or container)"
        )
    if overrides:
        Recorder(uri, parent, exp_id).set_tags({OVERRIDES: " ".join(overrides)})
    with heartbeat(uri, parent):  # a later regress on another host or container tells this one is gone
        try:
            ids = run_all(suite, parent, exp_id, workers=workers, progress=say, overrides=overrides)
            results = collect(suite, {n: rid for n, (rid, _) in ids.items()}, parent)
            for n, (_, err) in ids.items():
                if err and results[n].error is None:
                    results[n].error = err
            judged = judged_under(suite, overrides)  # the laws' g, T, ... of the configs the runs trained
            rows = judge_entries(judged, results, baseline)
            if update:
                from pipeline.regression.update import update_baseline

                if (
                    update_baseline(suite, baseline, results, rows, parent, exp_id, uri, workers, say)
                    is not None
                ):
                    return Outcome(parent, rows, None)
                rows = judge_entries(judged, results, suite_baseline(suite))
            else:
                say(format_table(rows))
        except BaseException as e:
            killed = isinstance(e, (KeyboardInterrupt, SystemExit, Terminated))
            end_run(uri, parent, "KILLED" if killed else "FAILED")
            raise
        return Outcome(parent, rows, finish_suite_run(suite, parent, rows))
