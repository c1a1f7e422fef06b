"""The regime verdict: thresholds as documented, edge cases of the profile."""

import math

import pytest

from pipeline.config import DiagnosticsConfig
from pipeline.diagnostics import verdict

D = DiagnosticsConfig()


@pytest.mark.parametrize("diverged, ratio, norm, want", [
    (True, 0.0, 1.0, "diverged"),
    (False, -3.5, 1.0, "vanishing"),
    (False, -2.9, 1.0, "healthy"),
    (False, 3.1, 1.0, "exploding"),
    (False, 0.0, 1001.0, "exploding"),   # large gradients over training even if the final profile is flat
    (False, -10.0, 5000.0, "exploding"),  # explosion wins over vanishing: it is what hurt the run
    (False, -math.inf, 1.0, "vanishing"),  # nothing reaches step 1 (dead relu units)
    (False, math.nan, 1.0, "vanishing"),   # nothing reaches either end
    (False, math.inf, 1.0, "exploding"),
    (False, None, None, "healthy"),
])
def test_verdict(diverged, ratio, norm, want):
    assert verdict(diverged, ratio, norm, D) == want


def test_thresholds_are_config():
    d = DiagnosticsConfig(vanish_log10=-1.0, explode_log10=1.0, explode_norm=10.0)
    assert verdict(False, -1.5, 1.0, d) == "vanishing"
    assert verdict(False, 1.5, 1.0, d) == "exploding"
    assert verdict(False, 0.0, 11.0, d) == "exploding"
