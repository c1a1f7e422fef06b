"""Config: YAML + dotted overrides -> validated dataclasses; every bad key named in one line."""

import pytest

from pipeline.config import Config, config_keys, load_config
from pipeline.schema import ConfigError, parse_overrides


def test_defaults_validate_and_flatten():
    cfg = load_config(None)
    flat = cfg.flat()
    for key in (
        "seed",
        "task.name",
        "task.seq_len",
        "task.batch_size",
        "model.cell",
        "model.hidden_size",
        "model.init",
        "model.init_scale",
        "model.forget_bias",
        "optim.name",
        "optim.lr",
        "optim.momentum",
        "clip.mode",
        "clip.threshold",
        "trainer.max_steps",
        "trainer.accelerator",
        "diagnostics.profile_every",
        "tracking.uri",
        "tracking.experiment",
    ):
        assert key in flat
    assert set(flat) == set(config_keys())


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: {name: copy, seq_len: 40}\noptim: {lr: 1e-3}\n")
    cfg = load_config(p, ["model.cell=lstm", "optim.lr=0.02", "clip.mode=norm", "tracking.uri=null"])
    assert (cfg.task.name, cfg.task.seq_len, cfg.model.cell) == ("copy", 40, "lstm")
    assert cfg.optim.lr == pytest.approx(0.02) and cfg.clip.mode == "norm" and cfg.tracking.uri is None
    # YAML 1.1 reads "1e-3" as a string: still a float here
    assert load_config(p).optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        (["optim.lr=-1"], "optim.lr", "> 0"),
        (["optim.lr=0"], "optim.lr", "> 0"),
        (["task.seq_len=1"], "task.seq_len", ">= 2"),
        (["model.cell=transformer"], "model.cell", "allowed: tanh, relu, lstm, gru"),
        (["model.cel=lstm"], "model.cel", "unknown key"),
        (["bogus.x=1"], "bogus", "unknown key"),
        (["model.hidden_size=abc"], "model.hidden_size", "integer"),
        (["model.hidden_size=2.5"], "model.hidden_size", "integer"),
        (["clip.mode=sometimes"], "clip.mode", "none, norm, value"),
        (["optim.momentum=1.0"], "optim.momentum", "[0, 1)"),
        (["model.init_scale=.nan"], "model.init_scale", "finite"),
        # an infinite decay turns every weight non-finite at the first update (found by a walkthrough)
        (["optim.weight_decay=inf"], "optim.weight_decay", "finite"),
        (["diagnostics.horizon_decades=inf"], "diagnostics.horizon_decades", "finite"),
        (["trainer.progress_bar=maybe"], "trainer.progress_bar", "true or false"),
        (["task=3"], "task", "mapping"),
        # a number YAML read where a string is wanted: how to quote it (a new-user walkthrough)
        (["tracking.run_name=123"], "tracking.run_name", 'got 123 (YAML read a number: quote it, "123")'),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert e.value.key == key and f"'{key}'" in msg and words in msg and "\n" not in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["no-equals-sign"])


def test_roundtrip_yaml():
    cfg = load_config(None, ["model.cell=gru", "seed=7"])
    import yaml

    again = load_config(None, patch=yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and isinstance(again, Config)


def test_every_shipped_training_config_validates():
    from conftest import ROOT

    files = sorted((ROOT / "configs" / "train").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        load_config(f)


def test_an_error_about_a_flag_names_the_flag_not_a_config_key():
    """`report` in an empty directory said "config key '--store': no MLflow store ..." to a user who never
    passed --store (walkthrough)."""
    assert (
        str(ConfigError("--store", "no MLflow store at mlflow.db")) == "--store: no MLflow store at mlflow.db"
    )
    assert str(ConfigError("optim.lr", "must be > 0")) == "config key 'optim.lr': must be > 0"
    assert str(ConfigError("", "config file not found: x")) == "config file not found: x"


# Every documented edge (README, "Configuration reference"): the value at the edge loads, the first value
# beyond it is one ConfigError naming the key. An off-by-one in a check (>= for >, < for <=) refused a
# value the README allows, or let one through that it does not, and no other test sat on the edge.
_EDGES = [
    # (overrides shared by both sides, the key, the value at the edge, the first value beyond it)
    ([], "task.seq_len", 2, 1),
    (["task.name=temporal_order"], "task.seq_len", 10, 9),
    (["task.name=digits", "task.seq_len=64"], "task.val_size", 10, 9),
    (["task.name=digits", "task.seq_len=64"], "task.val_size", 898, 899),
    ([], "seed", 0, -1),
    ([], "seed", 2**64 - 3, 2**64 - 2),
    ([], "model.init_ulp_seed", 2**64 - 1, 2**64),  # 2^64 passed and failed mid-run (a README audit)
    ([], "trainer.max_steps", 2**63 - 1, 2**63),
    ([], "remedy.floss.every", 2**63 - 1, 2**63),
    ([], "remedy.floss.until", 2**63 - 1, 2**63),
    ([], "remedy.skip.window", 1_000_000, 1_000_001),
    ([], "trainer.threads", 1024, 1025),
    ([], "optim.momentum", 0.0, -0.001),
    ([], "model.max_phase", "6.283185307179586", "6.2832"),  # 2 pi is allowed: (0, 2 pi]
    (["model.r_max=0.95"], "model.r_min", 0.95, 0.951),  # r_min may equal r_max (a ring of one radius)
    ([], "model.dt", 1.0, 1.001),
    (["remedy.skip.window=8"], "remedy.skip.warmup", 2, 1),
    (["remedy.skip.window=8"], "remedy.skip.warmup", 8, 9),
    ([], "remedy.floss.until", 1, 0),
    (["remedy.floss.weight=0.1", "task.batch_size=16"], "remedy.floss.batch", 16, 17),
    (["model.cell=lru", "model.hidden_size=4"], "remedy.floss.exponents", 8, 9),  # 2N real numbers
    (["model.cell=lstm", "model.hidden_size=4"], "remedy.floss.exponents", 8, 9),  # (h, c)
    (["model.cell=gru", "model.hidden_size=4"], "remedy.floss.exponents", 4, 5),
    ([], "diagnostics.vanish_log10_per_step", -1e-9, 0),
    ([], "diagnostics.explode_log10_per_step", 1e-9, 0),
    ([], "diagnostics.profile_every", 0, -1),
    ([], "tracking.experiment", "x" * 500, "x" * 501),
]


@pytest.mark.parametrize(("shared", "key", "edge", "beyond"), _EDGES)
def test_each_documented_edge_loads_and_the_next_value_is_refused(shared, key, edge, beyond):
    cfg = load_config(None, [*shared, f"{key}={edge}"])
    assert cfg.flat()[key] == (
        float(edge) if isinstance(edge, str) and key != "tracking.experiment" else edge
    )
    with pytest.raises(ConfigError) as e:
        load_config(None, [*shared, f"{key}={beyond}"])
    assert e.value.key == key and f"'{key}'" in str(e.value) and "\n" not in str(e.value)
    if isinstance(edge, int) and beyond > edge:  # "what is allowed" names the bound crossed (it said ">= 1")
        assert str(edge) in str(e.value), str(e.value)


def test_file_and_override_reading_details(tmp_path):
    """What a user sees of the reader: the line of a YAML error (1-based, as an editor counts), an empty
    file as the defaults, a whole float as an integer, an override's key with spaces around it, and an
    unknown key answered with the keys of its own section."""
    import dataclasses

    from pipeline.config import ModelConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ntask:\n  name: adding\n  seq_len: 5: 6\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML \(line 4\)$"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    assert load_config(empty) == Config()
    cfg = load_config(None, ["task.seq_len=100.0", "trainer.max_steps=1.0e+4"])
    assert (cfg.task.seq_len, cfg.trainer.max_steps) == (100, 10000)
    assert type(cfg.task.seq_len) is int and type(cfg.trainer.max_steps) is int
    assert parse_overrides([" optim.lr = 0.5", "model.cell =gru"]) == {
        "optim": {"lr": 0.5},
        "model": {"cell": "gru"},
    }
    model_keys = ", ".join(sorted(f.name for f in dataclasses.fields(ModelConfig)))
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.colour=red"])
    assert str(e.value) == f"config key 'model.colour': unknown key (allowed in model: {model_keys})"
    with pytest.raises(ConfigError, match=r"unknown key \(allowed in top level: clip, diagnostics, model, "):
        load_config(None, ["bogus=1"])
    # merge keys are no duplicates, even two in one mapping; a key written beside them overrides theirs
    from pipeline.schema import load_yaml_text

    assert load_yaml_text("a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: *a\n  <<: *b\n  x: 3\n")["c"] == {
        "x": 3,
        "y": 2,
    }
