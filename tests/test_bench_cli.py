"""``python -m benchmarks``' own flags and its results file (README, "Benchmarks"): bad flags stop before
any bench runs; a run keeps the rows of the benches it did not run."""

from __future__ import annotations

import subprocess
import sys
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


def test_a_grid_entry_with_seconds_is_stopped_and_rated_by_what_finished():
    """``W:K:N:S``: the sweep is stopped by SIGTERM at S seconds; the row counts the trials finished by
    then (fewer than N) over S seconds."""
    from benchmarks.sweep_bench import run_grid

    (row,) = run_grid(True, [(1, 2, 200, 25.0)])
    assert row["stopped_at_s"] == 25.0 and row["wall_s"] == 25.0
    assert 0 < row["trials"] < 200
    assert row["trials_per_hour"] == pytest.approx(row["trials"] * 3600 / 25.0)
    # the later half's rate, from the journal's completion times: some trial of a 2-member stack of ~4 s
    # trials finishes in [12.5 s, 25 s], and no more than all of them
    assert 0 < row["steady_trials_per_hour"] <= row["trials"] * 3600 / 12.5


def test_the_steady_rate_counts_the_later_half_of_the_run():
    from benchmarks.sweep_bench import steady_rate

    # 10 s of start-up, then one trial a second: the 11 finished at t = 10 ... 20 s all fall in the later
    # half of a 20 s run, 11 trials over 10 s (the whole run's rate would be 11 over 20 s)
    done = [float(t) for t in range(10, 21)]
    assert steady_rate(done, 20.0) == pytest.approx(11 * 3600 / 10)
    assert steady_rate([1.0, 2.0, 3.0], 20.0) == 0.0  # all in the first half
    assert steady_rate([15.0, 25.0], 20.0) == pytest.approx(3600 / 10)  # after the window: not counted


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--only", "sweep", "--sweep-grid", "2:x:4"], "--sweep-grid: '2:x:4' is not W:K:N"),
        (["--only", "train", "--sweep-grid", "1:1:4"], "--sweep-grid: needs the sweep bench"),
        (["--only", "sweep", "--sweep-trials", "0"], "--sweep-trials: must be >= 1"),
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
