"""``python -m benchmarks``' own flags and its results file (README, "Benchmarks"): bad flags stop before
any bench runs; a run keeps the rows of the benches it did not run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_grid_entries_parse_and_bad_ones_name_the_entry():
    from benchmarks.sweep_bench import parse_grid

    assert parse_grid("1:1:32, 12:64:1024:90") == [(1, 1, 32, None), (12, 64, 1024, 90.0)]
    for bad, needle in [
        ("1:1", "'1:1' is not W:K:N"),
        ("1:1:4:5:6", "is not W:K:N"),
        ("1:0:5", "must be >= 1"),
        ("1:1:5:0", "seconds > 0"),
        ("1:1:5:inf", "seconds > 0"),
        ("", "no entry"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_grid(bad)


def test_a_grid_entry_with_seconds_is_stopped_and_rated_by_what_finished(monkeypatch):
    """``W:K:N:S``: the sweep is stopped by SIGTERM at S seconds; the row counts the trials finished by
    then (fewer than N) over S seconds.

    The test, not a clock, says when S has come: once a trial has finished. A 40-second window under a
    loaded CI machine's make test saw the sweep's start-up and no finished trial (``assert 0 < 0``), so a
    window long enough for every machine would cost minutes here; what is tested is the stop and the
    count, which run the bench's own code from the TimeoutExpired on."""
    from benchmarks import sweep_bench

    spec = sweep_bench._sweep_spec
    window = 600.0  # the nominal S: the stop comes before it (below), so every finish is within it

    def short_trials(*args, **kwargs):  # 20 steps, not the quick bench's 100: the stop, not the trials
        sw = spec(*args, **kwargs)
        sw["base"]["trainer"]["max_steps"] = 20
        return sw

    communicate = subprocess.Popen.communicate
    waited = []

    def s_comes_once_a_trial_finished(self, input=None, timeout=None):
        if timeout != window:  # the wait after the SIGTERM, and every other process
            if "sweep" in self.args and not waited:  # else a 5000-trial sweep runs for hours
                pytest.fail(f"the bench waited for its sweep with timeout={timeout}, not the window S")
            return communicate(self, input, timeout)
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        waited.append(timeout)
        journal = Path(self.args[self.args.index("--config") + 1]).parent / "optuna" / "bench.journal"
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        deadline = time.monotonic() + window - 60
        while time.monotonic() < deadline:
            try:  # read the pipes meanwhile, as the bench's own wait does (a full pipe blocks the sweep)
                return communicate(self, input, 1.0)
            except subprocess.TimeoutExpired:
                pass
            if journal.exists():
                storage = JournalStorage(JournalFileBackend(str(journal)))
                try:
                    trials = optuna.load_study(study_name="bench", storage=storage).get_trials(deepcopy=False)
                except KeyError:  # the study is not created yet
                    trials = []
                if any(t.state in finished for t in trials):
                    break
        raise subprocess.TimeoutExpired(self.args, timeout)

    monkeypatch.setattr(sweep_bench, "_sweep_spec", short_trials)
    monkeypatch.setattr(subprocess.Popen, "communicate", s_comes_once_a_trial_finished)
    (row,) = sweep_bench.run_grid(True, [(1, 2, 5000, window)])
    assert waited == [window]
    assert row["stopped_at_s"] == window and row["wall_s"] == window and row["max_steps"] == 20
    assert 0 < row["trials"] < 5000  # here: 2 (the first stack of 2, finished together)
    assert row["trials_per_hour"] == pytest.approx(row["trials"] * 3600 / window)
    # without the start-up before the first trial's start: a higher rate over the same finished trials
    assert row["trials_per_hour"] < row["trials_per_hour_from_first_start"]


def test_the_rate_from_the_first_start_leaves_the_sweeps_start_up_out():
    from benchmarks.sweep_bench import rate_from_first_start

    # 8 s of start-up, then trials of 2 s back to back from t = 8: 6 finish at 10, 12, ..., 20 s
    starts = [8.0, 10.0, 12.0, 14.0, 16.0, 18.0]
    done = [10.0, 12.0, 14.0, 16.0, 18.0, 20.0]
    assert rate_from_first_start(starts, done, 20.0) == pytest.approx(6 * 3600 / 12)  # 1800/h, not 6 in 20 s
    # a stack of 4 started at 8 s finishing at 18 s, its refill in flight at a stop at 25 s: the 4
    # finished over 17 s, the refill's 4 count for nothing (a lower bound)
    starts = [8.0] * 4 + [18.0] * 4
    assert rate_from_first_start(starts, [18.0] * 4, 25.0) == pytest.approx(4 * 3600 / 17)
    assert rate_from_first_start(starts, [18.0] * 4 + [30.0], 25.0) == pytest.approx(4 * 3600 / 17)
    assert rate_from_first_start([], [], 20.0) == 0.0 and rate_from_first_start([5.0], [], 20.0) == 0.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--only", "sweep", "--sweep-grid", "2:x:4"], "--sweep-grid: '2:x:4' is not W:K:N"),
        (["--only", "train", "--sweep-grid", "1:1:4"], "--sweep-grid: needs the sweep bench"),
        (["--only", "sweep", "--sweep-trials", "0"], "--sweep-trials: must be >= 1"),
        (["--only", "results", "--result-seeds", "0,x"], "--result-seeds: not a comma list of integers"),
        (["--only", "results", "--result-seeds", "1,1"], "--result-seeds: seeds must be distinct"),
    ],
)
def test_bad_bench_flags_stop_before_any_bench(tmp_path, args, needle):
    out = tmp_path / "r.json"
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and needle in p.stderr.strip().splitlines()[-1], p.stderr
    assert p.stdout == "" and not out.exists()


def test_a_run_keeps_the_rows_it_did_not_measure_gpu_ones_too():
    from benchmarks.__main__ import merge

    old = {"train": [1], "sweep": [2], "gpu": {"device": "H200", "stack": [3], "sweep_grid": [4]}}
    new = {"sweep": [5], "gpu": {"device": "H200", "train": [6]}}
    assert merge(old, new) == {
        "train": [1],
        "sweep": [5],
        "gpu": {"device": "H200", "stack": [3], "sweep_grid": [4], "train": [6]},
    }
    assert merge({}, {"stack": [7]}) == {"stack": [7]}


def test_the_record_split_times_every_part_it_names(tmp_path, monkeypatch):
    """``stack_bench --split``: each timer found its function (a renamed one would leave its key out), the
    parts fit in the wall time, and the figures, frames and tags of each member were timed."""
    from benchmarks.stack_bench import record_split
    from pipeline import tracking
    from pipeline.training import record

    monkeypatch.chdir(tmp_path)
    before = (record.record_start, record.record_end, tracking.Recorder.log_figure)
    row = record_split("cpu", 2, 20)
    parts = ["record_start", "record_end", "of which figures", "of which frames", "of which tags"]
    assert all(row[p] > 0 for p in [*parts, "of which close", "training"])
    assert row["of which figures"] + row["of which frames"] + row["of which tags"] < row["record_end"]
    assert row["record_start"] + row["record_end"] + row["training"] == pytest.approx(
        row["s_per_trial"], abs=0.003
    )
    assert (record.record_start, record.record_end, tracking.Recorder.log_figure) == before  # put back


def test_kernel_rows_time_every_kernel_of_a_cell(monkeypatch):
    """``--kernels``: each kernel of the row is timed (the block-diagonal one under each cap), and the
    fused LSTM block is one kernel of K members, not K loops (its plan: one block)."""
    import torch

    from benchmarks.stack_bench import kernel_rows
    from pipeline.training import stack

    planned = []
    real = stack.plan
    monkeypatch.setattr(stack, "plan", lambda models: planned.append(real(models)) or planned[-1])
    threads = torch.get_num_threads()
    try:
        (row,) = kernel_rows("cpu", "lstm", [2], caps=(64,), rounds=1)
    finally:
        torch.set_num_threads(threads)  # kernel_rows on a CPU runs one thread, as a sweep worker
    assert {"separate_ms", "loop_ms", "blockdiag_64_ms"} <= set(row) and row["K"] == 2
    assert all(row[k] > 0 for k in ("separate_ms", "loop_ms", "blockdiag_64_ms"))
    assert [[0, 1]] in planned and [[0], [1]] in planned  # the fused run, and the loop
    assert stack.KERNELS.get("lstm", "loop") == "loop"  # the bench leaves the shipped choice as it was


def test_results_over_seeds_one_row_per_command():
    """`--result-seeds 0,1,2`: each row once per seed (seed=N appended, seed 0 the row as it was), and the
    table a row per command: solved k/n, each seed's first step below, median (range)."""
    from benchmarks.results_table import ROWS, markdown, seeded

    gru = next(r for r in ROWS if r.id == "digits_T64_gru")
    assert seeded(gru, 0) is gru and seeded(gru, 2).args == (*gru.args, "seed=2")

    def res(seed, solved, first, ratio, acc):
        cmd = seeded(gru, seed).command
        return {"cell": "gru", "task": "digits", "T": 64, "steps": 2400, "solved": solved,
                "steps to solve": first, "val/loss_ratio": ratio, "val/accuracy": acc,
                "regime": "vanishing -> healthy", "bptt/log10_ratio": "", "wall (s)": 1, "command": cmd,
                "seed": seed}  # fmt: skip

    md = markdown(
        [res(0, "no", "-", 0.133, 0.93), res(1, "yes", 1900, 0.093, 0.934), res(2, "no", 2300, 0.12, 0.94)]
    )
    row = md.splitlines()[2]
    assert (
        row
        == "| gru | digits | 64 | 2400 | 0,1,2 | 1/3 | -, 1900, 2300 | 0.12 (0.093-0.133) | 0.934 (0.93-0.94) | vanishing -> healthy |"
    )
    assert md.rstrip().splitlines()[-2] == gru.command + " seed=N"
    assert "| 0.133 |" in markdown([res(0, "no", "-", 0.133, 0.93)])  # one seed: the plain table
