"""Airflow 3 DAG: the nightly scientific regression suite (laws + accepted baseline), recorded in MLflow.

prepare_stores -> run_entry (one mapped task per suite entry) -> compare -> publish_report

* Orchestration only: the work is :mod:`pipeline.regression` (the same code as ``make regress``),
  imported inside the tasks, so parsing this file costs stdlib + airflow only.
* Idempotent per data interval: the MLflow parent run and every entry's run carry the tag
  ``regression_key`` (suite + data interval, or the run id for runs without one); a retried or cleared
  task reuses a FINISHED run with its key instead of training again.
* XCom carries run ids and the verdict, never metrics or tables (those live in MLflow).
* Retries on the tasks that touch stores or train (transient store errors); a configuration error
  (bad suite file, bad baseline file) raises AirflowFailException: no retry. A regression or violated
  law fails ``publish_report`` (no retry) after the report is written.

Configuration (README, "The Airflow DAG", "Deploying it"):
  Airflow Variables, read inside tasks (environment ``AIRFLOW_VAR_<NAME>`` works too):
    rnn_regression_suite         suite file or shipped suite name (default: configs/regression/nightly.yaml
                                 of this checkout)
    rnn_regression_tracking_uri  MLflow URI (default: $MLFLOW_TRACKING_URI, else
                                 sqlite:///$AIRFLOW_HOME/rnn_regression/mlflow.db)
    rnn_regression_report_dir    report folder (default: $AIRFLOW_HOME/rnn_regression/reports)
  Read at parse time from the environment only (parsing must not query the metadata DB):
    AIRFLOW_VAR_RNN_REGRESSION_SCHEDULE        cron, preset, or none for manual runs only (default "@daily")
    AIRFLOW_VAR_RNN_REGRESSION_ENTRY_TIMEOUT   minutes one run_entry attempt may take (default 60)
    AIRFLOW_VAR_RNN_REGRESSION_MAX_PARALLEL    run_entry tasks running at once per DAG run (default 2)
  DAG params (trigger with config): ``suite`` overrides the Variable for one run.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, Variable, dag, task
from airflow.sdk.exceptions import AirflowFailException, AirflowTimetableInvalid

DAG_ID = "rnn_gradient_regression"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SUITE = "configs/regression/nightly.yaml"
SCHEDULE_VAR = "AIRFLOW_VAR_RNN_REGRESSION_SCHEDULE"
_schedule = os.environ.get(SCHEDULE_VAR, "@daily")
# "none": manual triggers only (Airflow's schedule=None), for a team that triggers the suite itself
SCHEDULE = None if _schedule.strip().lower() == "none" else _schedule


# A training task that hangs (a stuck store, a deadlocked BLAS) fails after this and is retried, instead
# of holding a worker slot forever. The slowest nightly entry, lem_T100_learns, takes about 15 min on a
# quiet core and 30 on a loaded one (README, "The suites and which law lives where"), so an hour per
# entry leaves twice the loaded time; a slower worker raises it with the variable below.
def _env_number(name: str, default: str, kind: type) -> float:
    """A parse-time setting, > 0: anything else is a broken DAG naming the variable, in one line (0 tasks
    at once would never start an entry and, one run at a time, block every later night; a timeout of 0
    or less failed each entry at once)."""
    raw = os.environ.get(name, default)
    try:
        value = kind(raw)
        if kind is float:
            timedelta(minutes=value)  # a huge one overflows there, naming nothing
    except (ValueError, OverflowError):
        value = None
    if value is None or not value > 0 or value != value or value == float("inf"):
        what = "an integer" if kind is int else "a number of minutes"
        raise ValueError(f"{name} must be {what} > 0, got {raw!r}")
    return value


ENTRY_TIMEOUT = timedelta(minutes=_env_number("AIRFLOW_VAR_RNN_REGRESSION_ENTRY_TIMEOUT", "60", float))
# Each entry trains with one intra-op thread: more at once than the worker's cores only oversubscribes them.
MAX_PARALLEL = int(_env_number("AIRFLOW_VAR_RNN_REGRESSION_MAX_PARALLEL", "2", int))


def _home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser()


def _settings(context) -> dict:
    """Suite path and tracking URI for this run (param > Variable > default), validated early."""
    from pipeline.schema import ConfigError

    suite = (context["params"].get("suite") or Variable.get("rnn_regression_suite", DEFAULT_SUITE)).strip()
    path = Path(suite).expanduser()
    if not path.is_absolute():
        path = REPO / path  # relative paths are relative to the repository holding this DAG
    if not path.exists() and "/" not in suite and "\\" not in suite:
        # a shipped suite's name, as `regress --suite smoke` takes it (it read "config file not found:
        # <repo>/smoke", without the names known: a platform-team walkthrough)
        from pipeline.presets import resolve

        try:
            path = Path(resolve(suite, "regression", "suite"))
        except ConfigError as e:
            raise AirflowFailException(f"error: {e}") from None
    variable = Variable.get("rnn_regression_tracking_uri", "")
    uri, source = (
        (variable, "Variable rnn_regression_tracking_uri")
        if variable
        else (os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI")
        if os.environ.get("MLFLOW_TRACKING_URI")
        else (f"sqlite:///{_home() / 'rnn_regression' / 'mlflow.db'}", "the default store")
    )
    return {"suite": str(path), "uri": uri, "uri_from": source}


def _key(context, suite_name: str) -> str:
    """The idempotency key: suite + data interval (scheduled runs), else the DAG run id (manual runs)."""
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is not None and end is not None:  # @daily in Airflow 3 is a trigger timetable: start == end
        span = start.isoformat() if start == end else f"{start.isoformat()}..{end.isoformat()}"
        return f"{suite_name}@{span}"
    return f"{suite_name}@{context['run_id']}"


def _load(path: str):
    """Suite and baseline, or AirflowFailException (a config error does not get better by retrying)."""
    from pipeline.regression.baselines import suite_baseline
    from pipeline.regression.suite import load_suite
    from pipeline.schema import ConfigError

    try:
        suite = load_suite(path)
        return suite, suite_baseline(suite)
    except ConfigError as e:
        raise AirflowFailException(f"error: {e}") from None


# The tasks are defined at module level and wired inside the DAG function (Airflow's TaskFlow API
# allows either); each task's id is its function name.


@task
def prepare_stores(**context) -> list[dict]:
    """Validate the suite, create the MLflow store + experiment once, open (or reuse) the parent run.

    Returns one small job (names and ids only) per entry: the list the run tasks are mapped over.
    """
    from pipeline.regression.run import start_suite_run
    from pipeline.schema import ConfigError
    from pipeline.uris import check_tracking_uri

    s = _settings(context)
    try:  # a mistyped store does not get better by retrying (it was retried for 4 minutes: a walkthrough)
        check_tracking_uri(s["uri_from"], s["uri"])
    except ConfigError as e:
        raise AirflowFailException(f"error: {s['uri_from']}: {e.message}") from None
    suite, _ = _load(s["suite"])
    key = _key(context, suite.name)
    parent, exp_id = start_suite_run(suite, key=key, uri=s["uri"], flag=s["uri_from"])
    shared = {**s, "key": key, "parent_run_id": parent, "experiment_id": exp_id}
    return [{**shared, "entry": e.name} for e in suite.entries]


@task(
    retries=2,
    retry_delay=timedelta(minutes=1),
    execution_timeout=ENTRY_TIMEOUT,
    max_active_tis_per_dagrun=MAX_PARALLEL,
    map_index_template="{{ task.op_kwargs['job']['entry'] }}",
)
def run_entry(job: dict) -> dict:
    """Train one entry (nested MLflow run); reuse it if this key already has a FINISHED run."""
    from pipeline.regression.run import run_entry as run_one

    suite, _ = _load(job["suite"])
    try:
        run_id = run_one(
            suite, job["entry"], job["parent_run_id"], job["experiment_id"], key=job["key"], uri=job["uri"]
        )
    except Exception as e:
        # Lightning's verdict on the config (e.g. accelerator: gpu without a GPU) will not change on retry.
        if type(e).__name__ == "MisconfigurationException":
            raise AirflowFailException(f"{job['entry']}: {e}") from e
        raise
    return {"entry": job["entry"], "run_id": run_id}


# all done, one at least a success: runs when entries failed (their rows say so), not when prepare_stores
# did (it failed again, "prepare_stores produced no jobs", after an "XCom not found" line: a walkthrough)
@task(trigger_rule="all_done_min_one_success")
def compare(jobs: list[dict], runs) -> dict:
    """Laws + baseline over what the store recorded; table and verdict onto the parent run.

    Runs even when some entries failed (their rows say so); entries without a returned run id
    are looked up in the store under the parent run.
    """
    from pipeline.regression.run import collect, finish_suite_run, judge_entries

    if not jobs:
        raise AirflowFailException("prepare_stores produced no jobs")
    prep = jobs[0]
    suite, baseline = _load(prep["suite"])
    # One slice request (iterating a lazy XCom sequence probes past its end and logs a 404).
    ids = {r["entry"]: r["run_id"] for r in (runs[:] if runs is not None else []) if r}
    results = collect(suite, ids, prep["parent_run_id"], uri=prep["uri"])
    rows = judge_entries(suite, results, baseline)
    verdict = finish_suite_run(suite, prep["parent_run_id"], rows, uri=prep["uri"])
    return {
        "verdict": verdict,
        "parent_run_id": prep["parent_run_id"],
        "failing": [f"{r.verdict}: {r.check}: {r.detail}" for r in rows if r.failing],
    }


@task
def publish_report(jobs: list[dict], summary: dict) -> str:
    """Write the table from MLflow to the report folder (one file per key); fail on a regression."""
    import re
    import tempfile

    from pipeline.tracking import client

    prep = jobs[0]
    out = Path(Variable.get("rnn_regression_report_dir", "") or _home() / "rnn_regression" / "reports")
    out = out / re.sub(r"[^A-Za-z0-9_.@-]+", "_", prep["key"])
    out.mkdir(parents=True, exist_ok=True)
    c = client(prep["uri"])
    # beside report.md, as the README says (MLflow keeps the artifact's folder: it was regression/table.txt)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        got = c.download_artifacts(prep["parent_run_id"], "regression/table.txt", tmp)
        table = out / "table.txt"
        os.replace(got, table)
    text = table.read_text()
    report = out / "report.md"
    report.write_text(
        f"# Regression {prep['key']}: {summary['verdict'].upper()}\n\n"
        f"MLflow parent run `{prep['parent_run_id']}` at `{prep['uri']}`\n\n```\n{text}```\n"
    )
    print(text)
    if summary["verdict"] != "pass":
        raise AirflowFailException(
            f"{len(summary['failing'])} failing check(s): " + "; ".join(summary["failing"])[:2000]
        )
    return str(report)


@dag(
    dag_id=DAG_ID,
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["rnn-gradients", "regression"],
    params={
        "suite": Param(
            "",
            type="string",
            description="suite file or shipped suite name for this run; empty: Variable rnn_regression_suite",
        )
    },
    default_args={"owner": "rnn-gradients", "retries": 2, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
)
def rnn_gradient_regression():
    jobs = prepare_stores()
    runs = run_entry.expand(job=jobs)
    publish_report(jobs, compare(jobs, runs))


the_dag = rnn_gradient_regression()
try:
    the_dag.timetable.validate()  # as the DagBag does after the import, whose error is kept as it is
except AirflowTimetableInvalid as e:
    # Airflow's own words named neither the variable nor the value ("Exactly 5, 6 or 7 columns has to be
    # specified for iterator expression." for a mistyped "@dialy": a platform-team walkthrough)
    raise ValueError(
        f"{SCHEDULE_VAR} must be a cron expression ('0 3 * * *'), a preset (@daily, @hourly, @weekly, ...) "
        f"or none, got {_schedule!r}: {e}"
    ) from None
