"""Accepted numbers: tolerance bands, the baseline file beside a suite, and what changed on update.

``configs/regression/<suite>.baseline.yaml`` holds, per entry and metric, the accepted value and its band
(absolute and/or relative). ``--update-baseline`` writes it from a run that respects every law and shows
the diff; comparing a run against it gives one table row per metric (pass or REGRESSION).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, as_mapping, read_yaml
from .laws import ERROR, NO_BASELINE, PASS, REGRESSION, EntryResult, Row, _metric, fmt

ROOT = Path(__file__).resolve().parents[1]



@dataclass
class Band:
    abs: float = 0.0
    rel: float = 0.0

    def width(self, base: float) -> float:
        return max(self.abs, self.rel * abs(base))

    def describe(self) -> str:
        parts = ([f"±{fmt(self.abs)}"] if self.abs else []) + ([f"±{self.rel:.0%}"] if self.rel else [])
        return " or ".join(parts) or "exact"

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("abs", self.abs), ("rel", self.rel)) if v}


def parse_band(item: Any, key: str) -> Band:
    if not isinstance(item, dict) or not item or set(item) - {"abs", "rel"}:
        raise ConfigError(key, f"a band is a mapping with abs and/or rel, e.g. {{abs: 0.5}}, got {item!r}")
    vals = {}
    for k, v in item.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{key}.{k}", f"must be a number >= 0, got {v!r}")
        vals[k] = float(v)
    return Band(**vals)


def baseline_row(entry: str, metric: str, r: EntryResult, accepted: dict[str, Any] | None) -> Row:
    """Compare one recorded metric against the accepted number and its band."""
    label = f"{entry}: {metric}"
    now = _metric(r, metric) if r.status == "FINISHED" else None
    if accepted is None:
        return Row(label, "-", fmt(now), "-", NO_BASELINE, "run with --update-baseline to accept it")
    base, band = float(accepted["value"]), Band(accepted.get("abs", 0.0), accepted.get("rel", 0.0))
    if r.status != "FINISHED":
        return Row(label, fmt(base), "-", band.describe(), ERROR, f"run {r.status.lower()}")
    if now is None or not math.isfinite(now):
        return Row(label, fmt(base), fmt(now), band.describe(), REGRESSION, f"{metric} was not recorded")
    ok = abs(now - base) <= band.width(base)
    return Row(label, fmt(base), fmt(now), band.describe(), PASS if ok else REGRESSION,
               "" if ok else f"{metric} moved by {fmt(now - base)}, band {band.describe()}")



def load_baseline(path: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{entry: {metric: {value, abs, rel}}}``; an absent file is an empty baseline."""
    path = Path(path)
    if not path.exists():
        return {}
    data = read_yaml(path)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for entry, metrics in as_mapping(data.get("entries"), f"{path.name}: entries").items():
        for metric, rec in as_mapping(metrics, f"{path.name}: entries.{entry}").items():
            key = f"{path.name}: entries.{entry}.{metric}"
            if not isinstance(rec, dict) or not isinstance(rec.get("value"), (int, float)) \
                    or isinstance(rec.get("value"), bool):
                raise ConfigError(key, "must be a mapping with a numeric value (and abs and/or rel)")
            band = parse_band({k: v for k, v in rec.items() if k != "value"} or {"abs": 0.0}, key)
            out.setdefault(entry, {})[metric] = {"value": float(rec["value"]), **band.to_dict()}
    return out


def new_baseline(suite, results: dict[str, EntryResult]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for e in suite.entries:
        for metric, band in e.bands.items():
            v = results[e.name].metrics.get(metric)
            if v is not None and math.isfinite(v):
                out.setdefault(e.name, {})[metric] = {"value": float(f"{v:.6g}"), **band.to_dict()}
    return out


def write_baseline(suite, values: dict, path: Path | None = None) -> Path:
    from .tracking import git_commit, version_tags

    path = Path(path or suite.baseline_path)
    versions = {k.removeprefix("version."): v for k, v in version_tags().items() if k.startswith("version.")}
    try:
        shown = suite.path.resolve().relative_to(ROOT)
    except ValueError:
        shown = suite.path
    head = (f"# Accepted numbers for {shown}: written by `python -m pipeline regress --suite "
            f"{shown} --update-baseline`.\n# Bands come from the suite's `baseline:` keys; "
            "widen one by hand only with a comment saying why.\n")
    doc = {"suite": suite.name, "recorded": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                             "git_commit": git_commit(), "versions": versions},
           "entries": values}
    path.write_text(head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110))
    return path


def baseline_diff(old: dict, new: dict) -> list[tuple[str, str, str, str]]:
    """Rows (entry: metric, old, new, change) for every value that differs, appears or disappears."""
    rows = []
    for entry in sorted(set(old) | set(new)):
        for metric in sorted(set(old.get(entry, {})) | set(new.get(entry, {}))):
            a, b = old.get(entry, {}).get(metric), new.get(entry, {}).get(metric)
            if a == b:
                continue
            va, vb = (None if x is None else x["value"] for x in (a, b))
            change = "new" if a is None else "removed" if b is None else (
                f"{vb - va:+.4g}" + (f" ({(vb - va) / abs(va):+.1%})" if va else "") if va != vb else "band")
            rows.append((f"{entry}: {metric}", fmt(va), fmt(vb), change))
    return rows
