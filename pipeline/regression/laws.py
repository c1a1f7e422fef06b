"""Check kinds for regression suites: the science as named, parametrised, falsifiable checks.

A suite entry lists checks as one-key mappings, ``- decay_rate_equals: {value: ln(g), tol: 0.1}``; the
suite's ``compare`` list holds checks between entries (``ratio_of_runs``, ``difference_of_runs``). Each
check evaluates to one :class:`Row` of the comparison table (check, baseline, now, band, verdict).

Each kind is one function in the registry :data:`LAWS` (kind -> function), registered with its
parameters (:data:`KINDS`) by :func:`law`. Values may be numbers or small expressions over the entry's
configuration (``ln(g)``, ``(T-1)*log10(sigmoid(b_f))``): :mod:`pipeline.regression.expr`. Everything
here is light (stdlib only): suites are validated before anything heavy is imported or written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.names import DIVERGED, REGIME
from pipeline.regression.expr import evaluate, fmt, names_of, pct, shown
from pipeline.regression.metrics import check_metric, check_tag
from pipeline.schema import ConfigError

PASS, LAW, REGRESSION, NO_BASELINE, ERROR = "pass", "law violated", "REGRESSION", "no baseline", "error"
FAILING = (LAW, REGRESSION, ERROR)

# Upper bounds on bptt/log10_ratio, each a theorem where it is logged: the law that checks one.
BOUNDS = {
    "pascanu_bound_holds": ("spectral/pascanu_log10_bound", "Pascanu's bound"),
    "jacobian_bound_holds": ("spectral/jacobian_log10_bound", "the Jacobian-norm bound"),
}


# ------------------------------------------------------------------------------------------ results


@dataclass
class EntryResult:
    """What a check reads about one entry's run (from the MLflow store, after the run closed)."""

    name: str
    run_id: str | None
    status: str  # FINISHED | FAILED | KILLED | MISSING
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def diverged(self) -> bool:
        return self.tags.get(REGIME) == DIVERGED


@dataclass
class Row:
    check: str
    baseline: str  # the law's target, or the accepted number
    now: str
    band: str
    verdict: str  # pass | law violated | REGRESSION | no baseline | error
    detail: str = ""  # why it failed, in words

    @property
    def failing(self) -> bool:
        return self.verdict in FAILING


# --------------------------------------------------------------------------------------- check kinds


@dataclass(frozen=True)
class Check:
    """One declared check, validated: a law on one entry, or a comparison between entries."""

    kind: str  # a key of LAWS
    params: dict[str, Any]  # as declared; tag_equals' value as the string the tag holds
    entry: str | None  # None: a comparison between entries (suite-level `compare`)
    key: str  # where it was declared, for messages
    names: dict[str, float] = field(default_factory=dict)  # what its expressions may use (expr.names_of)

    @property
    def label(self) -> str:
        what = self.params.get("metric") or self.params.get("tag") or ""
        head = f"{self.entry}: " if self.entry else ""
        return f"{head}{self.kind}" + (f" {what}" if what else "")

    def value(self, name: str) -> float:
        return evaluate(self.params[name], self.names, f"{self.key}.{name}")

    def target(self, name: str) -> str:
        return shown(self.params[name], self.value(name))


Judge = Callable[[Check, dict[str, EntryResult]], Row]

# The registry: kind -> the function that turns recorded results into its table row.
LAWS: dict[str, Judge] = {}
# kind -> (entry-level?, required params, optional params); filled beside LAWS by @law.
KINDS: dict[str, tuple[bool, tuple[str, ...], tuple[str, ...]]] = {}


def law(kind: str, per_entry: bool, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """Register the decorated function as check kind ``kind`` with its parameters."""

    def register(fn: Judge) -> Judge:
        LAWS[kind], KINDS[kind] = fn, (per_entry, required, optional)
        return fn

    return register


def parse_check(item: Any, key: str, entry: str | None, cfg: Config | None, entries: set[str]) -> Check:
    """``{kind: {params}}`` -> validated :class:`Check` (raises ConfigError naming the key)."""
    if not isinstance(item, dict) or len(item) != 1:
        raise ConfigError(key, f"a check is a one-key mapping like {{metric_below: {{...}}}}, got {item!r}")
    kind, params = next(iter(item.items()))
    key = f"{key}.{kind}"
    if kind not in KINDS:
        raise ConfigError(key, f"unknown check kind (allowed: {', '.join(sorted(KINDS))})")
    per_entry, required, optional = KINDS[kind]
    if per_entry != (entry is not None):
        where = "an entry's checks" if per_entry else "the suite's compare list"
        raise ConfigError(key, f"this check kind belongs in {where}")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ConfigError(key, f"parameters must be a mapping, got {params!r}")
    for p in params:
        if p not in required + optional:
            raise ConfigError(f"{key}.{p}", f"unknown parameter (allowed: {', '.join(required + optional)})")
    for p in required:
        if p not in params:
            raise ConfigError(f"{key}.{p}", "missing")
    if kind == "tag_equals":
        v = params["value"]
        if not isinstance(v, (str, int, float)):
            raise ConfigError(
                f"{key}.value", f"must be the tag's value (a string, number or boolean), got {v!r}"
            )
        params = {**params, "value": str(v).lower() if isinstance(v, bool) else str(v)}
    chk = Check(kind, dict(params), entry, key, names_of(cfg))
    _check_params(chk, entries)
    return chk


def _check_types(params: dict[str, Any], key: str) -> None:
    """Names are strings and flags booleans (a string "no" is truthy: it flipped a comparison to a pass)."""
    for p in ("tag", "numerator", "denominator", "a", "b"):  # metric names: check_metric; tags: check_tag
        if p in params and not isinstance(params[p], str):
            raise ConfigError(f"{key}.{p}", f"must be a name, got {params[p]!r}")
    if "diverged_as_inf" in params and not isinstance(params["diverged_as_inf"], bool):
        raise ConfigError(
            f"{key}.diverged_as_inf", f"must be true or false, got {params['diverged_as_inf']!r}"
        )


def _check_params(chk: Check, entries: set[str]) -> None:
    """Metric names, entry names, expressions and bands of a check, before any run."""
    kind, params, key = chk.kind, chk.params, chk.key
    _check_types(params, key)
    for p in ("metric", "denominator_metric"):
        if p in params:
            check_metric(f"{key}.{p}", params[p])
    if "tag" in params:
        check_tag(f"{key}.tag", params["tag"])
    for p in ("numerator", "denominator", "a", "b"):
        if p in params and params[p] not in entries:
            raise ConfigError(
                f"{key}.{p}", f"no entry named {params[p]!r} (entries: {', '.join(sorted(entries))})"
            )
    if kind in ("metric_equals", "decay_rate_equals") and "tol" not in params and "rel" not in params:
        raise ConfigError(key, "needs tol (absolute) and/or rel (relative to the value)")
    for p in ("value", "low", "high", "tol", "rel", "min", "max"):
        if p in params and not (kind == "tag_equals" and p == "value"):
            chk.value(p)  # validates the expression now, before any run
    if kind in ("ratio_of_runs", "difference_of_runs") and "min" not in params and "max" not in params:
        raise ConfigError(key, "needs min and/or max")
    for p in ("tol", "rel"):
        if p in params and chk.value(p) < 0:
            raise ConfigError(f"{key}.{p}", "must be >= 0")


def _metric(r: EntryResult, name: str) -> float | None:
    v = r.metrics.get(name)
    return float(v) if v is not None else None


def _result(chk: Check, results: dict[str, EntryResult]) -> EntryResult:
    """The recorded result of an entry-level check's entry (parse_check: such a check has one)."""
    assert chk.entry is not None, chk.key
    return results[chk.entry]


def _missing(chk: Check, band: str, target: str, what: str) -> Row:
    return Row(chk.label, target, "-", band, LAW, f"{what} was not recorded")


def _law(chk: Check, target: str, now: float | None, band: str, ok: bool, why: str) -> Row:
    return Row(chk.label, target, fmt(now), band, PASS if ok else LAW, "" if ok else why)


def run_check(chk: Check, results: dict[str, EntryResult]) -> Row:
    """Evaluate one law against the runs' recorded results (an entry's run that did not finish: error)."""
    if chk.entry is not None:
        r = results[chk.entry]
        if r.status != "FINISHED" and chk.kind != "finite":
            return Row(chk.label, "-", "-", "-", ERROR, f"run {r.status.lower()}: {r.error or ''}".strip())
    return LAWS[chk.kind](chk, results)


@law("metric_below", True, ("metric", "value"))
@law("metric_above", True, ("metric", "value"))
def _below_above(chk: Check, results: dict[str, EntryResult]) -> Row:
    p = chk.params
    now, lim = _metric(_result(chk, results), p["metric"]), chk.value("value")
    below = chk.kind == "metric_below"
    band = ("< " if below else "> ") + chk.target("value")
    if now is None:
        return _missing(chk, band, "-", p["metric"])
    ok = now < lim if below else now > lim
    return _law(chk, "-", now, band, ok, f"{p['metric']} = {fmt(now)} is not {band}")


@law("metric_between", True, ("metric", "low", "high"))
def _between(chk: Check, results: dict[str, EntryResult]) -> Row:
    p = chk.params
    now, lo, hi = _metric(_result(chk, results), p["metric"]), chk.value("low"), chk.value("high")
    band = f"[{chk.target('low')}, {chk.target('high')}]"
    if now is None:
        return _missing(chk, band, "-", p["metric"])
    return _law(chk, "-", now, band, lo <= now <= hi, f"{p['metric']} = {fmt(now)} is outside {band}")


@law("metric_equals", True, ("metric", "value"), ("tol", "rel"))
@law("decay_rate_equals", True, ("value",), ("tol", "rel"))
def _equals(chk: Check, results: dict[str, EntryResult]) -> Row:
    p = chk.params
    metric = p.get("metric", "bptt/decay_rate")
    now, want = _metric(_result(chk, results), metric), chk.value("value")
    tol = max(chk.value("tol") if "tol" in p else 0.0, chk.value("rel") * abs(want) if "rel" in p else 0.0)
    band = f"±{fmt(tol)}" + (f" ({pct(chk.value('rel'))})" if "rel" in p else "")
    if now is None:
        return _missing(chk, band, chk.target("value"), metric)
    return _law(
        chk,
        chk.target("value"),
        now,
        band,
        abs(now - want) <= tol,
        f"{metric} = {fmt(now)} differs from {chk.target('value')} by {fmt(abs(now - want))} > {fmt(tol)}",
    )


@law("lyapunov_matches_decay", True, ("tol",))
def _lyapunov(chk: Check, results: dict[str, EntryResult]) -> Row:
    r = _result(chk, results)
    rate, lyap, tol = _metric(r, "bptt/decay_rate"), _metric(r, "spectral/lyapunov_max"), chk.value("tol")
    band = f"±{fmt(tol)}"
    if rate is None or lyap is None:
        return _missing(chk, band, "-", "bptt/decay_rate or spectral/lyapunov_max")
    return _law(
        chk,
        f"lyapunov {fmt(lyap)}",
        rate,
        band,
        abs(rate - lyap) <= tol,
        f"decay rate {fmt(rate)} vs Lyapunov exponent {fmt(lyap)}: differ by more than {fmt(tol)}",
    )


@law("pascanu_bound_holds", True, ())
@law("jacobian_bound_holds", True, ())
def _bound(chk: Check, results: dict[str, EntryResult]) -> Row:
    r = _result(chk, results)
    metric, words = BOUNDS[chk.kind]
    now, bound = _metric(r, "bptt/log10_ratio"), _metric(r, metric)
    if now is None or bound is None:
        return _missing(chk, "<= bound", "-", f"bptt/log10_ratio or {metric}")
    # A theorem (Pascanu 2013; for the Jacobian-norm bound, the submultiplicativity of the operator norm
    # along the exact Jacobians): any violation beyond float64 round-off is a bug in the profile.
    return _law(
        chk,
        f"bound {fmt(bound)}",
        now,
        "<= bound",
        now <= bound + 1e-9,
        f"log10 ratio {fmt(now)} exceeds {words} {fmt(bound)}",
    )


@law("finite", True, ())
def _finite(chk: Check, results: dict[str, EntryResult]) -> Row:
    r = _result(chk, results)
    values = {m: _metric(r, m) for m in ("val/loss", "train/loss")}
    # what is wrong, first cause first: the run's end, a divergence, then each loss (val/loss must be there)
    if r.status != "FINISHED":
        now = f"run {r.status.lower()}"
    elif r.diverged:
        now = f"diverged at step {r.tags.get('diverged_step', '?')}"
    elif values["val/loss"] is None:
        now = "val/loss not recorded"
    else:
        now = next(
            (f"{m} = {fmt(v)}" for m, v in values.items() if v is not None and not math.isfinite(v)), "finite"
        )
    ok = now == "finite"
    return Row(chk.label, "finite", now, "-", PASS if ok else LAW, "" if ok else f"training {now}")


@law("tag_equals", True, ("tag", "value"))
def _tag(chk: Check, results: dict[str, EntryResult]) -> Row:
    p = chk.params
    now = _result(chk, results).tags.get(p["tag"])
    return Row(
        chk.label,
        p["value"],
        fmt(now),
        "==",
        PASS if now == p["value"] else LAW,
        "" if now == p["value"] else f"tag {p['tag']} = {now!r}, expected {p['value']!r}",
    )


@law(
    "ratio_of_runs",
    False,
    ("metric", "numerator", "denominator"),
    ("min", "max", "denominator_metric", "diverged_as_inf"),
)
@law("difference_of_runs", False, ("metric", "a", "b"), ("min", "max"))
def _compare(chk: Check, results: dict[str, EntryResult]) -> Row:
    k, p = chk.kind, chk.params
    ratio = k == "ratio_of_runs"
    names = (p["numerator"], p["denominator"]) if ratio else (p["a"], p["b"])
    metrics = (p["metric"], p.get("denominator_metric", p["metric"])) if ratio else (p["metric"], p["metric"])
    label = f"{names[0]} {'/' if ratio else '-'} {names[1]}: {k} {p['metric']}"
    band = " and ".join(f"{'>=' if b == 'min' else '<='} {chk.target(b)}" for b in ("min", "max") if b in p)
    bad = [n for n in names if results[n].status != "FINISHED"]
    if bad:
        return Row(label, "-", "-", band, ERROR, f"run of {bad[0]} {results[bad[0]].status.lower()}")
    a, b = (_metric(results[n], m) for n, m in zip(names, metrics, strict=True))
    as_inf = ratio and p.get("diverged_as_inf") and results[names[0]].diverged
    if as_inf:
        a = math.inf  # the norm went non-finite: that is the unclipped maximum
    # A diverged run stopped early: its metrics describe the weights before the stop, not the configured
    # training, so a comparison with it is not the law's comparison (diverged_as_inf is the one opt-in).
    div = [n for i, n in enumerate(names) if results[n].diverged and not (i == 0 and as_inf)]
    if div:
        step = results[div[0]].tags.get("diverged_step", "?")
        return Row(label, "-", "-", band, LAW, f"run of {div[0]} diverged at step {step}")
    if a is None or b is None:
        return Row(label, "-", "-", band, LAW, f"{metrics[0] if a is None else metrics[1]} was not recorded")
    # over a zero denominator: +-inf by the numerator's sign, and 0/0 undefined (nan: the law fails, as
    # inf/inf does); it read inf for each, so 0/0 and -3/0 met any min band (a mutation review)
    if not ratio:
        now = a - b
    elif b != 0:
        now = a / b
    else:
        now = math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    ok = (
        not math.isnan(now)
        and ("min" not in p or now >= chk.value("min"))
        and ("max" not in p or now <= chk.value("max"))
    )
    return Row(
        label,
        "-",
        fmt(now),
        band,
        PASS if ok else LAW,
        "" if ok else f"{k} = {fmt(now)} ({fmt(a)} vs {fmt(b)}) is not {band}",
    )
