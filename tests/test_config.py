"""Config loading and validation: every bad config fails with one line naming the file/key."""

import pytest

from ldm.util import ConfigError, instantiate_from_config, load_config, validate_config


def test_instantiate_builds_target():
    norm = instantiate_from_config(
        {"target": "ldm.models.layers.GroupNorm", "params": {"num_groups": 2, "num_channels": 4}}
    )
    assert norm.num_groups == 2 and tuple(norm.weight.shape) == (4,)


def test_unknown_param_key_is_named():
    cfg = {"target": "ldm.models.layers.GroupNorm", "params": {"num_groups": 2, "num_channels": 4, "num_grups": 3}}
    with pytest.raises(ConfigError, match=r"unknown config key 'num_grups'.*valid: .*num_groups"):
        validate_config(cfg)


def test_unknown_node_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'parms'"):
        validate_config({"target": "ldm.models.layers.GroupNorm", "parms": {}})


def test_bad_target():
    with pytest.raises(ConfigError, match="cannot import target 'ldm.nope.Thing'"):
        validate_config({"target": "ldm.nope.Thing"})


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  target: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="scalar.yaml: expected a mapping"):
        load_config(scalar)
