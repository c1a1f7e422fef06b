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
