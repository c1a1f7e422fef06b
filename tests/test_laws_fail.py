"""Every law kind in :data:`pipeline.regression.laws.KINDS` is shown to fail (README, "The suites and which law lives
where"): one passing and one planted violating result per kind, and a kind added without a planted
violation here fails :func:`test_every_law_kind_has_a_planted_violation`. Then the comparison kinds'
other ways to fail: a band missed on either side, a metric not recorded, a run missing or failed, a run
that diverged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.regression.baselines import baseline_row
from pipeline.regression.judge import judge_entries, judge_perturbed, suite_verdict
from pipeline.regression.laws import (
    ERROR,
    FAILING,
    KINDS,
    LAW,
    PASS,
    REGRESSION,
    EntryResult,
    parse_check,
    run_check,
)
from pipeline.regression.suite import Entry, Suite
from pipeline.schema import ConfigError

NAMES = ("e", "f")


def _r(name="e", status="FINISHED", tags=None, **metrics) -> EntryResult:
    return EntryResult(name, "rid", status, {k.replace("__", "/"): v for k, v in metrics.items()}, tags or {})


def _chk(item):
    kind = next(iter(item))
    entry = "e" if KINDS[kind][0] else None
    return parse_check(item, "k", entry, Config(), set(NAMES))


DIVERGED = {"regime": "diverged", "diverged_step": "7"}

# kind -> (check, results that pass, results that violate it)
CASES = {
    "metric_below": (
        {"metric_below": {"metric": "bptt/log10_ratio", "value": -10}},
        {"e": _r(bptt__log10_ratio=-20)},
        {"e": _r(bptt__log10_ratio=-5)},
    ),
    "metric_above": (
        {"metric_above": {"metric": "val/loss", "value": 0.1}},
        {"e": _r(val__loss=0.16)},
        {"e": _r(val__loss=0.001)},
    ),
    "metric_between": (
        {"metric_between": {"metric": "spectral/lyapunov_max", "low": 0.25, "high": 0.37}},
        {"e": _r(spectral__lyapunov_max=0.3)},
        {"e": _r(spectral__lyapunov_max=0.4)},
    ),
    "metric_equals": (
        {"metric_equals": {"metric": "spectral/sigma_max", "value": "g", "tol": 1e-4}},
        {"e": _r(spectral__sigma_max=1.00005)},
        {"e": _r(spectral__sigma_max=1.001)},
    ),
    "decay_rate_equals": (
        {"decay_rate_equals": {"value": "ln(0.5)", "tol": 0.1}},
        {"e": _r(bptt__decay_rate=-0.65)},
        {"e": _r(bptt__decay_rate=-0.4)},
    ),
    "lyapunov_matches_decay": (
        {"lyapunov_matches_decay": {"tol": 0.05}},
        {"e": _r(bptt__decay_rate=0.30, spectral__lyapunov_max=0.29)},
        {"e": _r(bptt__decay_rate=0.30, spectral__lyapunov_max=0.1)},
    ),
    "pascanu_bound_holds": (
        {"pascanu_bound_holds": {}},
        {"e": _r(bptt__log10_ratio=-20, spectral__pascanu_log10_bound=5)},
        {"e": _r(bptt__log10_ratio=5.001, spectral__pascanu_log10_bound=5)},
    ),
    "jacobian_bound_holds": (
        {"jacobian_bound_holds": {}},
        {"e": _r(bptt__log10_ratio=-14.4, spectral__jacobian_log10_bound=-4.1)},
        {"e": _r(bptt__log10_ratio=-4.0, spectral__jacobian_log10_bound=-4.1)},
    ),
    "finite": ({"finite": {}}, {"e": _r(val__loss=0.1)}, {"e": _r(tags=DIVERGED, val__loss=0.1)}),
    "tag_equals": (
        {"tag_equals": {"tag": "regime", "value": "vanishing"}},
        {"e": _r(tags={"regime": "vanishing"})},
        {"e": _r(tags={"regime": "healthy"})},
    ),
    "ratio_of_runs": (
        {
            "ratio_of_runs": {
                "metric": "grad/max_norm_preclip",
                "numerator": "e",
                "denominator": "f",
                "min": 10,
            }
        },
        {"e": _r(grad__max_norm_preclip=1e4), "f": _r("f", grad__max_norm_preclip=100)},
        {"e": _r(grad__max_norm_preclip=900), "f": _r("f", grad__max_norm_preclip=100)},
    ),
    "difference_of_runs": (
        {"difference_of_runs": {"metric": "bptt/c_log10_ratio", "a": "e", "b": "f", "min": 10}},
        {"e": _r(bptt__c_log10_ratio=-7.7), "f": _r("f", bptt__c_log10_ratio=-20.7)},
        {"e": _r(bptt__c_log10_ratio=-11.0), "f": _r("f", bptt__c_log10_ratio=-20.7)},
    ),
}


def test_every_law_kind_has_a_planted_violation():
    assert set(CASES) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_law_kind_passes_and_fails(kind):
    item, good, bad = CASES[kind]
    chk = _chk(item)
    assert run_check(chk, good).verdict == PASS
    row = run_check(chk, bad)
    assert row.verdict == LAW and row.failing and row.detail  # the reason, in words


# --------------------------------------------------------------------------- comparisons that fail


def _diff(**band):
    return _chk({"difference_of_runs": {"metric": "val/loss_ratio", "a": "e", "b": "f", **band}})


@pytest.mark.parametrize(
    ("band", "a", "b", "ok"),
    [
        ({"min": 0.5}, 0.96, 0.017, True),
        ({"min": 0.5}, 0.40, 0.017, False),  # below min: tanh learned something after all
        ({"min": 0.5}, 0.017, 0.96, False),  # the sign matters: a - b, not |a - b|
        ({"max": 0.1}, 0.30, 0.10, False),  # above max (0.2 > 0.1)
        ({"min": 0.1, "max": 0.3}, 0.30, 0.10, True),
        ({"min": 0.5}, 0.517, 0.017, True),  # exactly at min: inclusive
    ],
)
def test_difference_of_runs_band(band, a, b, ok):
    row = run_check(_diff(**band), {"e": _r(val__loss_ratio=a), "f": _r("f", val__loss_ratio=b)})
    assert row.verdict == (PASS if ok else LAW)
    if not ok:
        assert row.failing and "difference_of_runs" in row.detail


@pytest.mark.parametrize(
    ("results", "verdict", "words"),
    [
        ({"e": _r(), "f": _r("f", val__loss_ratio=0.01)}, LAW, "val/loss_ratio was not recorded"),
        ({"e": _r(val__loss_ratio=1.0), "f": _r("f")}, LAW, "val/loss_ratio was not recorded"),
        (
            {
                "e": EntryResult("e", None, "MISSING", error="no run recorded"),
                "f": _r("f", val__loss_ratio=0.01),
            },
            ERROR,
            "run of e missing",
        ),
        ({"e": _r(val__loss_ratio=1.0), "f": _r("f", status="FAILED")}, ERROR, "run of f failed"),
        # A diverged run stopped early: its numbers describe the weights before the stop (and val/loss the
        # last validation before it), not the configured training. Found by this test: they were compared
        # as if the run had trained (tanh diverging would have "stayed above" GRU and passed).
        (
            {"e": _r(tags=DIVERGED, val__loss_ratio=1.0), "f": _r("f", val__loss_ratio=0.01)},
            LAW,
            "run of e diverged at step 7",
        ),
        (
            {"e": _r(val__loss_ratio=1.0), "f": _r("f", tags=DIVERGED, val__loss_ratio=0.01)},
            LAW,
            "run of f diverged at step 7",
        ),
    ],
)
def test_difference_of_runs_fails_on_a_missing_failed_or_diverged_run(results, verdict, words):
    row = run_check(_diff(min=0.5), results)
    assert row.verdict == verdict and row.failing and verdict in FAILING
    assert words in row.detail


def test_ratio_of_runs_counts_a_diverged_run_only_where_asked():
    """``diverged_as_inf`` is the one opt-in: a diverged numerator counts as an infinite norm; a diverged
    denominator, or a diverged numerator without the option, fails the row."""
    base = {"metric": "grad/max_norm_preclip", "numerator": "e", "denominator": "f", "min": 10}
    opt_in = _chk({"ratio_of_runs": {**base, "diverged_as_inf": True}})
    plain = _chk({"ratio_of_runs": base})
    num_div = {"e": _r(tags=DIVERGED, grad__max_norm_preclip=5), "f": _r("f", grad__max_norm_preclip=100)}
    den_div = {"e": _r(grad__max_norm_preclip=1e4), "f": _r("f", tags=DIVERGED, grad__max_norm_preclip=100)}
    assert run_check(opt_in, num_div).verdict == PASS
    assert run_check(plain, num_div).verdict == LAW
    for chk in (opt_in, plain):
        row = run_check(chk, den_div)
        assert row.verdict == LAW and "run of f diverged" in row.detail


# ------------------------------------------------------ each law's edges (planted mutants must fail)


@pytest.mark.parametrize("sign", [-1, 1])
def test_lyapunov_matches_decay_fails_on_either_side(sign):
    """|rate - lyap| <= tol: a decay rate far *below* the Lyapunov exponent fails as well as one above."""
    chk = _chk({"lyapunov_matches_decay": {"tol": 0.05}})
    row = run_check(chk, {"e": _r(bptt__decay_rate=0.3 + sign * 10 * 0.05, spectral__lyapunov_max=0.3)})
    assert row.verdict == LAW and row.detail


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        ({"val__loss": float("nan"), "train__loss": 0.1}, "val/loss = nan"),
        ({"val__loss": 0.1, "train__loss": float("inf")}, "train/loss = inf"),
        ({"train__loss": 0.1}, "val/loss not recorded"),
    ],
)
def test_finite_fails_a_finished_run_without_a_finite_val_loss(metrics, words):
    """A FINISHED run that did not diverge still violates ``finite`` with a non-finite loss or no val/loss
    (README: "the run finished, did not diverge, and has a finite val/loss")."""
    row = run_check(_chk({"finite": {}}), {"e": _r(**metrics)})
    # the row says which loss, not "run finished" (it did: that is not what failed)
    assert (row.verdict, row.now, row.detail) == (LAW, words, f"training {words}")


@pytest.mark.parametrize("status", ["FAILED", "KILLED", "MISSING"])
def test_finite_fails_a_run_that_did_not_finish(status):
    """``finite`` is evaluated on an unfinished run too (run_check lets it through): a law violation."""
    row = run_check(_chk({"finite": {}}), {"e": _r(status=status, val__loss=0.1, train__loss=0.1)})
    assert row.verdict == LAW and row.now == f"run {status.lower()}"


def test_tag_equals_is_equality_not_containment():
    chk = _chk({"tag_equals": {"tag": "regime", "value": "vanishing"}})
    for now in ("van", "vanish", "vanishing_", ""):
        assert run_check(chk, {"e": _r(tags={"regime": now})}).verdict == LAW, now
    assert run_check(chk, {"e": _r()}).verdict == LAW  # no tag at all


@pytest.mark.parametrize(
    "item",
    [
        {"metric_equals": {"metric": "spectral/sigma_max", "value": 1.0, "tol": 0}},
        {"metric_equals": {"metric": "spectral/sigma_max", "value": 1.0, "rel": 0}},
        {"decay_rate_equals": {"value": "ln(0.5)", "tol": 0, "rel": 0}},
        {"lyapunov_matches_decay": {"tol": 0}},
    ],
)
def test_a_zero_tolerance_is_valid_and_means_exact(item):
    """tol / rel must be >= 0 (laws._check_params): 0 is allowed, and then only equality passes."""
    chk = _chk(item)
    if chk.kind == "lyapunov_matches_decay":
        same, off = (0.25, 0.25), (0.25, 0.2500001)
        rows = [
            run_check(chk, {"e": _r(bptt__decay_rate=a, spectral__lyapunov_max=b)}) for a, b in (same, off)
        ]
    else:
        want = chk.value("value")
        metric = chk.params.get("metric", "bptt/decay_rate").replace("/", "__")
        rows = [run_check(chk, {"e": _r(**{metric: v})}) for v in (want, want + 1e-7)]
    assert [r.verdict for r in rows] == [PASS, LAW]


@pytest.mark.parametrize("key", ["tol", "rel"])
def test_a_negative_tolerance_is_refused(key):
    with pytest.raises(ConfigError, match=rf"k\.metric_equals\.{key}"):
        _chk({"metric_equals": {"metric": "spectral/sigma_max", "value": 1.0, key: -0.1}})


def _ratio(**band):
    return _chk(
        {"ratio_of_runs": {"metric": "grad/max_norm_preclip", "numerator": "e", "denominator": "f", **band}}
    )


@pytest.mark.parametrize(
    ("num", "now", "verdict"),
    [
        (5.0, "inf", PASS),
        (-3.0, "-inf", LAW),
        (0.0, "nan", LAW),
        (float("nan"), "nan", LAW),
    ],  # nan / 0: undefined
)
def test_ratio_of_runs_over_a_zero_denominator_takes_the_numerators_sign(num, now, verdict):
    """Over a denominator of 0 the ratio is +-inf by the numerator's sign (README, "Suite file format"):
    +inf meets any ``min`` and misses any ``max``; -inf meets no ``min``; 0/0 is undefined and fails
    whatever the band. Before, each read inf: 0/0 and -3/0 met a ``min`` of 10."""
    res = {"e": _r(grad__max_norm_preclip=num), "f": _r("f", grad__max_norm_preclip=0.0)}
    row = run_check(_ratio(min=10), res)
    assert (row.verdict, row.now) == (verdict, now)
    assert run_check(_ratio(max=1e300), res).verdict == (PASS if num < 0 else LAW)  # nan < 0 is False


def test_ratio_of_runs_diverged_as_inf_does_not_excuse_a_diverged_denominator():
    """``diverged_as_inf`` opts in the numerator only: both runs diverged is still a violated law."""
    chk = _ratio(min=10, diverged_as_inf=True)
    res = {
        "e": _r(tags=DIVERGED, grad__max_norm_preclip=5),
        "f": _r("f", tags=DIVERGED, grad__max_norm_preclip=1),
    }
    row = run_check(chk, res)
    assert row.verdict == LAW and "run of f diverged at step 7" in row.detail


# The documented side of each threshold (README "Suite file format", check kinds and baseline band): values
# chosen exact in binary so that "at the threshold" is exact.
@pytest.mark.parametrize(
    ("item", "metrics", "verdict"),
    [
        ({"metric_below": {"metric": "val/loss", "value": 0.5}}, {"val__loss": 0.5}, LAW),  # now < value
        ({"metric_above": {"metric": "val/loss", "value": 0.5}}, {"val__loss": 0.5}, LAW),  # now > value
        ({"metric_between": {"metric": "val/loss", "low": 0.25, "high": 0.5}}, {"val__loss": 0.25}, PASS),
        ({"metric_between": {"metric": "val/loss", "low": 0.25, "high": 0.5}}, {"val__loss": 0.5}, PASS),
        ({"metric_equals": {"metric": "val/loss", "value": 1.0, "tol": 0.5}}, {"val__loss": 1.5}, PASS),
        ({"metric_equals": {"metric": "val/loss", "value": 1.0, "tol": 0.5}}, {"val__loss": 0.5}, PASS),
        ({"metric_equals": {"metric": "val/loss", "value": -2.0, "rel": 0.25}}, {"val__loss": -2.5}, PASS),
        ({"decay_rate_equals": {"value": -1.0, "tol": 0.25}}, {"bptt__decay_rate": -1.25}, PASS),
        (
            {"lyapunov_matches_decay": {"tol": 0.25}},
            {"bptt__decay_rate": 0.5, "spectral__lyapunov_max": 0.25},
            PASS,
        ),
        ({"pascanu_bound_holds": {}}, {"bptt__log10_ratio": 5.0, "spectral__pascanu_log10_bound": 5.0}, PASS),
    ],
)
def test_entry_law_at_its_threshold(item, metrics, verdict):
    assert run_check(_chk(item), {"e": _r(**metrics)}).verdict == verdict


@pytest.mark.parametrize("band", [{"min": 2}, {"max": 2}, {"min": 2, "max": 2}])
def test_comparison_at_its_threshold_passes(band):
    """min / max are inclusive (README: "within min/max"; the difference's min already pinned above)."""
    ratio = {"e": _r(grad__max_norm_preclip=10.0), "f": _r("f", grad__max_norm_preclip=5.0)}
    assert run_check(_ratio(**band), ratio).verdict == PASS
    diff = {"e": _r(val__loss_ratio=2.5), "f": _r("f", val__loss_ratio=0.5)}
    assert run_check(_diff(**band), diff).verdict == PASS


# ----------------------------------------------------------------------------------- baseline bands


@pytest.mark.parametrize(
    ("accepted", "now", "verdict"),
    [
        ({"value": 1.0, "abs": 0.5}, 1.5, PASS),  # |now - accepted| <= band: inclusive
        ({"value": 1.0, "abs": 0.5}, 0.5, PASS),
        ({"value": -2.0, "rel": 0.25}, -2.5, PASS),
        ({"value": -5.0, "rel": 0.1}, -5.1, PASS),  # rel x |accepted|: a negative value has a band too
        ({"value": -5.0, "rel": 0.1}, -5.6, REGRESSION),
        ({"value": 1.0, "abs": 0.5}, 1.5000001, REGRESSION),
        # abs and rel together: the wider of the two (here rel's 1.0), not their sum (1.5; a mutation audit)
        ({"value": 10.0, "abs": 0.5, "rel": 0.1}, 11.0, PASS),
        ({"value": 10.0, "abs": 0.5, "rel": 0.1}, 11.2, REGRESSION),
        ({"value": 10.0, "abs": 0.5, "rel": 0.1}, 8.9, REGRESSION),
    ],
)
def test_baseline_band_edges(accepted, now, verdict):
    assert baseline_row("e", "val/loss", _r(val__loss=now), accepted).verdict == verdict


# ------------------------------------------------------------------------ reading an entry's run back


def test_an_entry_run_is_read_back_as_it_recorded_its_metrics(tmp_path):
    """An entry's metrics are read as the run recorded them (``pipeline.as_recorded``, per run): a metric
    whose latest value was NaN (tag ``nonfinite.<metric>``) reads NaN, not the last finite value MLflow
    kept, and +-float64 max reads +-inf. A digits entry that diverged after a validation at 0.8 read
    val/accuracy 0.8 and passed ``metric_above`` and its baseline band (a review); ``finite`` read a NaN
    val/loss as its last finite value."""
    import math
    import sys

    from mlflow.tracking import MlflowClient

    from pipeline.regression.run import collect

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    run = c.create_run(c.create_experiment("regression"))
    rid = run.info.run_id
    for k, v in {
        "val/accuracy": 0.8,
        "val/loss": 0.5,
        "train/loss": 0.4,
        "grad/max_norm_preclip": sys.float_info.max,
    }.items():
        c.log_metric(rid, k, v, step=1)
    c.set_tag(rid, "nonfinite.val/accuracy", "nan")
    c.set_tag(rid, "nonfinite.val/loss", "nan")
    c.set_terminated(rid)
    got = collect(_suite([("e", ())]), {"e": rid}, uri=uri)["e"]
    assert math.isnan(got.metrics["val/accuracy"]) and math.isnan(got.metrics["val/loss"])
    assert got.metrics["train/loss"] == 0.4 and got.metrics["grad/max_norm_preclip"] == math.inf
    above = _chk({"metric_above": {"metric": "val/accuracy", "value": 0.7}})
    assert run_check(above, {"e": got}).verdict == LAW
    finite = _chk({"finite": {}})
    assert run_check(finite, {"e": got}).verdict == LAW
    assert baseline_row("e", "val/accuracy", got, {"value": 0.8, "abs": 0.05}).verdict == REGRESSION


# ------------------------------------------------------------------------ judging a suite's results


def _suite(entries, compare=()):
    cfg = Config()
    return Suite(
        "s", Path("s.yaml"), "", Path("s.baseline.yaml"), tuple(Entry(n, cfg, c) for n, c in entries), compare
    )


def test_judge_entries_includes_the_comparisons():
    bad = _ratio(min=10)
    suite = _suite([("e", ()), ("f", ())], (bad,))
    res = {"e": _r(grad__max_norm_preclip=20.0), "f": _r("f", grad__max_norm_preclip=5.0)}
    rows = judge_entries(suite, res, {})
    assert [r.verdict for r in rows] == [LAW] and rows[0].check.startswith("e / f: ratio_of_runs")
    assert suite_verdict(rows) == "regression"


def test_judge_perturbed_checks_every_law_and_reports_an_unfinished_run():
    ok = _chk({"metric_below": {"metric": "val/loss", "value": 1.0}})
    bad = _chk({"metric_above": {"metric": "val/loss", "value": 1.0}})
    suite = _suite([("e", (ok, bad)), ("f", ())])
    rows = judge_perturbed(suite, {"e": _r(val__loss=0.5)}, "ulp1")
    assert [(r.check, r.verdict) for r in rows] == [
        ("e~ulp1: metric_below val/loss", PASS),
        ("e~ulp1: metric_above val/loss", LAW),
    ]
    rows = judge_perturbed(suite, {"f": _r("f", status="FAILED")}, "ulp1")  # f has no laws of its own
    assert [(r.check, r.verdict) for r in rows] == [("f~ulp1: run", ERROR)]
    assert suite_verdict(rows) == "regression"
