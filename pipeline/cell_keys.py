"""Which model keys each cell reads (README, "Models"): the notes ``train`` and ``sweep`` print for a key set
away from its default that no model of the run reads.

Setting such a key is no error (a file shared by cells, a sweep whose cells differ), but a teacher's
``model.init_scale=3`` at ``init: default`` trained the same network as g = 1 without a word.
tests/test_models.py checks every claim here against the models' own outputs. Floor module: it imports
only :mod:`pipeline.config` and :mod:`pipeline.names`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pipeline.config import Config, ModelConfig
from pipeline.names import CELLS

_G_AT_DEFAULT = ("orthogonal",)  # W_hh = g Q whatever model.init (README, "Models")
_MODERN_INIT = ("lru", "mingru", "lem", "cornn")  # their own inits: no W_hh scheme, no g


def reads_key(cell: str, init: str, key: str) -> bool:
    """Whether a model of ``cell`` with ``model.init = init`` reads ``model.<key>`` (every key but the
    cell-specific ones is read by every cell)."""
    if key == "init_scale":
        return cell in _G_AT_DEFAULT or (cell not in _MODERN_INIT and init != "default")
    only = {
        "forget_bias": ("lstm",),
        "r_min": ("lru",),
        "r_max": ("lru",),
        "max_phase": ("lru",),
        "dt": ("lem", "cornn"),
        "gamma": ("cornn",),
        "epsilon": ("cornn",),
    }
    return cell in only.get(key, (cell,))


DEFAULT_G = 3**-0.5  # PyTorch's U(-1/sqrt(H), 1/sqrt(H)) has variance 1/(3H): the g of N(0, g^2/H)
_TORCH_INIT = ("tanh", "relu", "lstm", "gru")  # init: default keeps nn.RNN/LSTM/GRU's own W_hh


def effective_scale(cell: str, init: str, init_scale: float) -> float | None:
    """The scale g W_hh was drawn at: ``model.init_scale`` where the model reads it, 1/sqrt(3) for
    PyTorch's own init (``init: default`` of tanh, relu, lstm and gru), None where no g describes the
    recurrence (indrnn's default u ~ U(0, 1), the modern cells' own inits). Figures and the report's
    phase diagram put a run at this g: a teacher's run at ``init: default`` with ``init_scale: 3``,
    which trains PyTorch's init, was titled and placed at g=3 as vanishing (a teacher's review)."""
    if reads_key(cell, init, "init_scale"):
        return init_scale
    return DEFAULT_G if cell in _TORCH_INIT and init == "default" else None


def unused_model_keys(m: ModelConfig) -> list[str]:
    """Notes on the model keys set away from their defaults that this cell and init do not read."""
    default = ModelConfig()
    notes = []
    for f in dataclasses.fields(ModelConfig):
        v = getattr(m, f.name)
        if v == getattr(default, f.name) or reads_key(m.cell, m.init, f.name):
            continue
        if f.name == "init_scale" and m.cell not in _MODERN_INIT:
            why = "model.init=default keeps PyTorch's init; g scales gaussian, orthogonal and identity"
        elif f.name == "init_scale":
            why = f"cell {m.cell} keeps its own init"
        else:
            cells = [c for c in CELLS if reads_key(c, m.init, f.name)]
            why = f"read by cell {' and '.join(cells)} only, and model.cell={m.cell}"
        notes.append(f"model.{f.name}={v:g} is not used by this model ({why})")
    return notes


# Params that make no setting of their own in a report (README, "Compare runs"): its keys (task, cell,
# init, g, lr, clip), what replicates a run (seed, the regression suite's ulp nudge), and what records,
# shows or observes a run without changing its training.
NOT_SETTINGS = {
    "task.name", "task.permute", "model.cell", "model.init", "model.init_scale", "optim.lr", "clip.mode",
    "clip.threshold", "seed", "model.init_ulp_seed", "trainer.threads", "trainer.log_every",
    "trainer.progress_bar", "trainer.val_every",
}  # fmt: skip


def differing_settings(params: list[dict[str, Any]]) -> list[str]:
    """Per run (its MLflow params, strings), the other settings in which the runs differ, as ``key=value;
    ...`` ('' when none do): two LSTM runs at forget bias 0 and 2, or adding at T = 200 and 1100, were one
    row of the report's summary and one curve of its profiles, as if seeds (a teacher's review). A model
    key the run's cell does not read is no setting of it, and a param a run lacks (an older version's
    store) reads as its default (a review: both split runs that trained the same network). A model key
    differs only between runs that read it: the default sweep's one LSTM run among tanh and GRU runs read
    ``model.forget_bias=1.0``, its default, as if set apart from runs with no forget bias (a new-user
    walkthrough)."""
    default = {k: str(v) for k, v in Config().flat().items()}

    def value(p: dict[str, Any], k: str) -> str | None:
        if k.startswith("model.") and not reads_key(
            str(p.get("model.cell")), str(p.get("model.init")), k[6:]
        ):
            return None  # not read: no value to differ in
        v = p.get(k)
        return v if isinstance(v, str) else default.get(k, "")

    skip = ("tracking.", "diagnostics.")
    keys = sorted({k for p in params for k in p if k not in NOT_SETTINGS and not k.startswith(skip)})
    varying = [k for k in keys if len({value(p, k) for p in params} - {None}) > 1]
    return ["; ".join(f"{k}={value(p, k)}" for k in varying if value(p, k)) for p in params]


# a number, signed after "=", a space or at the start (model.forget_bias=-3.0), not after a word (lstm-2)
NUMBER = re.compile(r"((?:(?<=[=\s])-|^-)?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)")


def numbers_as_numbers(column: Any) -> Any:
    """The sort key (pandas' ``sort_values(key=...)``) of the report's text columns that hold numbers
    (``clip``: ``norm 10``; ``settings``: ``trainer.max_steps=20000``): their numbers compared as numbers,
    so ``norm 2`` comes before ``norm 10`` and ``max_steps=3000`` before ``=20000`` (as text, the other
    way round: a walkthrough). Other columns as they are."""

    def key(v: Any) -> Any:
        return (
            tuple(float(p) if i % 2 else p for i, p in enumerate(NUMBER.split(v)))
            if isinstance(v, str)
            else v
        )

    return column.map(key) if column.name in ("clip", "settings") else column
