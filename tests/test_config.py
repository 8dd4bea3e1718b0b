"""Config loading and validation: every bad value is refused with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from alpa_tune.config import ConfigError, StudyConfig, config_from_dict, load_config, parse_override, to_toml
from alpa_tune.preflight import check_registries

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_with_its_documented_values() -> None:
    config = load_config(ROOT / "studies" / "digits-lt.toml")
    assert config.name == "digits-lt"
    assert config.data.source == "digits-lt"
    assert config.data.image_size == 32
    assert config.search.variants == ("alpa", "alpa_hill")
    assert config.search.space.alpha == (0.5, 2.0)
    assert config.search.space.gamma_neg == (0.0, 5.0)


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_study_config_is_valid(path: Path) -> None:
    assert load_config(path).name


def test_set_overrides_parse_toml_values(tiny_config: Path) -> None:
    config = load_config(tiny_config, ["training.folds=3", "search.space.alpha=[0.5, 1.5]",
                                       "model.backbone=resnet18", "search.variants=['alpa']"])
    assert config.training.folds == 3
    assert config.search.space.alpha == (0.5, 1.5)
    assert config.model.backbone == "resnet18"
    assert config.search.variants == ("alpa",)


def test_parse_override_keeps_bare_words_as_strings() -> None:
    assert parse_override("data.path=/data/aptos/train.csv") == ("data.path", "/data/aptos/train.csv")
    assert parse_override("training.lr=1e-4") == ("training.lr", 1e-4)


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("trainig.folds=3", "trainig", "unknown key"),
        ("training.fold=3", "training.fold", "unknown key"),
        ("training.folds='3'", "training.folds", "expected an integer"),
        ("training.folds=1", "training.folds", ">= 2"),
        ("search.n_trials=0", "search.n_trials", ">= 1"),
        ("data.image_size=4", "data.image_size", ">= 8"),
        ("search.space.alpha=[1.5, 0.6]", "search.space.alpha", "greater than high"),
        ("search.space.gamma_neg=[0, 7]", "search.space.gamma_neg", "allowed range"),
        ("search.space.beta=0.5", "search.space.beta", "[low, high]"),
        ("search.variants=['alpa', 'alpa_hil']", "search.variants", "not one of"),
        ("model.backbone=resnet_does_not_exist", "model.backbone", "not a timm model"),
        ("search.sampler=grid", "search.sampler", "not one of"),
        ("training.holdout=1.5", "training.holdout", "between 0 and 1"),
        ("workers.grace_period=1", "workers.grace_period", "must exceed"),
        ("data.source=nowhere", "data.source", "not one of"),
        ("training.pretrained=true", "training.pretrained", "unknown key"),
        ("model.pretrained=1", "model.pretrained", "true or false"),
        ("training.device=gpu0", "training.device", "not one of"),
        ("noequals", "noequals", "KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(tiny_config: Path, override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        # Registry names (data sources, timm backbones) are checked by preflight, before any work.
        check_registries(load_config(tiny_config, [override]))
    message = str(caught.value)
    assert key in message and words in message
    assert "\n" not in message


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n[data")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_round_trip_through_dict_and_toml(tmp_path: Path, tiny_config: Path) -> None:
    config = load_config(tiny_config, ["search.space.alpha=[0.6, 1.9]"])
    assert config_from_dict(config.to_dict()) == config
    written = tmp_path / "again.toml"
    written.write_text(to_toml(config.to_dict()))
    assert load_config(written) == config


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "my-study.toml"
    path.write_text("[training]\nfolds = 2\n")
    assert load_config(path).name == "my-study"
    assert isinstance(load_config(path), StudyConfig)
