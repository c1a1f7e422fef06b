"""What a :class:`~pipeline.training.profile_monitor.BPTTProfileMonitor` keeps of its passes: the
metrics and long-format frames of each, and the Lightning checkpoint state that lets a resumed fit keep
them (README, "Your own model": a run resumed with ``trainer.fit(ckpt_path=...)`` keeps its earlier
passes, its verdict and its profile artifact, and profiles the same batch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def concat_frames(frames: Sequence[dict[str, Any]], columns: Sequence[str]):
    """The long-format columns of every pass as one DataFrame (empty, with ``columns``, when none)."""
    import pandas as pd

    if not frames:
        return pd.DataFrame(columns=list(columns))
    return pd.concat([pd.DataFrame(f) for f in frames], ignore_index=True)


class _Passes:
    """The record of a :class:`BPTTProfileMonitor`'s passes (:attr:`passes`, :attr:`frames`, the last
    pass's step) and what a Lightning checkpoint keeps of it with the probe batch."""

    rnn: str
    every_n_steps: int
    name: str | None
    batch: Any
    keeps_state: bool
    frame_columns: tuple[str, ...]
    passes: list[dict[str, Any]]
    frames: list[dict[str, Any]]
    _last_step: int | None
    _generate_state_key: Callable[..., str]

    @property
    def first(self) -> dict[str, Any]:
        return self.passes[0] if self.passes else {}

    @property
    def last(self) -> dict[str, Any]:
        return self.passes[-1] if self.passes else {}

    def profile_frame(self):
        """Every pass, long format: columns :attr:`frame_columns` (``step, layer, t, state, log10_norm``)."""
        return concat_frames(self.frames, self.frame_columns)

    # -- in a Lightning checkpoint: a run resumed with trainer.fit(ckpt_path=...) keeps its earlier passes
    # (the verdict, `passes`, the profile artifact) and profiles the same batch
    @property
    def state_key(self) -> str:
        named_ = {} if self.name is None else {"name": self.name}
        return self._generate_state_key(rnn=self.rnn, every_n_steps=self.every_n_steps, **named_)

    def state_dict(self) -> dict[str, Any]:
        """Passes, frames, the last pass's step and the probe batch (when it is made of tensors and plain
        containers): plain values and tensors only, so the checkpoint loads with ``weights_only=True``."""
        if not self.keeps_state:
            return {}
        return {
            "passes": [{k: _plain(v) for k, v in p.items()} for p in self.passes],
            "frames": [{c: _column_state(v) for c, v in f.items()} for f in self.frames],
            "last_step": self._last_step,
            "batch": self.batch if _plain_data(self.batch) else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.keeps_state or not state_dict:
            return
        self.passes = [dict(p) for p in state_dict.get("passes", [])]
        self.frames = [{c: _column(v) for c, v in f.items()} for f in state_dict.get("frames", [])]
        self._last_step = state_dict.get("last_step")
        if self.batch is None and state_dict.get("batch") is not None:
            self.batch = state_dict["batch"]


def _plain(v: Any) -> Any:
    """A numpy scalar as the Python number it holds (``torch.load(weights_only=True)`` refuses numpy)."""
    return v.item() if isinstance(v, np.generic) else v


def _column_state(v: Any) -> Any:
    """A frame column for a checkpoint: numbers as a tensor, anything else (the state names) as a list."""
    a = np.asarray(v)
    return torch.from_numpy(a.copy()) if a.dtype.kind in "biuf" else [_plain(x) for x in a]


def _column(v: Any) -> np.ndarray:
    return v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _plain_data(obj: Any) -> bool:
    """Whether ``obj`` is tensors in plain tuples, lists and dicts (what ``weights_only=True`` loads)."""
    if obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool)):
        return True
    if type(obj) in (tuple, list):
        return all(_plain_data(o) for o in obj)
    if type(obj) is dict:
        return all(isinstance(k, (str, int)) and _plain_data(v) for k, v in obj.items())
    return False
