"""Bad weight files, Hub ids and paths: each entry point refuses them, naming the problem.

Three matrices, each the one place where its whole grid is listed:

* **Weights files** (``test_weights_matrix``): every public loader of a weights file (export of a
  training checkpoint, conversion of a released checkpoint, the torchvision builders, evaluation
  of a checkpoint / an export folder / an ``hf-hub:`` id, torch.hub's ``from_hub``) is fed every
  kind of bad file: weights of another architecture (ResNet-50 or ViT where a ResNet-18 is
  expected), missing, extra or mis-shaped keys, an unknown key layout, truncated safetensors and
  ``.pth`` files, an empty file, a pickle carrying code, a text file and a directory. Each must
  raise a ValueError that names the problem (never an error from deep inside safetensors or
  torch), run no pickled code (``torch.load`` only ever with ``weights_only=True``), and leave an
  existing output folder byte for byte as it was.
* **Hub ids** (``test_invalid_hub_id_matrix``, ``test_invalid_revision_matrix``): invalid repo ids
  and revisions given to push, the torchvision builders, evaluation, ``from_hub``, export and
  convert are refused before anything is read, written or uploaded, with the id in the message.
* **Paths** (``test_push_refuses_paths_leaving_the_folder``, ``test_out_matrix``): push refuses an
  export holding a link out of it or a name with ``..`` (nothing reaches the HfApi boundary);
  export and convert ``--out`` replace only a previous export or an empty folder, and never a file.

Related, not repeated here: tests/test_hub.py (malformed export folders, pickle files, repo ids
without a slash), tests/test_convert.py (a pickle written with ``pickle.dump``, ``--arch`` naming
an unknown model), tests/test_torchvision_hub.py (the full message of a builder given another
architecture), tests/test_faults.py (disk errors during an export).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants as hub_constants
import pytest
import timm
import torch
from conftest import make_hub_cache
from huggingface_hub import HfApi
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mochi_hub
from mochi_hub import hub
from mochi_hub import torchvision as mochi_tv
from mochi_hub.cli import main
from mochi_hub.config import load_config
from mochi_hub.convert import convert_checkpoint
from mochi_hub.engine import pretrain
from mochi_hub.evaluate import load_backbone
from mochi_hub.export import export_backbone

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.max_steps=2", "train.log_with=none", "eval.at_start=false", "eval.at_end=false",
        "data.num_workers=0", "model.backbone_kwargs={channels: [8, 16, 16, 16], stem_width: 8}",
        "model.queue_size=64", "mixing.num_hard=16"]  # fmt: skip
NARROW = dict(channels=(8, 16, 16, 16), stem_width=8)  # the tiny run's ResNet-18
TOKEN = "hf_badInputsTokenNeverUsed0123456789"
MUTATING = ("create_repo", "create_branch", "create_commit", "upload_file", "upload_folder",
            "preupload_lfs_files", "delete_file", "delete_folder",
            "delete_repo", "update_repo_settings")  # fmt: skip


# --------------------------------------------------------------------------- shared fixtures


def _snapshot(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (or the file itself): sha256 of files, link targets, dirs."""
    path = Path(path)
    if path.is_symlink():
        return {".": f"link -> {os.readlink(path)}"}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    found = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            found[rel] = f"link -> {os.readlink(p)}"
        elif p.is_file():
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


def _random_state(arch: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(arch, num_classes=0, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real tiny training run, its export, and reference state dicts of several architectures."""
    root = tmp_path_factory.mktemp("bad_inputs")
    result = pretrain(load_config("quickstart", [f"train.output_dir={root / 'run'}", *TINY]))
    state = load_file(str(result.checkpoint / "model.safetensors"))
    return SimpleNamespace(
        root=root,
        run=root / "run",
        ckpt=result.checkpoint,
        # the training checkpoint's other tensors: momentum encoder, projectors, queue
        others={k: v for k, v in state.items() if not k.startswith("backbone.")},
        tiny={
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        },
        full=_random_state("resnet18", 0),  # torchvision's and timm's ResNet-18 share these keys
        resnet50=_random_state("resnet50", 1, **NARROW),
        vit=_random_state("vit_tiny_patch16_224", 2, depth=1),
        previous=export_backbone(root / "run", root / "previous_export", repo_id="lab/previous"),
    )


@pytest.fixture(scope="module")
def hubconf():
    """The repository's hubconf.py (torch.hub's entry points), imported as torch.hub does."""
    spec = importlib.util.spec_from_file_location("mochi_hubconf_under_test", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test, read offline."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def torch_loads(monkeypatch):
    """The ``weights_only`` argument of every ``torch.load`` call (the real one still runs)."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.fixture
def hf_calls(monkeypatch):
    """Every call that would change something on the Hub, recorded at HfApi; none succeeds."""
    calls = []
    for method in MUTATING:

        def record(self, *args, _method=method, **kwargs):
            calls.append((_method, args, kwargs))
            raise AssertionError(f"HfApi.{_method} must not be reached")

        monkeypatch.setattr(HfApi, method, record)
    return calls


# --------------------------------------------------------------------------- 1. weights files


class _Payload:
    """Pickles as a call to ``os.system``: unpickling it unsafely writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {shlex.quote(str(self.marker))}",))


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _save(path: Path, tensors: dict, marker: Path) -> None:
    """safetensors, or for a ``.pth.tar`` name the MoCo release format (DDP ``module.`` keys)."""
    if path.name.endswith(".pth.tar"):
        state = {f"module.{k}": v for k, v in tensors.items()}
        torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    else:
        save_file(tensors, str(path))


def _truncated_safetensors(path: Path, tensors: dict, marker: Path) -> None:
    save_file(tensors, str(path))
    _cut(path)


def _truncated_pth(path: Path, tensors: dict, marker: Path) -> None:
    torch.save({"epoch": 200, "state_dict": tensors}, path)
    _cut(path)


def _zero_byte(path: Path, tensors: dict, marker: Path) -> None:
    path.write_bytes(b"")


def _pickle_with_code(path: Path, tensors: dict, marker: Path) -> None:
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": _Payload(marker)}, path)


def _text_file(path: Path, tensors: dict, marker: Path) -> None:
    path.write_text("These are not the weights you are looking for.\n" * 20)


def _directory(path: Path, tensors: dict, marker: Path) -> None:
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"")


def _dropped(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("layer4.1.bn2.")}


def _widened(sd: dict) -> dict:
    w = sd["layer1.0.conv1.weight"]
    return {**sd, "layer1.0.conv1.weight": torch.zeros(2 * w.shape[0], *w.shape[1:])}


@dataclasses.dataclass(frozen=True)
class Case:
    """A bad weights file: its tensors (from the expected backbone) and how they are written.

    Attributes:
        tensors: ``(world, expected state dict) -> tensors`` to write.
        write: ``(path, tensors, marker)`` writes the file.
        problem: A regex the error message must match (``(?is)``), naming the problem.
        suffix: File suffix where the loader takes any file name (convert).
        keyed: Whether the loader may add its own key prefix (``backbone.``).
    """

    tensors: Callable
    write: Callable
    problem: str
    suffix: str = ".safetensors"
    keyed: bool = True


CASES = {
    "resnet50_for_resnet18": Case(
        lambda w, sd: w.resnet50, _save, r"unexpected.*layer\d\.\d\.(conv3|bn3)\."
    ),
    "vit_for_resnet18": Case(
        lambda w, sd: w.vit,
        _save,
        r"missing.*conv1\.weight.*unexpected.*(blocks\.0|cls_token|pos_embed|patch_embed)",
    ),
    "missing_keys": Case(lambda w, sd: _dropped(sd), _save, r"missing.*layer4\.1\.bn2\."),
    "extra_keys": Case(
        lambda w, sd: {**sd, "extra_head.weight": torch.zeros(3)},
        _save,
        r"unexpected.*extra_head\.weight",
        suffix=".pth.tar",
    ),
    "wrong_shape": Case(
        lambda w, sd: _widened(sd), _save, r"(shape|size mismatch).*layer1\.0\.conv1\.weight"
    ),
    "unknown_key_prefixes": Case(
        lambda w, sd: {f"online_network.encoder.{k}": v for k, v in sd.items()},
        _save,
        r"missing.*conv1\.weight.*unexpected.*online_network\.encoder\.",
        suffix=".pth.tar",
        keyed=False,
    ),
    "truncated_safetensors": Case(
        lambda w, sd: sd, _truncated_safetensors, r"not a valid safetensors file: it is truncated"
    ),
    "truncated_pth": Case(
        lambda w, sd: sd,
        _truncated_pth,
        r"not a valid safetensors file: it is a pickle / torch\.save file",
        suffix=".pth.tar",
    ),
    "zero_byte": Case(lambda w, sd: sd, _zero_byte, r"not a valid safetensors file: it is empty"),
    "pickle_with_code": Case(
        lambda w, sd: sd,
        _pickle_with_code,
        r"not a valid safetensors file: it is a pickle / torch\.save file, which mochi_hub never",
        suffix=".pth.tar",
    ),
    "text_file": Case(
        lambda w, sd: sd, _text_file, r"not a valid safetensors file: it is a text file"
    ),
    "directory": Case(
        lambda w, sd: sd, _directory, r"is a directory, not a (safetensors weights|checkpoint) file"
    ),
}
# Loaders that name the problem in their own words for some cases.
OWN_WORDS = {
    ("export", "unknown_key_prefixes"): r"holds no 'backbone\.\*' weights.*not a mochi_hub",
    ("eval_checkpoint", "unknown_key_prefixes"): r"holds no 'backbone\.\*' weights",
    ("convert", "unknown_key_prefixes"): r"unknown checkpoint layout.*online_network\.encoder\.",
    ("convert", "truncated_pth"): r"cannot read cut\.pth\.tar: truncated, corrupt or not a PyTorch",
    ("convert", "pickle_with_code"): r"not a plain-tensor checkpoint \(it references posix\.system"
    r"\).*never executes pickled code",
}


def _write_case(case: Case, world, expected: dict, path: Path, marker: Path, prefix: str = ""):
    tensors = case.tensors(world, expected)
    if case.keyed and prefix:
        tensors = {f"{prefix}{k}": v for k, v in tensors.items()}
    extra = world.others if prefix else {}  # a checkpoint holds more than the backbone
    case.write(path, {**extra, **tensors}, marker)


def _checkpoint_run(world, tmp: Path, case: Case, marker: Path) -> Path:
    """A run directory like the tiny run, whose checkpoint's model.safetensors is the case."""
    run = tmp / "run"
    step = run / "checkpoints" / world.ckpt.name
    step.mkdir(parents=True)
    shutil.copy(world.run / "config.yaml", run / "config.yaml")
    for name in ("COMPLETE", "trainer_state.json"):
        shutil.copy(world.ckpt / name, step / name)
    _write_case(case, world, world.tiny, step / "model.safetensors", marker, prefix="backbone.")
    return run


def _export_folder(world, tmp: Path, case: Case, marker: Path) -> Path:
    """An export folder (the tiny run's config.json) whose model.safetensors is the case."""
    folder = tmp / "export"
    folder.mkdir()
    shutil.copy(world.previous / "config.json", folder / "config.json")
    _write_case(case, world, world.tiny, folder / "model.safetensors", marker)
    return folder


def _cached_repo(world, tmp: Path, case: Case, marker: Path, expected: dict, config: bool) -> str:
    """``bad-lab/weights`` in this test's offline Hub cache, its model.safetensors the case."""
    repo_id = "bad-lab/weights"
    staging = tmp / "staging"
    staging.mkdir()
    files = ["config.json"] if config else []
    if config:
        shutil.copy(world.previous / "config.json", staging / "config.json")
    if case.write is _directory:
        snap = make_hub_cache(Path(hub_constants.HF_HUB_CACHE), repo_id, staging, files)
        _write_case(case, world, expected, snap / "model.safetensors", marker)
    else:
        _write_case(case, world, expected, staging / "model.safetensors", marker)
        make_hub_cache(
            Path(hub_constants.HF_HUB_CACHE), repo_id, staging, [*files, "model.safetensors"]
        )
    return repo_id


def _load_export(world, hubconf, tmp, case, marker):
    run, out = _checkpoint_run(world, tmp, case, marker), tmp / "out"
    shutil.copytree(world.previous, out)  # a previous export, to be replaced only by a good one
    return lambda: export_backbone(run, out, overwrite=True), [out]


def _load_eval_checkpoint(world, hubconf, tmp, case, marker):
    run = _checkpoint_run(world, tmp, case, marker)
    return lambda: load_backbone(run), []


def _load_convert(world, hubconf, tmp, case, marker):
    path, out = tmp / f"cut{case.suffix}", tmp / "out"
    _write_case(case, world, world.full, path, marker)
    shutil.copytree(world.previous, out)
    return lambda: convert_checkpoint(path, out, arch="resnet18", overwrite=True), [out]


def _load_torchvision(world, hubconf, tmp, case, marker):
    repo_id = _cached_repo(world, tmp, case, marker, world.full, config=False)
    return lambda: mochi_tv.resnet18(weights=f"hf-hub:{repo_id}", progress=False), []


def _load_eval_export(world, hubconf, tmp, case, marker):
    folder = _export_folder(world, tmp, case, marker)
    return lambda: load_backbone(folder), []


def _load_eval_hf_hub(world, hubconf, tmp, case, marker):
    repo_id = _cached_repo(world, tmp, case, marker, world.tiny, config=True)
    return lambda: load_backbone(f"hf-hub:{repo_id}"), []


def _load_hubconf_from_hub(world, hubconf, tmp, case, marker):
    repo_id = _cached_repo(world, tmp, case, marker, world.tiny, config=True)
    return lambda: hubconf.from_hub(repo_id), []


# loader: (prepare(world, hubconf, tmp, case, marker) -> (load, folders it must not change),
#          how its message names the expected model)
LOADERS = {
    "export": (_load_export, r"does not match architecture 'resnet18'"),
    "eval_checkpoint": (_load_eval_checkpoint, r"does not match architecture 'resnet18'"),
    "convert": (_load_convert, r"does not match architecture 'resnet18'"),
    "torchvision": (_load_torchvision, r"do not fit torchvision's resnet18"),
    "eval_export": (_load_eval_export, r"the weights of 'local-dir:.*' do not fit"),
    "eval_hf_hub": (_load_eval_hf_hub, r"the weights of 'hf-hub:bad-lab/.*' do not fit"),
    "hubconf_from_hub": (_load_hubconf_from_hub, r"the weights of 'hf-hub:bad-lab/.*' do not fit"),
}
_CONTENT = ("resnet50_for_resnet18", "vit_for_resnet18", "missing_keys", "extra_keys",
            "wrong_shape", "unknown_key_prefixes")  # fmt: skip
WEIGHT_CELLS = [(loader, case) for loader in LOADERS for case in CASES]


def _prepare(loader, world, hubconf, tmp, case, marker):
    return LOADERS[loader][0](world, hubconf, tmp, case, marker)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_takes_the_good_file(world, hubconf, tmp_path, offline_cache, loader):
    """The control row of the matrix: the harness of each loader does load valid weights."""
    good = Case(lambda w, sd: sd, _save, "")
    load, protected = _prepare(loader, world, hubconf, tmp_path, good, tmp_path / "pwned")
    before = {p: _snapshot(p) for p in protected}
    result = load()
    model = result[0] if isinstance(result, tuple) else result
    if isinstance(model, torch.nn.Module):
        expected = world.full if loader == "torchvision" else world.tiny
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    for path in protected:  # a good file does replace the previous export
        assert _snapshot(path) != before[path] and (path / "model.safetensors").is_file()


@pytest.mark.parametrize("loader, case", WEIGHT_CELLS, ids=[f"{a}-{b}" for a, b in WEIGHT_CELLS])
def test_weights_matrix(world, hubconf, tmp_path, offline_cache, torch_loads, loader, case):
    marker = tmp_path / "pwned"
    load, protected = _prepare(loader, world, hubconf, tmp_path, CASES[case], marker)
    before = {p: _snapshot(p) for p in protected}
    problem = OWN_WORDS.get((loader, case), CASES[case].problem)
    with pytest.raises(ValueError, match=f"(?is){problem}") as info:
        load()
    message = str(info.value)
    if case in _CONTENT and (loader, case) not in OWN_WORDS:
        assert re.search(LOADERS[loader][1], message), message  # names the expected model
    assert len(message) < 2500, "the message should stay readable"
    assert not marker.exists(), "pickled code ran"
    assert all(weights_only is True for weights_only in torch_loads), torch_loads
    if case == "pickle_with_code":  # refused by torch.load(weights_only=True) or not unpickled
        assert torch_loads == ([True] if loader == "convert" else [])
    if loader != "convert" or CASES[case].suffix == ".safetensors":
        assert torch_loads == []  # safetensors files are never given to torch.load
    for path in protected:  # the previous export is untouched, no temporary folder is left
        assert _snapshot(path) == before[path]
        assert sorted(p.name for p in path.parent.glob(f".{path.name}*")) == []


def test_the_pickle_payload_is_armed(tmp_path):
    """Proves the marker check above can fail: an unsafe load of the same file runs the payload."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth.tar"
    _pickle_with_code(path, {}, marker)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what mochi_hub never does
    assert marker.read_text().strip() == "pwned"


def test_the_matrix_covers_every_loader_and_case():
    assert len(CASES) == 12 and len(LOADERS) == 7 and len(WEIGHT_CELLS) == 84


# --------------------------------------------------------------------------- 2. Hub ids


BAD_IDS = {
    "three_parts": "a/b/c",
    "parent_dir": "../x",
    "empty": "",
    "org_only": "org/",
    "name_only": "/name",
    "no_slash": "resnet18",
    "space": "my org/resnet",
    "dotdot_name": "org/..",
    "dotdot_inside": "org/a..b",
    "over_long": "org/" + "n" * 97,
    "newline": "org/res\nnet",
}


def _valid_weights(world, tmp: Path) -> Path:
    path = tmp / "backbone.safetensors"
    save_file(world.full, str(path))
    return path


ID_CONSUMERS = {
    "push": lambda w, tmp, bad, hc: hub.push_folder(w.previous, bad, token=TOKEN),
    "push_dry_run": lambda w, tmp, bad, hc: hub.push_folder(w.previous, bad, dry_run=True),
    "torchvision": lambda w, tmp, bad, hc: mochi_tv.resnet50(weights=f"hf-hub:{bad}"),
    "evaluate": lambda w, tmp, bad, hc: load_backbone(f"hf-hub:{bad}"),
    "hubconf_from_hub": lambda w, tmp, bad, hc: hc.from_hub(bad),
    "export_repo_id": lambda w, tmp, bad, hc: export_backbone(w.run, tmp / "out", repo_id=bad),
    "convert_repo_id": lambda w, tmp, bad, hc: convert_checkpoint(
        _valid_weights(w, tmp), tmp / "out", repo_id=bad
    ),
    "convert_base_model": lambda w, tmp, bad, hc: convert_checkpoint(
        _valid_weights(w, tmp), tmp / "out", base_model=bad
    ),
}
ID_CELLS = [(c, i) for c in ID_CONSUMERS for i in BAD_IDS]


@pytest.mark.parametrize("consumer, bad", ID_CELLS, ids=[f"{c}-{i}" for c, i in ID_CELLS])
def test_invalid_hub_id_matrix(
    world, hubconf, tmp_path, offline_cache, hf_calls, torch_loads, consumer, bad
):
    repo_id = BAD_IDS[bad]
    with pytest.raises(ValueError, match=re.escape(f"invalid repo id {repo_id!r}")):
        ID_CONSUMERS[consumer](world, tmp_path, repo_id, hubconf)
    assert hf_calls == [] and torch_loads == []  # refused before any upload or read
    assert not (tmp_path / "out").exists()
    assert not list(Path(offline_cache).iterdir())  # nor any Hub lookup


@pytest.mark.parametrize("bad", list(BAD_IDS), ids=list(BAD_IDS))
def test_push_command_line_names_the_invalid_id(world, hf_calls, capsys, bad):
    repo_id = BAD_IDS[bad]
    assert main(["push", str(world.previous), f"--repo-id={repo_id}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"mochi-hub push: invalid repo id {repo_id!r}")
    assert hf_calls == []


@pytest.mark.parametrize("org", ["", "a/b", "../x", "my lab", "-lab", "lab--x", "o" * 97])
def test_set_hub_org_refuses_an_invalid_organisation(org):
    before = mochi_hub.hub_org()
    with pytest.raises(ValueError, match="organisation"):
        mochi_hub.set_hub_org(org)
    assert mochi_hub.hub_org() == before


BAD_REVISIONS = {
    "parent_dirs": "../../etc",
    "empty": "",
    "space": "my branch",
    "absolute": "/main",
    "dotdot_inside": "v1..v2",
    "trailing_slash": "dev/",
}
REVISION_CONSUMERS = {
    "push": lambda w, hc, rev: hub.push_folder(w.previous, "lab/x", revision=rev, token=TOKEN),
    "torchvision": lambda w, hc, rev: mochi_tv.resnet18(weights=f"hf-hub:lab/x@{rev}"),
    "evaluate": lambda w, hc, rev: load_backbone(f"hf-hub:lab/x@{rev}"),
    "hubconf_from_hub": lambda w, hc, rev: hc.from_hub(f"lab/x@{rev}"),
}
REVISION_CELLS = [(c, r) for c in REVISION_CONSUMERS for r in BAD_REVISIONS]


@pytest.mark.parametrize(
    "consumer, bad", REVISION_CELLS, ids=[f"{c}-{r}" for c, r in REVISION_CELLS]
)
def test_invalid_revision_matrix(world, hubconf, offline_cache, hf_calls, consumer, bad):
    revision = BAD_REVISIONS[bad]
    with pytest.raises(ValueError, match=re.escape(f"invalid revision {revision!r}")):
        REVISION_CONSUMERS[consumer](world, hubconf, revision)
    assert hf_calls == [] and not list(Path(offline_cache).iterdir())


# --------------------------------------------------------------------------- 3. paths


def _link_out_to_a_file(folder: Path, outside: Path) -> str:
    (folder / "notes.txt").symlink_to(outside / "secret.txt")
    return "notes.txt -> "


def _link_out_to_a_dir(folder: Path, outside: Path) -> str:
    (folder / "extra").symlink_to(outside)
    return "extra -> "


def _weights_linked_from_outside(folder: Path, outside: Path) -> str:
    shutil.move(folder / "model.safetensors", outside / "model.safetensors")
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    return "model.safetensors -> "


def _relative_link_climbing_out(folder: Path, outside: Path) -> str:
    (folder / "images").mkdir()
    (folder / "images" / "plot.png").symlink_to(Path("..", "..", "outside", "secret.txt"))
    return "images/plot.png -> ../../outside/secret.txt (a link out of the folder)"


def _link_to_a_dir_inside(folder: Path, outside: Path) -> str:
    (folder / "sub").mkdir()
    (folder / "sub" / "a.txt").write_text("a")
    (folder / "alias").symlink_to("sub")
    return "alias -> sub (a link to a directory or to nothing)"


def _dangling_link(folder: Path, outside: Path) -> str:
    (folder / "gone.txt").symlink_to(folder / "nowhere.txt")
    return "gone.txt -> "


def _dotdot_name(folder: Path, outside: Path) -> str:
    (folder / "..hidden.txt").write_text("x")
    return "'..hidden.txt' (a name with '..'"


def _dotdot_inside_a_name(folder: Path, outside: Path) -> str:
    (folder / "docs").mkdir()
    (folder / "docs" / "a..b.md").write_text("x")
    return "'docs/a..b.md' (a name with '..'"


def _control_character_in_a_name(folder: Path, outside: Path) -> str:
    (folder / "eval\nresults.json").write_text("[]")
    return "(a name with '..', a backslash or a control character)"


PUSH_PATHS = {
    "link_out_to_a_file": _link_out_to_a_file,
    "link_out_to_a_dir": _link_out_to_a_dir,
    "weights_linked_from_outside": _weights_linked_from_outside,
    "relative_link_climbing_out": _relative_link_climbing_out,
    "link_to_a_dir_inside": _link_to_a_dir_inside,
    "dangling_link": _dangling_link,
    "dotdot_name": _dotdot_name,
    "dotdot_inside_a_name": _dotdot_inside_a_name,
    "control_character_in_a_name": _control_character_in_a_name,
}


@pytest.mark.parametrize("spoil", PUSH_PATHS.values(), ids=PUSH_PATHS.keys())
def test_push_refuses_paths_leaving_the_folder(world, tmp_path, hf_calls, capsys, spoil):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("ssh-rsa AAAA private")
    folder = shutil.copytree(world.previous, tmp_path / "export")
    named = spoil(folder, outside)
    for dry_run in (True, False):
        with pytest.raises(ValueError, match="reach outside it or have unsafe names") as info:
            hub.push_folder(folder, "lab/x", token=TOKEN, dry_run=dry_run)
        assert named in str(info.value) and "nothing was uploaded" in str(info.value)
    assert main(["push", str(folder), "--repo-id", "lab/x", "--dry-run"]) == 2
    assert "reach outside it" in capsys.readouterr().err
    assert hf_calls == []


def test_push_follows_links_inside_the_folder_and_a_linked_folder(world, tmp_path, hf_calls):
    """The allowed side of the rule: a link to a file inside, and the folder itself a link."""
    folder = shutil.copytree(world.previous, tmp_path / "export")
    (folder / "card.md").symlink_to("README.md")
    (tmp_path / "latest").symlink_to(folder)
    files = hub.push_folder(tmp_path / "latest", "lab/x", dry_run=True).files
    assert {f.path for f in files} == {p.name for p in folder.iterdir()}
    card = next(f for f in files if f.path == "card.md")
    assert card.size == (folder / "README.md").stat().st_size


def _previous_export(world, out: Path) -> None:
    shutil.copytree(world.previous, out)


def _home_like(world, out: Path) -> None:
    out.mkdir()
    (out / ".bashrc").write_text("export PATH=$HOME/bin:$PATH\n")
    (out / "thesis.tex").write_text("\\section{Results}\n")
    (out / "photos").mkdir()
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")


def _export_with_extra_notes(world, out: Path) -> None:
    shutil.copytree(world.previous, out)
    (out / "my_notes.txt").write_text("do not lose")


def _readme_only(world, out: Path) -> None:
    out.mkdir()
    (out / "README.md").write_text("# My project\n")


def _regular_file(world, out: Path) -> None:
    out.write_text("precious\n")


def _symlink_to_an_export(world, out: Path) -> None:
    target = shutil.copytree(world.previous, out.parent / "real_export")
    out.symlink_to(target)


def _empty_dir(world, out: Path) -> None:
    out.mkdir()


# (how `out` is prepared, overwrite, error type or None for success, message)
OUT_CASES = {
    "previous_export_without_overwrite": (_previous_export, False, FileExistsError,
                                          "already exists; pass overwrite=True"),
    "home_dir_with_overwrite": (_home_like, True, FileExistsError,
                                r"is not a previous export: it holds \.bashrc, photos/, thesis"
                                r"\.tex; --overwrite only replaces an export folder"),
    "export_plus_foreign_file_with_overwrite": (_export_with_extra_notes, True, FileExistsError,
                                                r"it holds my_notes\.txt"),
    "readme_only_with_overwrite": (_readme_only, True, FileExistsError,
                                   r"not a previous export \(no model\.safetensors, "
                                   r"config\.json\)"),
    "regular_file": (_regular_file, False, FileExistsError, "is an existing file, not an export"),
    "regular_file_with_overwrite": (_regular_file, True, FileExistsError,
                                    "is an existing file, not an export"),
    "symlink_with_overwrite": (_symlink_to_an_export, True, FileExistsError,
                               "is a symbolic link"),
    "previous_export_with_overwrite": (_previous_export, True, None, ""),
    "empty_dir_with_overwrite": (_empty_dir, True, None, ""),
}  # fmt: skip
OUT_WRITERS = {
    "export": lambda w, tmp, out, overwrite: export_backbone(
        w.run, out, repo_id="lab/new", overwrite=overwrite
    ),
    "convert": lambda w, tmp, out, overwrite: convert_checkpoint(
        _valid_weights(w, tmp), out, repo_id="lab/new", overwrite=overwrite
    ),
}
OUT_CELLS = [(w, c) for w in OUT_WRITERS for c in OUT_CASES]


@pytest.mark.parametrize("writer, case", OUT_CELLS, ids=[f"{w}-{c}" for w, c in OUT_CELLS])
def test_out_matrix(world, tmp_path, writer, case):
    prepare, overwrite, error, message = OUT_CASES[case]
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "resnet18_mochi.new"
    prepare(world, out)
    before = _snapshot(parent)
    if error is not None:
        with pytest.raises(error, match=message):
            OUT_WRITERS[writer](world, tmp_path, out, overwrite)
        assert _snapshot(parent) == before  # nothing lost, nothing left behind
        return
    OUT_WRITERS[writer](world, tmp_path, out, overwrite)
    assert sorted(p.name for p in parent.iterdir()) == [out.name]  # no temporary folder left
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
    assert "lab/new" in (out / "README.md").read_text()  # the new export, not the previous one
    assert "lab/previous" not in (out / "README.md").read_text()


def test_out_inside_a_file_is_a_clear_error(world, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        export_backbone(world.run, tmp_path / "file" / "out")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        convert_checkpoint(_valid_weights(world, tmp_path), tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "x"


DETECTRON2_OUT = {
    "directory": (lambda out: out.mkdir(), True, FileExistsError, "is a directory or a link"),
    "not_pkl": (None, True, ValueError, r"must be a \.pkl file"),
    "existing_pkl_without_overwrite": (lambda out: out.write_bytes(b"old"), False,
                                       FileExistsError, "already exists"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DETECTRON2_OUT))
def test_detectron2_out(world, tmp_path, case):
    prepare, overwrite, error, message = DETECTRON2_OUT[case]
    out = tmp_path / "out" / ("r18.pkl" if case != "not_pkl" else "r18.bashrc")
    out.parent.mkdir()
    if prepare:
        prepare(out)
    before = _snapshot(out.parent)
    with pytest.raises(error, match=message):
        convert_checkpoint(
            _valid_weights(world, tmp_path), out, to="detectron2", overwrite=overwrite
        )
    assert _snapshot(out.parent) == before
