"""Check values: a number, or a small arithmetic expression over the entry's configuration.

``ln(g)``, ``(T-1)*log10(sigmoid(b_f))``: numbers, the names of :data:`NAMES` (from the entry's
config, :func:`names_of`), ``+ - * / **``, unary minus and the one-argument functions of :data:`FUNCS`.
Parsed with :mod:`ast` and walked here; no other Python is evaluated. Stdlib only: suites are
validated before anything heavy is imported.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from pipeline.config import Config
from pipeline.schema import ConfigError

FUNCS: dict[str, Callable[[float], float]] = {
    "ln": math.log,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "abs": abs,
    "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)),
}
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


def names_of(cfg: Config | None) -> dict[str, float]:
    """The names an expression may use, from the entry's configuration."""
    if cfg is None:
        return {}
    return {
        "g": cfg.model.init_scale,
        "T": float(cfg.task.seq_len),
        "H": float(cfg.model.hidden_size),
        "b_f": cfg.model.forget_bias,
        "lr": cfg.optim.lr,
        "c": cfg.clip.threshold,
        "steps": float(cfg.trainer.max_steps),
        # the lru's ring (model.r_min, model.r_max): at r_min = r_max = r the profile is r^(T-1)
        "r_min": cfg.model.r_min,
        "r_max": cfg.model.r_max,
    }


NAMES = tuple(names_of(Config()))


def evaluate(expr: Any, names: dict[str, float], key: str) -> float:
    """A number, or an arithmetic expression over :data:`NAMES` and :data:`FUNCS` (no other Python)."""
    if isinstance(expr, bool) or not isinstance(expr, (int, float, str)):
        raise ConfigError(key, f"must be a number or an expression, got {expr!r}")
    if not isinstance(expr, str):
        return float(expr)
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ConfigError(key, f"cannot parse expression {expr!r}") from None
    try:
        v = _Walk(expr, names, key).value(tree)
    except ConfigError:
        raise  # the walk's own message (a ConfigError is a ValueError: it was wrapped in a second one)
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(key, f"expression {expr!r} is undefined ({e})") from None
    return v


class _Walk:
    """One expression's tree walk; any node outside the grammar above is a ConfigError naming ``key``."""

    def __init__(self, expr: str, names: dict[str, float], key: str):
        self.expr, self.names, self.key = expr, names, key

    def value(self, node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return self.value(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                raise ConfigError(
                    self.key, f"unknown name {node.id!r} in {self.expr!r} (allowed: {', '.join(self.names)})"
                )
            return float(self.names[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            v = _BINOPS[type(node.op)](self.value(node.left), self.value(node.right))
            if isinstance(v, complex):  # a negative base to a fractional power: Python's ** answers complex
                raise ValueError("not a real number")
            return v
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FUNCS
            and len(node.args) == 1
            and not node.keywords
        ):
            return float(FUNCS[node.func.id](self.value(node.args[0])))
        raise ConfigError(
            self.key,
            f"unsupported expression {self.expr!r} (numbers, {', '.join(self.names)}, "
            f"+ - * / **, {', '.join(FUNCS)})",
        )


def shown(expr: Any, value: float) -> str:
    """A target as the table shows it: the number, or ``expr = number``."""
    return fmt(value) if not isinstance(expr, str) else f"{expr} = {fmt(value)}"


def fmt(v: Any) -> str:
    """A table cell: ``-`` for nothing, 4 significant digits, nan / inf / -inf spelled out."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def pct(fraction: float) -> str:
    """A relative band as a percentage, to 3 significant digits: ``.0%`` printed a band of 1e-3 as "0%",
    which reads as an exact one (a platform-team walkthrough)."""
    return f"{100 * fraction:.3g}%"
