"""Bad recipes and overrides: rejected by ``mochi-hub pretrain`` before any data or device.

Every case runs the real command line (``mochi_hub.cli.main``) with the data loading and the
Accelerator (process group, device memory) replaced by tripwires: a case passes only if the
command exits with status 2, prints one line that names the offending key, and neither read
data, set up a device nor created a run directory.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mochi_hub import cli, engine

ROOT = Path(__file__).parents[1]

# (overrides, the message: a regular expression naming the key)
BAD_OVERRIDES = {
    # unknown keys, with the nearest valid one suggested
    "unknown-section": (["modle.arch=resnet18"], r"unknown config key 'modle'"),
    "unknown-leaf": (["mixing.num_hrad=3"], r"'mixing.num_hrad'; did you mean 'mixing.num_hard'"),
    "leaf-without-section": (["num_hard=3"], r"'num_hard'; did you mean 'mixing.num_hard'"),
    "key-below-a-value": (["model.arch.depth=3"], r"model.arch must be a string"),
    # wrong types
    "int-as-word": (["mixing.num_hard=abc"], r"mixing.num_hard must be an integer"),
    "int-as-float": (["mixing.num_hard=1.5"], r"mixing.num_hard must be an integer"),
    "int-as-bool": (["mixing.num_hard=true"], r"mixing.num_hard must be an integer"),
    "int-as-list": (["data.batch_size=[64]"], r"data.batch_size must be an integer"),
    "float-as-word": (["model.temperature=hot"], r"model.temperature must be a number"),
    "float-nan": (["model.temperature=.nan"], r"model.temperature must be > 0"),
    "float-inf": (["optim.base_lr=.inf"], r"optim.base_lr must be > 0"),
    "bool-as-int": (["mixing.enabled=3"], r"mixing.enabled must be true or false"),
    "choice": (["model.method=simclr"], r"model.method must be one of"),
    "tuple-length": (["data.mean=[1,2]"], r"data.mean must have 3 values"),
    "section-as-value": (["model=3"], r"model must be a mapping"),
    "string-as-number": (["data.source=3"], r"data.source must be a string"),
    # negative or zero sizes
    "batch-zero": (["data.batch_size=0"], r"data.batch_size must be > 0"),
    "batch-negative": (["data.batch_size=-64"], r"data.batch_size must be > 0"),
    "queue-negative": (["model.queue_size=-1"], r"model.queue_size must be > 0"),
    "image-size-negative": (["data.image_size=-32"], r"data.image_size must be > 0"),
    "proj-dim-zero": (["model.proj_dim=0"], r"model.proj_dim must be > 0"),
    "epochs-negative": (["train.epochs=-1"], r"train.epochs must be > 0"),
    "workers-negative": (["data.num_workers=-1"], r"data.num_workers must be >= 0"),
    "keep-zero": (["train.keep_checkpoints=0"], r"train.keep_checkpoints must be >= 1"),
    # MoCHi's (N, s, s') and beta
    "N-above-queue": (["mixing.num_hard=70000"], r"mixing.num_hard \(70000\) is larger than"),
    "N-zero-with-mixing": (["mixing.num_hard=0"], r"mixing.num_hard must be >= 1"),
    "N-above-batch-mocov3": (
        ["model.method=mocov3", "model.arch=vit_small_patch16_224", "mixing.num_hard=4096"],
        r"mixing.num_hard \(4096\) is larger than the in-batch negatives",
    ),
    "s-negative": (["mixing.num_synthetic=-1"], r"mixing.num_synthetic must be >= 0"),
    "s-prime-negative": (["mixing.num_synthetic_query=-2"], r"num_synthetic_query must be >= 0"),
    "beta-zero": (["mixing.max_beta=0"], r"mixing.max_beta must be in \(0, 0.5\]"),
    "beta-above-half": (["mixing.max_beta=0.6"], r"mixing.max_beta must be in \(0, 0.5\]"),
    "beta-negative": (["mixing.max_beta=-0.1"], r"mixing.max_beta must be in \(0, 0.5\]"),
    "beta-nan": (["mixing.max_beta=.nan"], r"mixing.max_beta must be in \(0, 0.5\]"),
    "momentum-above-one": (["model.momentum=1.5"], r"model.momentum must be in \[0, 1\]"),
    # queue smaller than the global batch
    "queue-below-batch": (
        ["model.queue_size=64", "data.batch_size=128", "mixing.enabled=false"],
        r"model.queue_size \(64\) is smaller than the global batch data.batch_size \(128\)",
    ),
    # the run name becomes runs/<name>: no path tricks
    "name-traversal": (["name=../../etc"], r"name must be a plain directory name"),
    "name-with-slash": (["name=a/b"], r"name must be a plain directory name"),
    "name-empty": (["name="], r"name must be a plain directory name"),
    # malformed overrides
    "no-equals": (["noequals"], r"'noequals' must have the form key=value"),
    "empty-key": (["=3"], r"has an empty key"),
    "bad-yaml-value": (
        ["mixing.num_hard=[1, 2"],
        r"'mixing.num_hard=\[1, 2': cannot parse the value \(line 1, column 6: expected ','",
    ),
}


@pytest.fixture
def tripwires(monkeypatch, tmp_path):
    """Fail loudly if the command gets as far as data, a device or a run directory."""
    reached = []

    def data(*args, **kwargs):
        reached.append("data")
        raise AssertionError("data was read")

    def accelerator(*args, **kwargs):
        reached.append("accelerator")
        raise AssertionError("a process group / device was set up")

    monkeypatch.setattr(engine, "build_data", data)
    monkeypatch.setattr(engine, "_make_accelerator", accelerator)
    monkeypatch.setattr(engine, "Accelerator", accelerator)
    monkeypatch.chdir(tmp_path)
    return reached


def _rejects(argv, match, reached, capsys, tmp_path):
    assert cli.main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mochi-hub: configuration error: "), err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert re.search(match, err), (match, err)
    assert reached == []
    assert [p.name for p in tmp_path.iterdir() if p.name != "my_recipe.yaml"] == []  # no runs/


@pytest.mark.parametrize("overrides, match", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_bad_override_is_rejected_before_data_or_device(
    overrides, match, tripwires, capsys, tmp_path
):
    _rejects(["quickstart", *overrides], match, tripwires, capsys, tmp_path)


BAD_RECIPES = {
    "typo-in-section": ("mixing:\n  num_synthtic: 3\n", r"mixing.num_synthtic.*mixing.num_syn"),
    "unknown-section": ("trainer:\n  epochs: 3\n", r"unknown config key 'trainer'"),
    "wrong-type": ("data:\n  batch_size: lots\n", r"data.batch_size must be an integer"),
    "section-is-a-list": ("model: [resnet50]\n", r"model must be a mapping of its fields"),
    "not-a-mapping": ("- just\n- a list\n", r"must be a mapping of config sections"),
    "invalid-yaml": ("model: {arch: resnet18\n", r"invalid YAML \(line 2, column 1: expected ','"),
    "bad-value": ("mixing:\n  max_beta: 0.9\n", r"mixing.max_beta must be in"),
}


@pytest.mark.parametrize("text, match", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_bad_recipe_file_is_rejected_before_data_or_device(
    text, match, tripwires, capsys, tmp_path
):
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text(text)
    _rejects([str(recipe)], match, tripwires, capsys, tmp_path)


def test_missing_recipe_is_rejected_listing_the_shipped_ones(tripwires, capsys, tmp_path):
    _rejects(["no_such_recipe"], r"no_such_recipe.*quickstart", tripwires, capsys, tmp_path)


def test_batch_not_divisible_by_the_launchers_processes(tripwires, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as accelerate launch / torchrun set it
    _rejects(
        ["quickstart", "data.batch_size=128"],
        r"data.batch_size \(128\) is not divisible by the number of processes \(3\)",
        tripwires,
        capsys,
        tmp_path,
    )


def test_a_good_override_passes_the_tripwires(tripwires, tmp_path):
    # the control: a valid configuration does get as far as the device set-up
    with pytest.raises(AssertionError, match="process group / device"):
        cli.main(["pretrain", "quickstart", "mixing.num_hard=16"])
    assert tripwires == ["accelerator"]


@pytest.mark.multiprocess
def test_two_process_launch_with_an_odd_batch_stops_at_once(tmp_path):
    """Both ranks of a real ``accelerate launch`` refuse, naming the key, and nothing hangs."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
           "-m", "mochi_hub", "pretrain", "quickstart", "data.batch_size=33",
           f"data.source={tmp_path / 'never_read'}", f"train.output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    message = "data.batch_size (33) is not divisible by the number of processes (2)"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]  # each rank says so
    assert "mochi_hub/engine.py" not in proc.stderr  # refused by the CLI, no engine traceback
    assert not out.exists()
