"""Every law kind in :data:`pipeline.regression.laws.KINDS` is shown to fail (README, "The suites and which law lives
where"): one passing and one planted violating result per kind, and a kind added without a planted
violation here fails :func:`test_every_law_kind_has_a_planted_violation`. Then the comparison kinds'
other ways to fail: a band missed on either side, a metric not recorded, a run missing or failed, a run
that diverged.
"""

from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.regression.laws import ERROR, FAILING, KINDS, LAW, PASS, EntryResult, parse_check, run_check

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
