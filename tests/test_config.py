from pathlib import Path

import pytest
import yaml

from mochi_hub.config import Config, ConfigError, config_to_dict, find_recipe, load_config

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_defaults_are_moco_v2_with_mochi_paper_values():
    cfg = load_config()
    assert (cfg.model.queue_size, cfg.model.temperature, cfg.model.momentum) == (65536, 0.2, 0.999)
    assert (cfg.mixing.num_hard, cfg.mixing.num_synthetic, cfg.mixing.num_synthetic_query) == (
        1024,
        512,
        256,
    )
    assert cfg.mixing.max_beta == 0.5 and cfg.optim.base_lr == 0.03


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.name == yaml.safe_load(recipe.read_text()).get("name", recipe.stem)


def test_recipe_by_name_and_overrides_win():
    cfg = load_config("quickstart", ["mixing.num_hard=32", "train.epochs=2", "data.mean=[0,0,0]"])
    assert cfg.name == "quickstart"
    assert cfg.mixing.num_hard == 32 and cfg.train.epochs == 2
    assert cfg.data.mean == (0.0, 0.0, 0.0)
    # YAML 1.1 reads 1e-4 as a string; a float field still takes it
    assert load_config(None, ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4
    assert find_recipe("recipes/quickstart.yaml").is_file()


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'mixing.num_hrad'.*mixing.num_hard"):
        load_config(None, ["mixing.num_hrad=3"])
    with pytest.raises(ConfigError, match=r"'num_hard'.*mixing.num_hard"):
        load_config(None, ["num_hard=3"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(None, ["modle.arch=resnet18"])


def test_recipe_typo_fails_fast(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mixing:\n  num_synthtic: 3\n")
    with pytest.raises(ConfigError, match="mixing.num_synthtic.*mixing.num_synthetic"):
        load_config(bad)


# Bad values and overrides: the matrix in tests/test_bad_recipes.py.


def test_batch_must_split_over_processes():
    cfg = load_config(None, ["data.batch_size=255"])
    with pytest.raises(ConfigError, match="not divisible by the number of processes"):
        cfg.check_world_size(2)
    cfg.check_world_size(1)
    split = load_config(
        None, ["data.batch_size=16", "model.key_bn_splits=4", "mixing.enabled=false"]
    )
    split.check_world_size(2)  # 8 images per process, 2 per BatchNorm chunk
    with pytest.raises(ConfigError, match="model.key_bn_splits"):
        split.check_world_size(4)


def test_missing_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no_such_recipe")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("quickstart", ["mixing.num_hard=16"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    again = load_config(path)
    assert again == cfg
    assert isinstance(Config(), Config)
