"""Suite files (``configs/regression/*.yaml``) read into frozen dataclasses, validated before any store is touched.

A suite is a list of entries; each entry is a training config (an optional base file plus an inline patch,
same keys as ``configs/train``), its checks (laws, :mod:`pipeline.regression.laws`) and the metrics whose
accepted values live in the baseline file beside it, with a tolerance band each (README, "Regression
suites"). The file as written is built by :func:`pipeline.schema.build` into :class:`SuiteFile` and
:class:`EntryFile` (the keys and their defaults, one home); :func:`load_suite` resolves those into a
:class:`Suite` of :class:`Entry` (configs built, checks parsed, includes merged). Every error is a
:class:`~pipeline.schema.ConfigError` naming the first bad key. Stdlib, yaml and pipeline.config only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import Config, from_dict
from pipeline.regression.baselines import Band, parse_band
from pipeline.regression.laws import Check, parse_check
from pipeline.regression.metrics import check_metric
from pipeline.schema import ConfigError, build, deep_merge, parse_overrides, read_yaml

EXPERIMENT = "regression"  # every regression run lands here (README, "The MLflow record")
ROOT = Path(__file__).resolve().parents[2]  # the repository: the second place a suite's paths are looked up

# --------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class EntryFile:
    """One item of ``entries:`` as written."""

    # Letters, digits, _ - . only: it goes into MLflow filter strings and the run name <suite>/<entry>.
    name: str
    # A base training config (same keys as configs/train), relative to the suite file, else to the repository.
    config: str | None = None
    # Laid over the base config and the suite's defaults: what makes this entry this entry.
    patch: dict[str, Any] = field(default_factory=dict)
    # Laws on this entry's run: one-key mappings {kind: {params}} (laws.KINDS).
    checks: tuple[Any, ...] = ()
    # metric -> band floor {abs, rel}; the accepted values live in the suite's baseline file.
    baseline: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteFile:
    """The top of a suite file as written."""

    # The suite's name in run names and tags; None: the file name without .yaml.
    name: str | None = None
    # One paragraph for people; recorded nowhere else.
    description: str = ""
    # Other suites (a path or a list) whose entries and comparisons run under this suite's name.
    include: tuple[str, ...] = ()
    # The baseline file, relative to the suite; None: <file stem>.baseline.yaml beside it.
    baseline: str | None = None
    # Training config shared by every entry of this file (an entry's patch wins).
    defaults: dict[str, Any] = field(default_factory=dict)
    # The entries, each an EntryFile mapping (built one by one: its key is entries.<name>).
    entries: tuple[dict[str, Any], ...] = ()
    # Checks between entries (ratio_of_runs, difference_of_runs).
    compare: tuple[Any, ...] = ()


def _present(data: dict[str, Any]) -> dict[str, Any]:
    """A key written with no value (``compare:``) reads as absent: its default."""
    return {k: v for k, v in data.items() if v is not None}


def read_suite_file(path: Path) -> SuiteFile:
    data = _present(read_yaml(path))
    if isinstance(data.get("include"), str):
        data["include"] = [data["include"]]  # one suite path, or a list of them
    return build(SuiteFile, data)


# ---------------------------------------------------------------------------------- the resolved suite


@dataclass(frozen=True)
class Entry:
    """One entry, ready to run: its training config, parsed checks and baseline bands."""

    name: str  # as written (EntryFile.name): the entry's key in tags, tables and the baseline file
    # The training config it runs: experiment `regression`, run name <suite>/<entry>.
    cfg: Config
    checks: tuple[Check, ...] = ()  # its laws, parsed and their expressions checked (laws.parse_check)
    bands: dict[str, Band] = field(default_factory=dict)  # metric -> the band floor of its accepted value
    # Where its accepted numbers live: None for the suite's own baseline file; an included suite's
    # entries keep theirs (one source of truth: smoke's numbers are smoke.baseline.yaml's, in nightly too).
    baseline_path: Path | None = None


@dataclass(frozen=True)
class Suite:
    """A suite, ready to run: its entries (included ones first) and the comparisons between them."""

    name: str  # tag `suite` and the first half of every run name <suite>/<entry>
    path: Path  # the suite file (workers read it again)
    description: str  # SuiteFile.description, stripped
    baseline_path: Path  # the suite's own baseline file
    entries: tuple[Entry, ...]  # included suites' entries first, then this file's
    compare: tuple[Check, ...] = ()  # included suites' comparisons first

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise ConfigError("entry", f"no entry named {name!r} in suite {self.name}")

    @property
    def uri(self) -> str | None:
        return self.entries[0].cfg.tracking.uri


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], key: str = "--set") -> Config:
    """``cfg`` with dotted ``key=value`` overrides applied and validated (ConfigError names ``key``)."""
    if not overrides:
        return cfg
    try:
        return from_dict(deep_merge(cfg.to_dict(), parse_overrides(list(overrides))))
    except ConfigError as e:
        raise ConfigError(key, str(e)) from None


def judged_under(suite: Suite, overrides: list[str] | tuple[str, ...]) -> Suite:
    """``suite`` as its runs trained under ``overrides`` (``--set``): each entry's config with them applied,
    and its laws' expressions read from that config. They were read from the suite as written, so after
    ``--set model.init_scale=0.6`` the law ``decay_rate_equals: ln(g)`` judged a run at g = 0.6 against
    ln(0.5) and failed it (a new-user walkthrough)."""
    from pipeline.regression.expr import names_of

    if not overrides:
        return suite
    entries = []
    for e in suite.entries:
        cfg = with_overrides(e.cfg, overrides)
        names = names_of(cfg)
        entries.append(replace(e, cfg=cfg, checks=tuple(replace(c, names=names) for c in e.checks)))
    return replace(suite, entries=tuple(entries))


def with_baseline_file(suite: Suite, path: str | Path, must_exist: bool = True) -> Suite:
    """``suite`` compared against (and updating) another baseline file (``--baseline``)."""
    from pipeline.store_checks import long_name

    if not str(path).strip():
        raise ConfigError("--baseline", "must name a baseline file, got an empty path")
    suite = replace(suite, baseline_path=Path(path))
    long = long_name(suite.baseline_path)  # before Path.exists, which raises on it
    if long:
        raise ConfigError("--baseline", f"baseline file {suite.baseline_path}: {long}")
    if must_exist and not suite.baseline_path.exists():
        raise ConfigError("--baseline", f"file not found: {suite.baseline_path}")
    return suite


# ------------------------------------------------------------------------------------------ loading


def _resolve(p: str, base: Path) -> Path:
    """Paths in a suite are relative to the suite file, else to the repository root."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    for cand in (base / path, ROOT / path):
        if cand.exists():
            return cand
    return base / path


def _is_name(s: Any) -> bool:
    """Names go into MLflow filter strings and run names: keep them to letters, digits, _ - ."""
    return isinstance(s, str) and bool(s) and all(c.isalnum() or c in "_-." for c in s)


def load_suite(path: str | Path, _seen: tuple[Path, ...] = ()) -> Suite:
    """Read and validate a suite file; raises :class:`ConfigError` naming the first bad key."""
    path = Path(path)
    raw = read_suite_file(path)
    # the file name without .yaml: up to its first dot, a copy `tiny.cpu-runner.yaml` took suite tiny's
    # name and baseline file, and its --update-baseline rewrote tiny's (a platform-team walkthrough)
    stem = path.name.removesuffix(path.suffix) if path.suffix in (".yaml", ".yml") else path.name
    name = stem if raw.name is None else raw.name
    if not _is_name(name):
        raise ConfigError("name", f"must be a name of letters, digits, _ - . (got {name!r})")
    if not (raw.entries or raw.include):
        raise ConfigError("entries", "must be a non-empty list of entries")
    own = _entry_files(raw.entries)
    included = _included(raw.include, path, (*_seen, path.resolve()))
    tracking = raw.defaults.get("tracking") or {}
    if not isinstance(tracking, dict):
        raise ConfigError("defaults.tracking", f"must be a mapping, got {tracking!r}")
    inherited = _inherited(included, name, [e.name for e in own], tracking.get("uri"))
    known = {e.name for e in own} | {e.name for e in inherited}
    entries = inherited + [_entry(e, raw.defaults, path.parent, name, known) for e in own]
    compare = [c for sub in included for c in sub.compare]
    compare += [parse_check(c, f"compare[{j}]", None, None, known) for j, c in enumerate(raw.compare)]
    if len(stores := {e.cfg.tracking.uri for e in entries}) > 1:
        from pipeline.uris import display_url

        # it named neither the stores nor the fix (a platform-team walkthrough)
        where = ", ".join(
            f"{display_url(u) if u else 'the default store'} ({', '.join(e.name for e in entries if e.cfg.tracking.uri == u)})"
            for u in sorted(stores, key=str)
        )
        raise ConfigError(
            "defaults.tracking.uri",
            f"all entries of a suite must use one tracking store, these use {len(stores)}: {where}; set "
            "defaults.tracking.uri in this file (an including suite's store is laid over its includes')",
        )
    bpath = raw.baseline if raw.baseline is not None else f"{stem}.baseline.yaml"
    # the default before the name kept its dots: a file still beside the suite was read as "no baseline
    # yet", its numbers never compared (a review)
    earlier = f"{stem.split('.')[0]}.baseline.yaml"
    moved = earlier != bpath and not (path.parent / bpath).exists() and (path.parent / earlier).exists()
    if raw.baseline is None and moved:
        raise ConfigError(
            "baseline",
            f"{path.name} is suite {stem!r}, whose default baseline file is {bpath} (not there); "
            f"{earlier} beside it is suite {stem.split('.')[0]!r}'s: set `baseline: {earlier}` in the "
            f"suite file to be compared against it, or `baseline: {bpath}` for numbers of its own",
        )
    return Suite(
        name,
        path,
        raw.description.strip(),
        path.parent / Path(bpath).expanduser(),
        tuple(entries),
        tuple(compare),
    )


def _entry_files(items: tuple[dict[str, Any], ...]) -> list[EntryFile]:
    """Each item of ``entries:`` built; names checked first (an entry's key is ``entries.<name>``)."""
    out: list[EntryFile] = []
    for i, item in enumerate(items):
        n = item.get("name")
        if not _is_name(n):
            raise ConfigError(f"entries[{i}].name", f"must be a name of letters, digits, _ - . (got {n!r})")
        if n in {e.name for e in out}:
            raise ConfigError(f"entries[{i}].name", f"duplicate entry name {n!r}")
        out.append(build(EntryFile, _present(item), f"entries.{n}."))
    return out


def _included(paths: tuple[str, ...], path: Path, seen: tuple[Path, ...]) -> list[Suite]:
    """``include: [smoke.yaml]``: entries and comparisons of other suites, run under this suite's name."""
    out = []
    for j, p in enumerate(paths):
        sub = _resolve(p, path.parent)
        if sub.resolve() in seen:
            raise ConfigError(f"include[{j}]", f"{p} includes itself")
        try:
            out.append(load_suite(sub, seen))
        except ConfigError as e:
            raise ConfigError(f"include[{j}]", f"{p}: {e}") from None
    return out


def _inherited(included: list[Suite], suite: str, own: list[str], uri: str | None) -> list[Entry]:
    """Included entries, renamed <suite>/<entry>, keeping the baseline file they were accepted in (and the
    rest of their config), recorded where this suite records: its ``defaults.tracking.uri``, when it has
    one (where a suite records is the suite's own; an including suite's store was ignored, its runs went
    to the included suite's, a platform-team walkthrough)."""
    out: list[Entry] = []
    for sub in included:
        for e in sub.entries:
            if e.name in own or e.name in {x.name for x in out}:
                raise ConfigError(
                    f"entries.{e.name}.name", "duplicate entry name (also in an included suite)"
                )
            cfg = e.cfg
            if uri is not None:
                try:
                    cfg = from_dict(deep_merge(cfg.to_dict(), {"tracking": {"uri": uri}}))
                except ConfigError as err:
                    raise err.under("defaults") from None
            cfg = replace(cfg, tracking=replace(cfg.tracking, run_name=f"{suite}/{e.name}"))
            out.append(replace(e, cfg=cfg, baseline_path=e.baseline_path or sub.baseline_path))
    return out


def _entry(raw: EntryFile, defaults: dict[str, Any], suite_dir: Path, suite: str, known: set[str]) -> Entry:
    key = f"entries.{raw.name}"
    cfg = _entry_config(raw, defaults, suite_dir, suite, key)
    checks = tuple(
        parse_check(c, f"{key}.checks[{j}]", raw.name, cfg, known) for j, c in enumerate(raw.checks)
    )
    bands = {}
    for metric, band in raw.baseline.items():
        check_metric(f"{key}.baseline.{metric}", metric)
        bands[metric] = parse_band(band, f"{key}.baseline.{metric}")
    return Entry(raw.name, cfg, checks, bands)


def _entry_config(raw: EntryFile, defaults: dict[str, Any], suite_dir: Path, suite: str, key: str) -> Config:
    data: dict[str, Any] = {}
    if raw.config is not None:
        try:
            data = read_yaml(_resolve(raw.config, suite_dir))
        except ConfigError as e:
            raise ConfigError(f"{key}.config", str(e)) from None
    data = deep_merge(deep_merge(data, defaults), raw.patch)
    # Regression runs always land in experiment `regression`, named <suite>/<entry> (README, "The MLflow record").
    data = deep_merge(
        data, {"tracking": {"experiment": EXPERIMENT, "enabled": True, "run_name": f"{suite}/{raw.name}"}}
    )
    try:
        return from_dict(data)
    except ConfigError as e:
        raise e.under(key) from None
