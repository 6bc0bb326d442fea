"""The shipped recipes and launch configs: they load, say how to run them, and match their names."""

import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

from mochi_hub.config import load_config
from mochi_hub.data.transforms import two_view_transform
from mochi_hub.moco import create_backbone

RECIPES_DIR = Path(__file__).parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))
MOCHI_NAME = re.compile(r"_mochi_(\d+)_(\d+)_(\d+)(?:_|$)")
LAUNCH = re.compile(
    r"accelerate launch --config_file recipes/accelerate/(\w+)\.yaml -m mochi_hub pretrain "
    r"recipes/(\S+)\.yaml"
)


def _ids(paths):
    return [p.stem for p in paths]


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _recipe(stem: str) -> Path:
    return RECIPES_DIR / f"{stem}.yaml"


def test_the_expected_recipes_are_shipped():
    stems = {p.stem for p in RECIPES}
    expected = {
        *(f"in1k_resnet50_mocov2_ep{e}" for e in (100, 200, 800)),
        *(f"in1k_resnet50_mochi_1024_512_256_ep{e}" for e in (100, 200, 800)),
        "in1k_resnet50_mochi_256_512_0_ep200",
        "in1k_resnet50_mochi_256_512_256_ep200",
        "in1k_resnet50_mochi_128_1024_512_ep200",
        "in100_resnet50_mocov2_ep200",
        "in100_resnet50_mochi_1024_512_256_ep200",
        "in1k_vit_small_mocov3_mochi",
        "in1k_vit_base_mocov3_mochi",
        "cifar10_resnet18_mochi",
        "cifar10_resnet18_mocov2",
    }
    assert expected <= stems, sorted(expected - stems)


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids(RECIPES))
def test_recipe_loads_and_builds(recipe):
    cfg = load_config(recipe)
    # the backbone (with its backbone_kwargs) and the augmentation (with its overrides) build;
    # on the meta device, so no weights are allocated
    with torch.device("meta"):
        backbone = create_backbone(cfg.model.arch, **cfg.model.backbone_kwargs)
    assert backbone.num_features > 0
    d = cfg.data
    two_view_transform(
        d.augmentation, d.image_size, mean=d.mean, std=d.std, **d.augmentation_overrides
    )


def test_recipe_names_are_unique():
    names = [load_config(p).name for p in RECIPES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize(
    "recipe",
    [p for p in RECIPES if p.stem != "quickstart"],
    ids=_ids([p for p in RECIPES if p.stem != "quickstart"]),
)
def test_recipe_header_gives_its_launch_command(recipe):
    header = _header(recipe)
    assert header, f"{recipe.name} has no header comment"
    match = LAUNCH.search(header)
    assert match, (
        f"{recipe.name}: no `accelerate launch ... -m mochi_hub pretrain` line in the header"
    )
    topology, named = match.groups()
    assert named == recipe.stem, f"{recipe.name}: its launch command runs recipes/{named}.yaml"
    assert (RECIPES_DIR / "accelerate" / f"{topology}.yaml").is_file()
    assert "Expected" in header, f"{recipe.name}: the header states no expected result"


def test_quickstart_header_gives_its_command():
    header = _header(_recipe("quickstart"))
    assert re.search(r"pretrain (recipes/)?quickstart", header), header


@pytest.mark.parametrize(
    "recipe",
    [p for p in RECIPES if MOCHI_NAME.search(p.stem)],
    ids=_ids([p for p in RECIPES if MOCHI_NAME.search(p.stem)]),
)
def test_mochi_recipe_matches_its_name(recipe):
    n, s, s_q = map(int, MOCHI_NAME.search(recipe.stem).groups())
    mix = load_config(recipe).mixing
    assert mix.enabled
    assert (mix.num_hard, mix.num_synthetic, mix.num_synthetic_query) == (n, s, s_q)


@pytest.mark.parametrize(
    "recipe",
    [p for p in RECIPES if "mochi" not in p.stem and p.stem != "quickstart"],
    ids=_ids([p for p in RECIPES if "mochi" not in p.stem and p.stem != "quickstart"]),
)
def test_baselines_have_mixing_disabled(recipe):
    assert not load_config(recipe).mixing.enabled


def test_every_recipe_is_a_mochi_or_a_baseline():
    for p in RECIPES:
        cfg = load_config(p)
        if "mochi" in p.stem:
            assert cfg.mixing.enabled, p.name
        elif p.stem != "quickstart":
            assert "mocov2" in p.stem or "mocov3" in p.stem, p.name


@pytest.mark.parametrize(
    "prefix, warmup, queue",
    [("in1k_resnet50_mochi_", 15, 65536), ("in100_resnet50_mochi_", 10, 16384)],
)
def test_imagenet_mochi_warmup_and_queue(prefix, warmup, queue):
    recipes = [p for p in RECIPES if p.stem.startswith(prefix)]
    assert recipes
    for p in recipes:
        cfg = load_config(p)
        assert cfg.mixing.start_epoch == warmup, p.name
        assert cfg.model.queue_size == queue, p.name


@pytest.mark.parametrize("stem", ["in1k_resnet50_mocov2_ep200", "in100_resnet50_mocov2_ep200"])
def test_mochi_recipes_differ_from_their_baseline_only_in_mixing(stem):
    base = yaml.safe_load(_recipe(stem).read_text())
    mochi_prefix = stem.split("_mocov2_")[0] + "_mochi_"
    epochs = stem.rsplit("_", 1)[1]
    for p in RECIPES:
        if p.stem.startswith(mochi_prefix) and p.stem.endswith(epochs):
            other = yaml.safe_load(p.read_text())
            for section in set(base) | set(other):
                if section != "mixing":
                    assert base.get(section) == other.get(section), (p.name, section)


def test_epoch_counts_match_the_names():
    for p in RECIPES:
        match = re.search(r"_ep(\d+)$", p.stem)
        if match:
            assert load_config(p).train.epochs == int(match.group(1)), p.name


def test_mocov3_recipes():
    for stem in ("in1k_vit_small_mocov3_mochi", "in1k_vit_base_mocov3_mochi"):
        cfg = load_config(_recipe(stem))
        m, o = cfg.model, cfg.optim
        assert m.method == "mocov3" and m.proj_layers == 3 and m.pred_last_bn
        assert (m.hidden_dim, m.proj_dim, m.temperature, m.momentum) == (4096, 256, 0.2, 0.99)
        assert m.momentum_schedule == "cosine"
        assert (o.name, o.base_lr, o.weight_decay, o.schedule_unit) == (
            "adamw",
            1.5e-4,
            0.1,
            "step",
        )
        assert (o.warmup_epochs, cfg.train.epochs, cfg.data.batch_size) == (40, 300, 4096)
        assert cfg.mixing.enabled and cfg.mixing.num_hard <= cfg.data.batch_size - 1


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=_ids(ACCELERATE_CONFIGS))
def test_accelerate_config_loads(config):
    cfg = load_config_from_file(str(config))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
    assert config.read_text().startswith("#"), f"{config.name} has no header comment"


def test_accelerate_topologies():
    cfgs = {p.stem: load_config_from_file(str(p)) for p in ACCELERATE_CONFIGS}
    assert {"cpu", "cpu_2proc", "gpu1", "gpu8", "multi_node"} <= set(cfgs)
    assert cfgs["cpu"].distributed_type == DistributedType.NO and cfgs["cpu"].use_cpu
    # two CPU workers need the torchrun (multi-GPU) launcher; see the comment in the file
    assert cfgs["cpu_2proc"].distributed_type == DistributedType.MULTI_GPU
    assert cfgs["cpu_2proc"].num_processes == 2
    assert cfgs["gpu1"].num_processes == 1 and cfgs["gpu1"].mixed_precision == "bf16"
    assert cfgs["gpu8"].distributed_type == DistributedType.MULTI_GPU
    assert cfgs["gpu8"].num_processes == 8 and cfgs["gpu8"].mixed_precision == "bf16"
    multi = cfgs["multi_node"]
    assert multi.num_machines == 2 and multi.num_processes == 16
    assert multi.rdzv_backend == "c10d" and multi.mixed_precision == "bf16"


def test_recipe_global_batches_split_over_their_topology():
    for p in RECIPES:
        match = LAUNCH.search(_header(p))
        if match:
            acc = load_config_from_file(str(RECIPES_DIR / "accelerate" / f"{match.group(1)}.yaml"))
            load_config(p).check_world_size(acc.num_processes)


def test_slurm_script_is_valid_bash():
    script = RECIPES_DIR / "slurm_multinode.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n#SBATCH")
    assert "accelerate/multi_node.yaml" in text and "srun" in text and "SLURM_NODEID" in text


@pytest.fixture(scope="module")
def fake_imagefolder(tmp_path_factory):
    """A tiny labelled image folder standing in for each recipe's real data set."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fake_images")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("test", 4)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=_ids(RECIPES))
def test_every_recipe_trains_one_step_on_fake_data(recipe, fake_imagefolder, tmp_path):
    """Each recipe's own model, optimiser, schedule, mixing and augmentation, at toy sizes."""
    from mochi_hub.engine import pretrain

    cfg = load_config(recipe)
    d, m, x = cfg.data, cfg.model, cfg.mixing
    d.source, d.image_size, d.batch_size, d.num_workers = str(fake_imagefolder), 32, 8, 0
    d.class_subset, d.eval_source, d.eval_train_split, d.eval_split = None, None, "train", "test"
    d.split, d.image_column, d.label_column = "train", None, "label"
    if "vit" in m.arch:
        m.backbone_kwargs = {**m.backbone_kwargs, "img_size": 32}
    m.hidden_dim = min(m.hidden_dim, 64)
    m.key_bn_splits = min(m.key_bn_splits, 2)
    m.queue_size = min(m.queue_size, 16)
    if x.enabled:  # keep the recipe's kind of mixing, at a size the toy pool allows
        x.num_hard = min(x.num_hard, 4)
        x.num_synthetic, x.num_synthetic_query = (
            min(x.num_synthetic, 3),
            min(x.num_synthetic_query, 2),
        )
        x.start_epoch = 0
    cfg.eval.knn_k, cfg.eval.max_train_images = 5, None
    cfg.eval.at_start, cfg.eval.at_end, cfg.eval.every_epochs = False, True, 0
    t = cfg.train
    t.max_steps, t.log_every, t.log_with, t.output_dir = 1, 1, "none", str(tmp_path / "run")
    result = pretrain(cfg)
    assert result.steps == 1 and result.checkpoint is not None
    assert 0.0 <= result.knn_final["top1"] <= 100.0
