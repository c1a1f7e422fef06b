"""Accepted numbers: tolerance bands, the baseline file beside a suite, and what changed on update.

``configs/regression/<suite>.baseline.yaml`` holds, per entry and metric, the accepted value and its band
(absolute and/or relative). ``--update-baseline`` writes it from a run that respects every law and shows
the diff; comparing a run against it gives one table row per metric (pass or REGRESSION).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.regression.expr import fmt, pct
from pipeline.regression.laws import ERROR, NO_BASELINE, PASS, REGRESSION, EntryResult, Row, _metric
from pipeline.schema import ConfigError, as_mapping, read_yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository: the header names the suite relative to it


@dataclass(frozen=True)
class Band:
    """How far a metric may move from its accepted value: the wider of ``abs`` and ``rel`` x |value|."""

    abs: float = 0.0  # absolute width, in the metric's units
    rel: float = 0.0  # relative width, a fraction of the accepted value

    def width(self, base: float) -> float:
        return max(self.abs, self.rel * abs(base))

    def describe(self) -> str:
        parts = ([f"±{fmt(self.abs)}"] if self.abs else []) + ([f"±{pct(self.rel)}"] if self.rel else [])
        return " or ".join(parts) or "exact"

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("abs", self.abs), ("rel", self.rel)) if v}


def _finite(v: float) -> bool:
    """A finite number, and one a float can hold: math.isfinite raised OverflowError, a traceback, on an
    integer of 400 digits in a baseline file (a review)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def parse_band(item: Any, key: str) -> Band:
    if not isinstance(item, dict) or not item or set(item) - {"abs", "rel"}:
        raise ConfigError(key, f"a band is a mapping with abs and/or rel, e.g. {{abs: 0.5}}, got {item!r}")
    vals = {}
    for k, v in item.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) or v < 0:
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
    return Row(
        label,
        fmt(base),
        fmt(now),
        band.describe(),
        PASS if ok else REGRESSION,
        "" if ok else f"{metric} moved by {fmt(now - base)}, band {band.describe()}",
    )


# Keys of a baseline record that say where its band came from; read back for the diff, never compared.
PROVENANCE = ("spread", "runs")

# A measured band is this many times the largest deviation seen under the perturbations (README,
# "Baselines that hold on another machine"): with three perturbed runs the largest deviation from the
# nominal run is about 1.6 standard deviations of a difference, so 4x it is about 6 sigma.
SAFETY = 4.0


# Restoring a baseline file that is empty or cut off (a bad merge, a partial write): what the errors say.
RESTORE = "restore it from version control, or accept the suite's numbers again with --update-baseline"


def load_baseline(path: str | Path, whole: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """``{entry: {metric: {value, abs, rel[, spread, runs]}}}``; an absent file is an empty baseline.

    With ``whole``, a file that exists but holds no ``entries`` (empty, or cut off before them), or
    another number of records than its ``records:`` header counts (cut off among them, or edited by
    hand without it), is refused in one line: read as no baseline, it passed the suite with none of its
    numbers compared (found by a review). ``--update-baseline`` reads its own file without (it rewrites
    it: the remedy the error names)."""
    path = Path(path)
    if not path.exists():
        return {}
    data = read_yaml(path)
    if whole and data.get("entries") is None:
        raise ConfigError(f"{path.name}: entries", f"missing or empty (the file cut off?): {RESTORE}")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for entry, metrics in as_mapping(data.get("entries"), f"{path.name}: entries").items():
        for metric, rec in as_mapping(metrics, f"{path.name}: entries.{entry}").items():
            key = f"{path.name}: entries.{entry}.{metric}"
            # a value .nan (a REGRESSION every run) or .inf is refused too
            if (
                not isinstance(rec, dict)
                or not isinstance(rec.get("value"), (int, float))
                or isinstance(rec.get("value"), bool)
                or not _finite(rec["value"])
            ):
                raise ConfigError(key, "must be a mapping with a finite numeric value (and abs and/or rel)")
            band = parse_band(
                {k: v for k, v in rec.items() if k not in ("value", *PROVENANCE)} or {"abs": 0.0}, key
            )
            extra = {k: rec[k] for k in PROVENANCE if k in rec}
            for k, v in extra.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) or v < 0:
                    raise ConfigError(f"{key}.{k}", f"must be a number >= 0, got {v!r}")
            out.setdefault(entry, {})[metric] = {"value": float(rec["value"]), **band.to_dict(), **extra}
    held, records = sum(len(m) for m in out.values()), data.get("records")
    if whole and records is not None and (isinstance(records, bool) or records != held):
        raise ConfigError(
            f"{path.name}: records",
            f"the file holds {held} accepted numbers, its header {records!r} (cut off? after an edit by "
            f"hand, set records: {held}): {RESTORE}",
        )
    return out


def suite_baseline(suite, update: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """Accepted numbers for every entry: the suite's own file, and each included suite's file for its entries.

    A suite's own file may not exist yet (its first run: every banded metric reads "no baseline"). Refused
    in one line (ConfigError), since each would leave numbers that are never compared while the suite
    passes: an included suite's file that is missing; and, unless ``update`` (which rewrites the file
    from the suite), a file whose ``suite:`` names another suite, or that holds an entry the suite does
    not have (a renamed entry, a typo) or a metric its entry no longer bands (a lost ``baseline:``).
    """
    own = load_baseline(suite.baseline_path, whole=not update)
    if not update and suite.baseline_path.exists():
        header = read_yaml(suite.baseline_path).get("suite")
        if header is not None and header != suite.name:
            raise ConfigError(
                f"{suite.baseline_path.name}: suite",
                f"holds the accepted numbers of suite {header!r}, not of {suite.name!r}",
            )
        mine = {e.name: e for e in suite.entries if e.baseline_path is None}
        for name, metrics in own.items():
            if name not in mine:
                raise ConfigError(
                    f"{suite.baseline_path.name}: entries.{name}",
                    f"no entry {name!r} in suite {suite.name} (renamed? its numbers would never be compared)",
                )
            for metric in metrics:
                if metric not in mine[name].bands:
                    raise ConfigError(
                        f"{suite.baseline_path.name}: entries.{name}.{metric}",
                        f"entry {name!r} of suite {suite.name} has no baseline band for it (its `baseline:` "
                        "lost?), so its accepted number would never be compared",
                    )
    out = {e.name: own[e.name] for e in suite.entries if e.baseline_path is None and e.name in own}
    files: dict[Path, dict] = {}
    for e in suite.entries:
        if e.baseline_path is not None:
            if e.baseline_path not in files:
                if e.bands and not e.baseline_path.exists():
                    raise ConfigError(
                        "include",
                        f"the accepted numbers of included entry {e.name!r} are missing: {e.baseline_path} "
                        "(record them with that suite's own --update-baseline)",
                    )
                files[e.baseline_path] = load_baseline(e.baseline_path)
            if e.name in files[e.baseline_path]:
                out[e.name] = files[e.baseline_path][e.name]
    return out


def baselined(suite) -> list[str]:
    """The suite's own entries with a baseline metric: the ones ``--update-baseline`` runs perturbed.

    Entries of an included suite are accepted in that suite's own baseline file, not here.
    """
    return [e.name for e in suite.entries if e.bands and e.baseline_path is None]


def _round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (a band is never narrower than measured)."""
    if x <= 0 or not math.isfinite(x):
        return x
    e = math.floor(math.log10(x)) - digits + 1
    return math.ceil(x / 10.0**e - 1e-9) * 10.0**e


def measured_band(floor: Band, value: float, perturbed: Sequence[float | None]) -> tuple[Band, float]:
    """Band for an accepted ``value`` from the values the same entry gave under perturbations.

    spread = max |v - value| over the perturbed runs (``inf`` if one is missing or non-finite: such a
    metric cannot be given a band). The band is the suite's floor, unless ``SAFETY`` x spread is wider:
    then an absolute band of that width (rounded up to two significant digits).
    """
    if not perturbed or any(v is None or not math.isfinite(v) for v in perturbed):
        return floor, math.inf
    spread = max(abs(v - value) for v in perturbed if v is not None)  # none is None, checked above
    want = SAFETY * spread
    if want <= floor.width(value):
        return floor, spread
    return Band(abs=_round_up(want)), spread


class Unbandable(ValueError):
    """A banded metric with no finite value to accept (``--update-baseline`` refuses the file)."""

    def __init__(self, entry: str, metric: str, why: str):
        self.check = f"{entry}: {metric}"  # the label the metric's baseline row has
        super().__init__(f"{self.check}: {why}")


def new_baseline(
    suite, results: dict[str, EntryResult], perturbed: dict[str, dict[str, EntryResult]] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """Accepted values (6 significant digits) and their bands, measured under ``perturbed`` runs.

    ``perturbed`` maps a perturbation label to the results of the same entries run under it. Without it
    (or for an entry it lacks) the band is the suite's ``baseline:`` floor alone and no spread is written.
    Raises :class:`Unbandable` naming the metric whose nominal or perturbed value is missing or non-finite.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for e in suite.entries:
        if e.baseline_path is not None:  # an included suite's entry: accepted in that suite's file
            continue
        for metric, floor in e.bands.items():
            v = results[e.name].metrics.get(metric)
            if v is None or not math.isfinite(v):  # accepting nothing would turn a lost metric into a pass
                raise Unbandable(
                    e.name,
                    metric,
                    "not recorded (or not finite) in the nominal run; a banded metric must be recorded "
                    "(drop it from the entry's baseline: to stop comparing it)",
                )
            others = [r[e.name].metrics.get(metric) for r in (perturbed or {}).values() if e.name in r]
            if not others:
                out.setdefault(e.name, {})[metric] = {"value": float(f"{v:.6g}"), **floor.to_dict()}
                continue
            band, spread = measured_band(floor, v, others)
            if not math.isfinite(spread):
                raise Unbandable(
                    e.name,
                    metric,
                    "not recorded (or not finite) under every perturbation; it cannot be given a band",
                )
            out.setdefault(e.name, {})[metric] = {
                "value": float(f"{v:.6g}"),
                **band.to_dict(),
                "spread": float(f"{spread:.3g}"),
                "runs": len(others) + 1,
            }
    return out


def check_writable(path: Path, key: str = "baseline") -> None:
    """``--update-baseline`` can write ``path``: a regular file or a new name in an existing, writable
    folder; else one ConfigError naming ``key`` and the file, before any entry runs (every entry trained
    first, then the write failed with a traceback; found by a fuzzing review)."""
    import os

    from pipeline.store_checks import creation_problem

    if os.path.isdir(path):
        raise ConfigError(key, f"baseline file {path} is a directory: name a YAML file")
    if os.path.exists(path):  # not Path.exists: it raises on a name over the file system's limit
        if not os.access(path, os.W_OK):
            raise ConfigError(key, f"baseline file {path} cannot be written: it is not writable")
        return
    folder = path.parent
    if not os.path.isdir(folder):
        exists = os.path.exists(folder)
        where = folder if exists else next((q for q in folder.parents if os.path.exists(q)), None)
        why = (
            f"{where} is not a folder"
            if where is not None and not os.path.isdir(where)
            else f"its folder {folder} does not exist"
        )
        raise ConfigError(key, f"baseline file {path} cannot be written: {why}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(key, f"baseline file {path} cannot be written: its folder {folder} is not writable")
    problem = creation_problem(path)
    if problem:
        raise ConfigError(key, f"baseline file {path} cannot be written: {problem}")


def write_baseline(suite, values: dict, path: Path | None = None) -> Path:
    from pipeline.provenance import git_commit, version_tags

    path = Path(path or suite.baseline_path)
    versions = {k.removeprefix("version."): v for k, v in version_tags().items() if k.startswith("version.")}
    try:
        shown = suite.path.resolve().relative_to(ROOT)
    except ValueError:
        shown = suite.path
    head = (
        f"# Accepted numbers for {shown}: written by `python -m pipeline regress --suite "
        f"{shown} --update-baseline`.\n"
        "# Each value comes from the nominal run; `spread` is the largest deviation from it seen when the\n"
        "# entry was run again under the perturbations that stand in for another machine (another thread\n"
        f"# count, 1-ulp nudges of the initial weights), `runs` counts all runs. The band is {SAFETY:g} x spread,\n"
        "# or the suite's `baseline:` floor where that is wider (README, \"Baselines that hold on another\n"
        '# machine"). Widen one by hand only with a comment saying why.\n'
    )
    doc = {
        "suite": suite.name,
        "records": sum(len(m) for m in values.values()),  # what load_baseline checks: a file cut off
        "recorded": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "versions": versions,
        },
        "entries": values,
    }
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
            va: Any  # a number from the file or new_baseline, or None where the row is missing
            vb: Any
            va, vb = (None if x is None else x["value"] for x in (a, b))
            same_band = a is not None and b is not None and all(a.get(k) == b.get(k) for k in ("abs", "rel"))
            change = (
                "new"
                if a is None
                else "removed"
                if b is None
                else (
                    f"{vb - va:+.4g}"
                    + (f" ({'+' if vb > va else ''}{pct((vb - va) / abs(va))})" if va else "")
                    if va != vb
                    else "spread"
                    if same_band
                    else "band"
                )
            )
            rows.append((f"{entry}: {metric}", fmt(va), fmt(vb), change))
    return rows


def spread_rows(values: dict) -> list[tuple[str, str, str]]:
    """Where each measured band came from: (entry: metric, spread, band) for the values with a spread."""
    return [
        (
            f"{entry}: {metric}",
            fmt(rec.get("spread")),
            " or ".join(
                f"±{fmt(rec[k])}" if k == "abs" else f"±{pct(rec[k])}" for k in ("abs", "rel") if k in rec
            ),
        )
        for entry, metrics in values.items()
        for metric, rec in metrics.items()
        if "spread" in rec
    ]
