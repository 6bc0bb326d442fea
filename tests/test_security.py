"""Security properties: no code execution when loading, only safetensors published, no token leak.

* A static scan (the ``ast`` of every ``.py`` in the package, hubconf.py, benchmarks/ and
  recipes/): ``torch.load`` (and ``torch.serialization.load``,
  ``torch.hub.load_state_dict_from_url``) only with a literal ``weights_only=True``, and no
  ``weights_only`` option or ``load_kwargs`` entry anywhere set otherwise; no ``pickle.load(s)``
  / ``Unpickler``, dill, cloudpickle, joblib, shelve or marshal; no ``eval`` / ``exec`` and no
  ``torch.hub.load`` (it runs a repository's hubconf.py); ``trust_remote_code`` never set to
  anything but a literal False; no ``allow_pickle`` other than False; YAML read with
  ``yaml.safe_load`` only. The scanner is itself tested on small offending and safe snippets.

  ``trust_remote_code`` may still appear in comments and docstrings (which the scan, reading the
  syntax tree, does not see): documenting that it is never used is useful, and only a keyword
  argument, a mapping key or an assignment can actually enable remote code.
* Only safetensors is published: an export and a converted folder hold no pickle, by name or by
  content, and push refuses a folder holding one (tests/test_hub.py covers the plain suffixes
  ``.bin .pt .pth .pkl .ckpt``; the cases here are the ones a suffix check alone misses).
* The Hugging Face token, set in ``HF_TOKEN`` while a run is trained, exported, converted, listed
  by ``push --dry-run`` and pushed (captured at the HfApi boundary), appears in no byte written,
  no log record at DEBUG level, no output, no safetensors metadata, card, ``config.json`` or
  training configuration, and in nothing uploaded. tests/test_hub.py covers the error paths
  (retries and refusals whose messages echo the token).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants as hub_constants
import pytest
import timm
import torch
import yaml
from huggingface_hub import CommitInfo, HfApi, get_token
from safetensors import safe_open

import mochi_hub
from mochi_hub import hub
from mochi_hub.cli import main
from mochi_hub.config import load_config
from mochi_hub.convert import convert_checkpoint
from mochi_hub.engine import pretrain
from mochi_hub.export import export_backbone

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(mochi_hub.__file__).resolve().parent
TINY = ["train.max_steps=2", "train.log_with=none", "eval.at_start=false", "eval.at_end=false",
        "data.num_workers=0", "model.backbone_kwargs={channels: [8, 16, 16, 16], stem_width: 8}",
        "model.queue_size=64", "mixing.num_hard=16"]  # fmt: skip
TOKEN = "hf_SecurityScanToken7f3a9c1e5b2d8046ZZ"
REPO = "my-lab/resnet18_mochi.token"


# --------------------------------------------------------------------------- the static scan

_TORCH_LOADS = {("torch", "load"), ("torch", "serialization", "load"),
                ("torch", "hub", "load_state_dict_from_url")}  # fmt: skip
_FORBIDDEN_CALLS = {
    ("pickle", "load"): "pickle.load runs pickled code",
    ("pickle", "loads"): "pickle.loads runs pickled code",
    ("pickle", "Unpickler"): "pickle.Unpickler runs pickled code",
    ("_pickle", "load"): "pickle.load runs pickled code",
    ("_pickle", "loads"): "pickle.loads runs pickled code",
    ("marshal", "load"): "marshal.load reads code objects",
    ("marshal", "loads"): "marshal.loads reads code objects",
    ("builtins", "eval"): "eval runs code",
    ("builtins", "exec"): "exec runs code",
    ("eval",): "eval runs code",
    ("exec",): "exec runs code",
    ("torch", "hub", "load"): "torch.hub.load runs a repository's hubconf.py",
}
_FORBIDDEN_MODULES = {"dill", "cloudpickle", "joblib", "shelve", "cPickle"}
_UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load",
                "full_load_all", "Loader", "UnsafeLoader", "FullLoader", "CLoader",
                "CUnsafeLoader", "CFullLoader"}  # fmt: skip


def _is_false(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


class _Scanner(ast.NodeVisitor):
    """Collects the violations of one module, resolving ``import x as y`` aliases."""

    def __init__(self, filename: str):
        self.filename = filename
        self.aliases: dict[str, tuple[str, ...]] = {}  # local name -> dotted origin
        self.violations: list[str] = []
        self.safe_torch_loads = 0

    def _flag(self, node: ast.AST, message: str) -> None:
        self.violations.append(f"{self.filename}:{getattr(node, 'lineno', '?')}: {message}")

    def _dotted(self, node: ast.AST) -> tuple[str, ...] | None:
        """``torch.serialization.load`` as ("torch", "serialization", "load"), aliases resolved."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        head = self.aliases.get(node.id, (node.id,))
        return (*head, *reversed(parts))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            top = alias.name.split(".")[0]
            if top in _FORBIDDEN_MODULES:
                self._flag(node, f"imports {alias.name}, which unpickles")
            if alias.asname:
                self.aliases[alias.asname] = tuple(alias.name.split("."))
            else:
                self.aliases[top] = (top,)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = tuple((node.module or "").split("."))
        if module[0] in _FORBIDDEN_MODULES:
            self._flag(node, f"imports from {node.module}, which unpickles")
        for alias in node.names:
            origin = (*module, alias.name)
            self.aliases[alias.asname or alias.name] = origin
            if module == ("yaml",) and alias.name in _UNSAFE_YAML:
                self._flag(node, f"imports yaml.{alias.name}: use yaml.safe_load")
            if origin in _FORBIDDEN_CALLS:
                self._flag(node, f"imports {'.'.join(origin)}: {_FORBIDDEN_CALLS[origin]}")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = self._dotted(node)
        if dotted and dotted[0] == "yaml" and len(dotted) == 2 and dotted[1] in _UNSAFE_YAML:
            self._flag(node, f"uses yaml.{dotted[1]}: use yaml.safe_load")
        if node.attr == "trust_remote_code" and isinstance(node.ctx, ast.Store):
            self._flag(node, "sets .trust_remote_code")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        dotted = self._dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if dotted in _TORCH_LOADS:
            flag = keywords.get("weights_only")
            if isinstance(flag, ast.Constant) and flag.value is True:
                self.safe_torch_loads += 1
            else:
                self._flag(node, f"{'.'.join(dotted)} without a literal weights_only=True")
        elif dotted in _FORBIDDEN_CALLS:
            self._flag(node, _FORBIDDEN_CALLS[dotted])
        if "trust_remote_code" in keywords and not _is_false(keywords["trust_remote_code"]):
            self._flag(node, "passes trust_remote_code other than a literal False")
        if "allow_pickle" in keywords and not _is_false(keywords["allow_pickle"]):
            self._flag(node, "passes allow_pickle other than a literal False")
        if dotted not in _TORCH_LOADS and "weights_only" in keywords:  # e.g. a wrapper's option
            if not _is_true(keywords["weights_only"]):
                self._flag(node, "passes weights_only other than a literal True")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                if not _is_false(value):
                    self._flag(node, "maps 'trust_remote_code' to something other than False")
            if isinstance(key, ast.Constant) and key.value == "weights_only":
                if not _is_true(value):  # load_kwargs of accelerate's load_state
                    self._flag(node, "maps 'weights_only' to something other than True")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            key = getattr(target, "slice", None)
            if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                if not _is_false(node.value):
                    self._flag(node, "sets ['trust_remote_code'] to something other than False")
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<snippet>") -> SimpleNamespace:
    """The violations of one module's source, and how many safe ``torch.load`` calls it has."""
    scanner = _Scanner(filename)
    scanner.visit(ast.parse(source, filename=filename))
    return SimpleNamespace(violations=scanner.violations, safe=scanner.safe_torch_loads)


def _scanned_files() -> list[Path]:
    files = {p.resolve() for p in PACKAGE.rglob("*.py")}
    if (ROOT / "mochi_hub").is_dir():  # the checkout's copy, when the package is installed
        files |= {p.resolve() for p in (ROOT / "mochi_hub").rglob("*.py")}
    files.add((ROOT / "hubconf.py").resolve())
    for folder in ("benchmarks", "recipes"):
        files |= {p.resolve() for p in (ROOT / folder).rglob("*.py")}
    return sorted(files)


def test_the_code_loads_nothing_unsafely():
    files = _scanned_files()
    assert (ROOT / "hubconf.py").is_file(), "run the tests from a checkout of the repository"
    names = {p.name for p in files}
    # the scan sees the whole code base: the package, hubconf.py and the benchmarks
    assert {"convert.py", "export.py", "hub.py", "engine.py", "hubconf.py"} <= names
    assert len([p for p in files if p.is_relative_to(PACKAGE)]) >= 20
    assert any("benchmarks" in p.parts for p in files)
    violations, safe = [], 0
    for path in files:
        result = scan_source(path.read_text(), str(path))
        violations += result.violations
        safe += result.safe
    assert violations == []
    assert safe >= 1  # convert's torch.load(..., weights_only=True) was seen and accepted


BAD_SNIPPETS = {
    "torch_load_without_flag": ("import torch\ntorch.load('x.pth')", "weights_only"),
    "torch_load_false": ("import torch\ntorch.load(p, weights_only=False)", "weights_only"),
    "torch_load_variable": ("import torch\ntorch.load(p, weights_only=flag)", "weights_only"),
    "torch_load_kwargs": ("import torch\ntorch.load(p, **kw)", "weights_only"),
    "torch_alias": ("import torch as th\nth.load(p)", "torch.load"),
    "from_torch_import_load": ("from torch import load\nload(p)", "torch.load"),
    "serialization_load": ("import torch\ntorch.serialization.load(p)", "weights_only"),
    "hub_url": ("import torch\ntorch.hub.load_state_dict_from_url(u)", "weights_only"),
    "pickle_load": ("import pickle\npickle.load(f)", "pickle.load"),
    "pickle_loads": ("import pickle as pk\npk.loads(b)", "pickle.loads"),
    "pickle_unpickler": ("import pickle\npickle.Unpickler(f).load()", "Unpickler"),
    "from_pickle_import_loads": ("from pickle import loads\nloads(b)", "pickle.loads"),
    "dill": ("import dill\n", "dill"),
    "joblib": ("from joblib import load\n", "joblib"),
    "marshal": ("import marshal\nmarshal.loads(b)", "marshal"),
    "eval": ("eval('1 + 1')", "eval"),
    "exec": ("exec(code)", "exec"),
    "trust_remote_code_true": ("load_dataset('x', trust_remote_code=True)", "trust_remote_code"),
    "trust_remote_code_variable": ("f(trust_remote_code=trust)", "trust_remote_code"),
    "trust_remote_code_dict": ("kw = {'trust_remote_code': True}", "trust_remote_code"),
    "trust_remote_code_item": ("kw['trust_remote_code'] = True", "trust_remote_code"),
    "trust_remote_code_attr": ("cfg.trust_remote_code = True", "trust_remote_code"),
    "yaml_load": ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "yaml"),
    "yaml_unsafe_load": ("import yaml\nyaml.unsafe_load(text)", "yaml"),
    "yaml_full_load": ("import yaml as y\ny.full_load(text)", "yaml"),
    "from_yaml_import_load": ("from yaml import load\n", "yaml"),
    "numpy_allow_pickle": ("import numpy as np\nnp.load(p, allow_pickle=True)", "allow_pickle"),
    "load_state_kwargs": ("acc.load_state(d, load_kwargs={'weights_only': False})", "weights_only"),
    "wrapper_option": ("timm_load(p, weights_only=False)", "weights_only"),
    "torch_hub_load": ("import torch\ntorch.hub.load('org/repo', 'model')", "hubconf"),
}


@pytest.mark.parametrize("source, rule", BAD_SNIPPETS.values(), ids=BAD_SNIPPETS.keys())
def test_the_scanner_flags_unsafe_code(source, rule):
    violations = scan_source(source).violations
    assert violations and any(rule in v for v in violations), violations


SAFE_SNIPPET = '''
"""Docs may say that trust_remote_code is never used."""
import pickle
import torch
import yaml

model.eval()  # a method, not the builtin
state = torch.load(path, map_location="cpu", weights_only=True)
config = yaml.safe_load(text)
pickle.dump(blob, f)  # writing is fine
datasets.load_dataset("x", trust_remote_code=False)
options = {"trust_remote_code": False}
json.load(f)
accelerator.load_state(d, load_kwargs={"weights_only": True})
timm.models.load_checkpoint(model, p, weights_only=True)
# eval(this) in a comment, pickle.loads(that), trust_remote_code=True
'''


def test_the_scanner_accepts_safe_code():
    result = scan_source(SAFE_SNIPPET)
    assert result.violations == [] and result.safe == 1


# --------------------------------------------------------------------------- published files


def _random_resnet18(seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return timm.create_model("resnet18", num_classes=0).state_dict()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Train, export and convert with ``HF_TOKEN`` set, capturing every log record and output."""
    root = tmp_path_factory.mktemp("security")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, logger = Keep(level=logging.DEBUG), logging.getLogger()
    level = logger.level
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setenv("HF_HOME", str(root / "hf_home"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                assert get_token() == TOKEN  # what a leak would be made of is in reach
                pretrain(load_config("quickstart", [f"train.output_dir={root / 'run'}", *TINY]))
                export = export_backbone(root / "run", root / "export", repo_id=REPO)
                moco = {"epoch": 200, "arch": "resnet18", "state_dict": {
                    f"module.encoder_q.{k}": v for k, v in _random_resnet18(0).items()
                }}  # fmt: skip
                torch.save(moco, root / "moco_v2.pth.tar")
                converted = convert_checkpoint(
                    root / "moco_v2.pth.tar", root / "converted", repo_id=REPO
                ).out
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    return SimpleNamespace(
        root=root, export=export, converted=converted, records=records,
        output=out.getvalue() + err.getvalue(),
    )  # fmt: skip


@pytest.mark.parametrize("which", ["export", "converted"])
def test_published_folders_hold_only_safetensors_weights(published, which):
    folder = getattr(published, which)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "README.md"}
    for path in files:
        assert not {s.lower() for s in path.suffixes} & set(hub.PICKLE_SUFFIXES), path
        assert hub._pickled(path) is None, path  # no pickle under another name
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt" and len(list(f.keys())) > 50
    assert hub.check_export(folder) == folder  # what push would accept


def _pickle_named(name: str):
    def write(folder: Path) -> str:
        (folder / name).parent.mkdir(exist_ok=True)
        torch.save({"w": torch.zeros(2)}, folder / name)
        return name

    return write


def _raw_pickle_as_text(folder: Path) -> str:
    (folder / "notes.txt").write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    return "notes.txt (a pickle)"


def _torch_save_as_json(folder: Path) -> str:
    torch.save({"w": torch.zeros(2)}, folder / "eval_results.json")
    return "eval_results.json (a torch.save archive"


def _pickle_as_safetensors(folder: Path) -> str:
    torch.save({"w": torch.zeros(2)}, folder / "extra.safetensors")
    return "extra.safetensors is not a valid safetensors file"


PICKLES_A_SUFFIX_CHECK_MISSES = {
    "double_suffix_pth_tar": (_pickle_named("moco_v2_800ep.pth.tar"), "only safetensors"),
    "pickle_suffix": (_pickle_named("queue.pickle"), "only safetensors"),
    "joblib_suffix": (_pickle_named("probe.joblib"), "only safetensors"),
    "raw_pickle_named_txt": (_raw_pickle_as_text, "only safetensors"),
    "torch_save_named_json": (_torch_save_as_json, "only safetensors"),
    "pickle_named_safetensors": (_pickle_as_safetensors, "not a valid safetensors"),
}


@pytest.mark.parametrize(
    "spoil, message",
    PICKLES_A_SUFFIX_CHECK_MISSES.values(),
    ids=PICKLES_A_SUFFIX_CHECK_MISSES.keys(),
)
def test_push_refuses_pickles_by_name_or_content(published, tmp_path, monkeypatch, spoil, message):
    calls = []
    monkeypatch.setattr(HfApi, "create_commit", lambda self, *a, **k: calls.append(a))
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(a))
    folder = shutil.copytree(published.export, tmp_path / "export")
    named = spoil(folder)
    for dry_run in (True, False):
        with pytest.raises(ValueError, match=message) as info:
            hub.push_folder(folder, REPO, token=TOKEN, dry_run=dry_run)
        assert named in str(info.value)
    assert calls == []


# --------------------------------------------------------------------------- the token


def _token_in(value) -> bool:
    return TOKEN in json.dumps(value, default=str)


def test_no_file_log_or_output_of_training_export_and_conversion_holds_the_token(published):
    written = [p for p in published.root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(written) > 15  # the run, its checkpoint, the export, the conversion
    assert [p for p in written if TOKEN.encode() in p.read_bytes()] == []
    # the same, parsed: safetensors metadata, config.json, the card, the training configs
    weights = [p for p in written if p.suffix == ".safetensors"]
    assert {
        published.export / "model.safetensors",
        published.converted / "model.safetensors",
    } <= set(weights)
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert not _token_in(f.metadata()), path
    for folder in (published.export, published.converted):
        assert not _token_in(json.loads((folder / "config.json").read_text()))
        assert TOKEN not in (folder / "README.md").read_text()
    for config in (
        published.export / "training_config.yaml",
        published.root / "run" / "config.yaml",
    ):
        assert not _token_in(yaml.safe_load(config.read_text()))
    assert published.records  # the run did log (at DEBUG and above), and none of it holds it
    assert not [r for r in published.records if TOKEN in r.getMessage() or _token_in(r.args)]
    assert TOKEN not in published.output


def test_push_and_dry_run_never_log_print_upload_or_write_the_token(
    published, tmp_path, monkeypatch, caplog, capsys
):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    calls, uploaded = [], {}

    def create_repo(self, *args, **kwargs):
        calls.append(("create_repo", kwargs.get("token")))

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", kwargs.get("token")))
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message=kwargs["commit_message"], commit_description="", oid="0" * 40,
        )  # fmt: skip

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    caplog.set_level(logging.DEBUG)
    folder = shutil.copytree(published.export, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    assert main(["push", str(folder), "--repo-id", REPO, "--dry-run"]) == 0
    assert calls == []  # a dry run needs no token and calls nothing
    result = hub.push_folder(folder, REPO)
    assert main(["push", str(folder), "--repo-id", REPO]) == 0

    # the token was used, where it belongs: the two HfApi calls of each push
    assert calls == [("create_repo", TOKEN), ("create_commit", TOKEN)] * 2
    assert uploaded == before and not any(TOKEN.encode() in data for data in uploaded.values())
    assert TOKEN not in repr(result)
    out, err = capsys.readouterr()
    assert "dry run" in out and result.commit_url in out
    assert TOKEN not in out + err
    assert caplog.records and TOKEN not in caplog.text
    assert not [r for r in caplog.records if TOKEN in r.getMessage() or _token_in(r.args)]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    written = [p for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]
