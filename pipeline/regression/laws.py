"""Check kinds for regression suites: the science as named, parametrised, falsifiable checks.

A suite entry lists checks as one-key mappings, ``- decay_rate_equals: {value: ln(g), tol: 0.1}``; the
suite's ``compare`` list holds checks between entries (``ratio_of_runs``, ``difference_of_runs``). Each
check evaluates to one :class:`Row` of the comparison table (check, baseline, now, band, verdict).

Values may be numbers or small expressions over the entry's configuration (``ln(g)``,
``(T-1)*log10(sigmoid(b_f))``); see :data:`NAMES` and :data:`FUNCS`. Everything here is light
(stdlib only): suites are validated before anything heavy is imported or written.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.schema import ConfigError

PASS, LAW, REGRESSION, NO_BASELINE, ERROR = "pass", "law violated", "REGRESSION", "no baseline", "error"
FAILING = (LAW, REGRESSION, ERROR)

# Public metric names a check may read (README, "The MLflow record"); gate variants match METRIC_PATTERN.
KNOWN_METRICS = frozenset({
    "train/loss", "val/loss", "val/loss_ratio", "val/best_loss", "task/baseline", "train/steps",
    "grad/norm_preclip", "grad/norm_postclip", "grad/clip_coef", "grad/clip_rate", "grad/max_norm_preclip",
    "grad/norm_input", "grad/norm_recurrent", "grad/norm_bias", "grad/norm_readout",
    "bptt/log10_ratio", "bptt/decay_rate", "bptt/horizon", "bptt/c_log10_ratio", "bptt/reference_max_err",
    "spectral/sigma_max", "spectral/radius", "spectral/pascanu_log10_bound", "spectral/lyapunov_max",
})
METRIC_PATTERN = re.compile(r"^spectral/(sigma_max|radius)_[a-z]+$")


def check_metric(key: str, name: Any) -> str:
    if not isinstance(name, str) or not (name in KNOWN_METRICS or METRIC_PATTERN.match(name)):
        raise ConfigError(key, f"unknown metric {name!r} (known: {', '.join(sorted(KNOWN_METRICS))})")
    return name


# ------------------------------------------------------------------------------------- expressions

FUNCS = {"ln": math.log, "log": math.log, "log10": math.log10, "exp": math.exp, "sqrt": math.sqrt,
         "abs": abs, "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x))}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}


def names_of(cfg: Config | None) -> dict[str, float]:
    """The names an expression may use, from the entry's configuration."""
    if cfg is None:
        return {}
    return {"g": cfg.model.init_scale, "T": float(cfg.task.seq_len), "H": float(cfg.model.hidden_size),
            "b_f": cfg.model.forget_bias, "lr": cfg.optim.lr, "c": cfg.clip.threshold,
            "steps": float(cfg.trainer.max_steps)}


NAMES = tuple(names_of(Config()))


def evaluate(expr: Any, names: dict[str, float], key: str) -> float:
    """A number, or an arithmetic expression over :data:`NAMES` and :data:`FUNCS` (no other Python)."""
    if isinstance(expr, bool):
        raise ConfigError(key, f"must be a number or an expression, got {expr!r}")
    if isinstance(expr, (int, float)):
        return float(expr)
    if not isinstance(expr, str):
        raise ConfigError(key, f"must be a number or an expression, got {expr!r}")

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise ConfigError(key, f"unknown name {node.id!r} in {expr!r} (allowed: {', '.join(names)})")
            return float(names[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCS \
                and len(node.args) == 1 and not node.keywords:
            return float(FUNCS[node.func.id](ev(node.args[0])))
        raise ConfigError(key, f"unsupported expression {expr!r} (numbers, {', '.join(names)}, + - * / **, "
                               f"{', '.join(FUNCS)})")

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ConfigError(key, f"cannot parse expression {expr!r}") from None
    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(key, f"expression {expr!r} is undefined ({e})") from None


def shown(expr: Any, value: float) -> str:
    return fmt(value) if not isinstance(expr, str) else f"{expr} = {fmt(value)}"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


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
        return self.tags.get("regime") == "diverged"


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


@dataclass
class Check:
    kind: str
    params: dict[str, Any]
    entry: str | None  # None: a comparison between entries (suite-level `compare`)
    key: str  # where it was declared, for messages
    names: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        what = self.params.get("metric") or self.params.get("tag") or ""
        head = f"{self.entry}: " if self.entry else ""
        return f"{head}{self.kind}" + (f" {what}" if what else "")

    def value(self, name: str) -> float:
        return evaluate(self.params[name], self.names, f"{self.key}.{name}")

    def target(self, name: str) -> str:
        return shown(self.params[name], self.value(name))


# kind -> (entry-level?, required params, optional params)
KINDS: dict[str, tuple[bool, tuple[str, ...], tuple[str, ...]]] = {
    "metric_below": (True, ("metric", "value"), ()),
    "metric_above": (True, ("metric", "value"), ()),
    "metric_between": (True, ("metric", "low", "high"), ()),
    "metric_equals": (True, ("metric", "value"), ("tol", "rel")),
    "decay_rate_equals": (True, ("value",), ("tol", "rel")),
    "lyapunov_matches_decay": (True, ("tol",), ()),
    "pascanu_bound_holds": (True, (), ()),
    "finite": (True, (), ()),
    "tag_equals": (True, ("tag", "value"), ()),
    "ratio_of_runs": (False, ("metric", "numerator", "denominator"),
                      ("min", "max", "denominator_metric", "diverged_as_inf")),
    "difference_of_runs": (False, ("metric", "a", "b"), ("min", "max")),
}


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
    chk = Check(kind, dict(params), entry, key, names_of(cfg))
    for p in ("metric", "denominator_metric"):
        if p in params:
            check_metric(f"{key}.{p}", params[p])
    for p in ("numerator", "denominator", "a", "b"):
        if p in params and params[p] not in entries:
            raise ConfigError(f"{key}.{p}", f"no entry named {params[p]!r} (entries: {', '.join(sorted(entries))})")
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
    if kind == "tag_equals":
        chk.params["value"] = str(params["value"]).lower() if isinstance(params["value"], bool) \
            else str(params["value"])
    return chk


def _metric(r: EntryResult, name: str) -> float | None:
    v = r.metrics.get(name)
    return float(v) if v is not None else None


def _missing(chk: Check, band: str, target: str, what: str) -> Row:
    return Row(chk.label, target, "-", band, LAW, f"{what} was not recorded")


def _law(chk: Check, target: str, now: float | None, band: str, ok: bool, why: str) -> Row:
    return Row(chk.label, target, fmt(now), band, PASS if ok else LAW, "" if ok else why)


def run_check(chk: Check, results: dict[str, EntryResult]) -> Row:
    """Evaluate one law against the runs' recorded results."""
    k, p = chk.kind, chk.params
    if chk.entry is not None:
        r = results[chk.entry]
        if r.status != "FINISHED" and k != "finite":
            return Row(chk.label, "-", "-", "-", ERROR, f"run {r.status.lower()}: {r.error or ''}".strip())
    if k in ("metric_below", "metric_above"):
        now, lim = _metric(r, p["metric"]), chk.value("value")
        below = k == "metric_below"
        band = ("< " if below else "> ") + chk.target("value")
        if now is None:
            return _missing(chk, band, "-", p["metric"])
        ok = now < lim if below else now > lim
        return _law(chk, "-", now, band, ok, f"{p['metric']} = {fmt(now)} is not {band}")
    if k == "metric_between":
        now, lo, hi = _metric(r, p["metric"]), chk.value("low"), chk.value("high")
        band = f"[{chk.target('low')}, {chk.target('high')}]"
        if now is None:
            return _missing(chk, band, "-", p["metric"])
        return _law(chk, "-", now, band, lo <= now <= hi, f"{p['metric']} = {fmt(now)} is outside {band}")
    if k in ("metric_equals", "decay_rate_equals"):
        metric = p.get("metric", "bptt/decay_rate")
        now, want = _metric(r, metric), chk.value("value")
        tol = max(chk.value("tol") if "tol" in p else 0.0, chk.value("rel") * abs(want) if "rel" in p else 0.0)
        band = f"±{fmt(tol)}" + (f" ({chk.value('rel'):.0%})" if "rel" in p else "")
        if now is None:
            return _missing(chk, band, chk.target("value"), metric)
        return _law(chk, chk.target("value"), now, band, abs(now - want) <= tol,
                    f"{metric} = {fmt(now)} differs from {chk.target('value')} by {fmt(abs(now - want))} > {fmt(tol)}")
    if k == "lyapunov_matches_decay":
        rate, lyap, tol = _metric(r, "bptt/decay_rate"), _metric(r, "spectral/lyapunov_max"), chk.value("tol")
        band = f"±{fmt(tol)}"
        if rate is None or lyap is None:
            return _missing(chk, band, "-", "bptt/decay_rate or spectral/lyapunov_max")
        return _law(chk, f"lyapunov {fmt(lyap)}", rate, band, abs(rate - lyap) <= tol,
                    f"decay rate {fmt(rate)} vs Lyapunov exponent {fmt(lyap)}: differ by more than {fmt(tol)}")
    if k == "pascanu_bound_holds":
        now, bound = _metric(r, "bptt/log10_ratio"), _metric(r, "spectral/pascanu_log10_bound")
        if now is None or bound is None:
            return _missing(chk, "<= bound", "-", "bptt/log10_ratio or spectral/pascanu_log10_bound")
        # A theorem (Pascanu 2013): any violation beyond float64 round-off is a bug in the profile.
        return _law(chk, f"bound {fmt(bound)}", now, "<= bound", now <= bound + 1e-9,
                    f"log10 ratio {fmt(now)} exceeds Pascanu's bound {fmt(bound)}")
    if k == "finite":
        ok = r.status == "FINISHED" and not r.diverged and all(
            math.isfinite(_metric(r, m)) for m in ("val/loss", "train/loss") if _metric(r, m) is not None)
        ok = ok and r.metrics.get("val/loss") is not None
        now = "finite" if ok else (f"diverged at step {r.tags.get('diverged_step', '?')}" if r.diverged
                                   else f"run {r.status.lower()}")
        return Row(chk.label, "finite", now, "-", PASS if ok else LAW, "" if ok else f"training {now}")
    if k == "tag_equals":
        now = r.tags.get(p["tag"])
        return Row(chk.label, p["value"], fmt(now), "==", PASS if now == p["value"] else LAW,
                   "" if now == p["value"] else f"tag {p['tag']} = {now!r}, expected {p['value']!r}")
    return _compare(chk, results)


def _compare(chk: Check, results: dict[str, EntryResult]) -> Row:
    k, p = chk.kind, chk.params
    names = (p["numerator"], p["denominator"]) if k == "ratio_of_runs" else (p["a"], p["b"])
    metrics = (p["metric"], p.get("denominator_metric", p["metric"])) if k == "ratio_of_runs" \
        else (p["metric"], p["metric"])
    label = f"{names[0]} {'/' if k == 'ratio_of_runs' else '-'} {names[1]}: {k} {p['metric']}"
    band = " and ".join(f"{'>=' if b == 'min' else '<='} {chk.target(b)}" for b in ("min", "max") if b in p)
    bad = [n for n in names if results[n].status != "FINISHED"]
    if bad:
        return Row(label, "-", "-", band, ERROR, f"run of {bad[0]} {results[bad[0]].status.lower()}")
    a, b = (_metric(results[n], m) for n, m in zip(names, metrics, strict=True))
    as_inf = k == "ratio_of_runs" and p.get("diverged_as_inf") and results[names[0]].diverged
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
    if k == "ratio_of_runs":
        now = a / b if b != 0 else math.inf
    else:
        now = a - b
    ok = ("min" not in p or now >= chk.value("min")) and ("max" not in p or now <= chk.value("max"))
    return Row(label, "-", fmt(now), band, PASS if ok else LAW,
               "" if ok else f"{k} = {fmt(now)} ({fmt(a)} vs {fmt(b)}) is not {band}")
