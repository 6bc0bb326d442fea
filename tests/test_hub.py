"""Publishing an export to the Hub (captured at HfApi's network methods) and pulling it back."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import httpx2
import huggingface_hub.constants as hub_constants
import pytest
import timm
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import (
    BadRequestError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import hf_raise_for_status
from safetensors.torch import load_file, save_file

from mochi_hub import hub
from mochi_hub.cli import main
from mochi_hub.config import load_config
from mochi_hub.engine import pretrain
from mochi_hub.export import export_backbone

TINY = ["train.max_steps=2", "train.log_with=none", "eval.at_start=false", "eval.at_end=false",
        "data.num_workers=0", "model.backbone_kwargs={channels: [8, 16, 16, 16], stem_width: 8}",
        "model.queue_size=64", "mixing.num_hard=16"]  # fmt: skip
KW = dict(channels=(8, 16, 16, 16), stem_width=8)
ROWS = [{"dataset": "digits", "split": "test", "protocol": "knn", "metric": "top1", "value": 92.5}]
REPO = "my-lab/resnet18_mochi.cifar10"
TOKEN = "hf_secretTokenDoNotLeak0123456789abcdef"
MUTATING = ("create_repo", "create_branch", "create_commit", "upload_file", "upload_folder",
            "delete_file", "delete_folder", "delete_repo", "preupload_lfs_files",
            "update_repo_settings")  # fmt: skip


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_export")
    pretrain(load_config("quickstart", [f"train.output_dir={root / 'run'}", *TINY]))
    return export_backbone(
        root / "run", root / "resnet18_mochi.cifar10", repo_id=REPO, eval_results=ROWS
    )


@pytest.fixture
def folder(export, tmp_path):
    """A private copy of the export, for tests that change it."""
    return shutil.copytree(export, tmp_path / export.name)


@pytest.fixture(autouse=True)
def no_login(tmp_path, monkeypatch):
    """No token anywhere: not in the environment, not in a login file of the real home."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return home


def http_error(
    status, *, message="", headers=None, url=f"https://huggingface.co/api/models/{REPO}"
):
    """The error huggingface_hub raises for a response of ``status`` to an authenticated call."""
    request = httpx2.Request(
        "POST", f"{url}/commit/main", headers={"authorization": f"Bearer {TOKEN}"}
    )
    response = httpx2.Response(
        status,
        request=request,
        headers=headers or {},
        json={"error": message or f"status {status}"},
    )
    with pytest.raises(HfHubHTTPError) as info:
        hf_raise_for_status(response)
    return info.value


def content(op):
    data = op.path_or_fileobj
    if isinstance(data, bytes):
        return data
    if isinstance(data, str | os.PathLike):
        with open(data, "rb") as f:
            return f.read()
    return data.read()


class FakeHub:
    """Stands in for the Hub behind HfApi's mutating methods; records every call."""

    def __init__(self):
        self.calls = []  # (method, args, kwargs) of every attempt
        self.commits = []  # {path_in_repo: bytes} of the commits that succeeded
        self.failures = {}  # method -> list of exceptions raised by its next calls

    def fail(self, method, *errors):
        self.failures.setdefault(method, []).extend(errors)

    def handle(self, method, args, kwargs):
        self.calls.append((method, args, kwargs))
        pending = self.failures.get(method)
        if pending:
            raise pending.pop(0)
        if method == "create_commit":
            repo_id, ops = args
            assert all(isinstance(op, CommitOperationAdd) for op in ops)
            self.commits.append({op.path_in_repo: content(op) for op in ops})
            n = len(self.commits)
            pr = (
                f"https://huggingface.co/{repo_id}/discussions/{n}" if kwargs["create_pr"] else None
            )
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{n:040x}",
                commit_message=kwargs["commit_message"],
                commit_description="",
                oid=f"{n:040x}",
                pr_url=pr,
            )
        return None

    def named(self, method):
        return [(a, k) for m, a, k in self.calls if m == method]

    def methods(self):
        return [m for m, _, _ in self.calls]


@pytest.fixture
def fake_hub(monkeypatch):
    fake = FakeHub()
    for method in MUTATING:

        def record(self, *args, _method=method, **kwargs):
            return fake.handle(_method, args, kwargs)

        monkeypatch.setattr(HfApi, method, record)
    return fake


def exported_files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --- push --------------------------------------------------------------------------------------


def test_push_is_one_commit_of_exactly_the_exported_files(export, fake_hub):
    result = hub.push_folder(
        export, REPO, private=True, revision="v1", create_pr=True, token=TOKEN,
        commit_message="first weights",
    )  # fmt: skip
    assert fake_hub.methods() == ["create_repo", "create_branch", "create_commit"]
    ((args, kwargs),) = fake_hub.named("create_repo")
    assert args == (REPO,)
    assert kwargs == dict(
        token=TOKEN, private=True, exist_ok=True, repo_type="model"
    )  # fmt: skip
    ((args, kwargs),) = fake_hub.named("create_branch")
    assert args == (REPO,) and kwargs["branch"] == "v1" and kwargs["exist_ok"] is True
    ((args, kwargs),) = fake_hub.named("create_commit")
    assert args[0] == REPO and kwargs["token"] == TOKEN and kwargs["repo_type"] == "model"
    assert (kwargs["revision"], kwargs["create_pr"]) == ("v1", True)
    assert kwargs["commit_message"] == "first weights"
    (commit,) = fake_hub.commits
    assert commit == exported_files(export)  # every file, byte for byte, at the repo's root
    assert set(commit) == {"model.safetensors", "config.json", "README.md",
                           "training_config.yaml", "eval_results.json"}  # fmt: skip
    assert result.commit_url == f"https://huggingface.co/{REPO}/commit/{1:040x}"
    assert result.pr_url == f"https://huggingface.co/{REPO}/discussions/1"
    assert [(f.path, f.size) for f in result.files] == [
        (name, os.path.getsize(export / name)) for name in sorted(commit)
    ]


def test_push_to_main_creates_no_branch_and_the_token_comes_from_the_login(
    export, fake_hub, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = hub.push_folder(export, REPO)
    assert fake_hub.methods() == ["create_repo", "create_commit"]
    assert fake_hub.named("create_repo")[0][1]["private"] is False
    ((_, kwargs),) = fake_hub.named("create_commit")
    assert kwargs["token"] == TOKEN and kwargs["revision"] is None
    assert kwargs["create_pr"] is False and "resnet18_mochi.cifar10" in kwargs["commit_message"]
    assert fake_hub.commits == [exported_files(export)]
    assert result.pr_url is None and not result.dry_run


def test_dry_run_lists_exactly_the_files_and_sizes_and_calls_nothing(export, fake_hub, capsys):
    assert get_token() is None  # needs no token
    result = hub.push_folder(export, REPO, dry_run=True)
    expected = [(p.name, os.path.getsize(p)) for p in sorted(export.iterdir())]
    assert [(f.path, f.size) for f in result.files] == expected
    assert result.total_bytes == sum(size for _, size in expected)
    assert result.dry_run and result.commit_url is None

    assert main(["push", str(export), "--repo-id", REPO, "--dry-run"]) == 0
    *lines, total = capsys.readouterr().out.strip().splitlines()
    assert [(line.split()[1], int(line.split()[0])) for line in lines] == expected
    assert int(total.split()[0]) == result.total_bytes and "dry run" in total
    assert fake_hub.calls == []


# --- errors ------------------------------------------------------------------------------------


def test_a_missing_token_says_how_to_log_in(export, fake_hub, capsys):
    assert get_token() is None
    with pytest.raises(ValueError, match="hf auth login") as info:
        hub.push_folder(export, REPO)
    assert "HF_TOKEN" in str(info.value)
    assert main(["push", str(export), "--repo-id", REPO]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mochi-hub push: no Hugging Face token") and "hf auth login" in line
    assert fake_hub.calls == []


@pytest.mark.parametrize(
    "repo_id", ["resnet18_mochi", "a/b/c", "my-lab/bad--name", "my lab/x", "-lab/x", ""]
)
def test_a_bad_repo_id_is_refused_before_any_call(export, fake_hub, capsys, repo_id):
    with pytest.raises(ValueError, match="invalid repo id"):
        hub.push_folder(export, repo_id, token=TOKEN)
    assert main(["push", str(export), f"--repo-id={repo_id}", "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mochi-hub push: invalid repo id")
    assert fake_hub.calls == []


def _drop_readme(folder):
    (folder / "README.md").unlink()


def _not_format_pt(folder):
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"), metadata={"format": "np"})


def _garbage_weights(folder):
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")


def _no_architecture(folder):
    (folder / "config.json").write_text(json.dumps({"num_classes": 0}))


@pytest.mark.parametrize(
    "spoil, message",
    [
        (_drop_readme, "not a mochi_hub export: missing README.md"),
        (_not_format_pt, "format='np', expected 'pt'"),
        (_garbage_weights, "not a valid safetensors file"),
        (_no_architecture, "names no timm 'architecture'"),
    ],
)
def test_a_folder_that_is_not_an_export_is_refused(folder, fake_hub, spoil, message):
    spoil(folder)
    with pytest.raises(ValueError, match=message):
        hub.push_folder(folder, REPO, token=TOKEN)
    with pytest.raises(ValueError, match=message):
        hub.push_folder(folder, REPO, dry_run=True)
    assert fake_hub.calls == []


def test_a_checkpoint_or_a_missing_folder_is_refused(export, fake_hub, tmp_path, capsys):
    ckpt = sorted((export.parent / "run" / "checkpoints").iterdir())[-1]
    with pytest.raises(ValueError, match="missing config.json, README.md"):
        hub.push_folder(ckpt, REPO, token=TOKEN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.push_folder(tmp_path / "nowhere", REPO, token=TOKEN)
    with pytest.raises(ValueError, match="not a directory"):
        hub.push_folder(export / "model.safetensors", REPO, token=TOKEN)
    assert main(["push", str(tmp_path / "nowhere"), "--repo-id", REPO]) == 2
    assert main(["push", str(ckpt), "--repo-id", REPO]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("mochi-hub push: ") for line in lines)
    assert fake_hub.calls == []


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "extra/backbone.pt", "model.pth", "queue.pkl", "last.CKPT"]
)
def test_a_folder_holding_a_pickle_is_refused(folder, fake_hub, capsys, name):
    (folder / name).parent.mkdir(exist_ok=True)
    torch.save({"w": torch.zeros(2)}, folder / name)
    with pytest.raises(ValueError, match="only safetensors") as info:
        hub.push_folder(folder, REPO, token=TOKEN)
    assert name in str(info.value)
    assert main(["push", str(folder), "--repo-id", REPO, "--dry-run"]) == 2
    assert "pickle" in capsys.readouterr().err
    assert fake_hub.calls == []


def test_the_token_is_never_logged_printed_raised_or_written(
    folder, fake_hub, monkeypatch, caplog, capsys, no_login
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    sleeps = []
    # transient failures, retried (their messages echo the token), then a commit
    fake_hub.fail(
        "create_commit",
        ConnectionError(f"proxy rejected Bearer {TOKEN}"),
        http_error(503, message=f"overloaded for {TOKEN}"),
    )
    result = hub.push_folder(folder, REPO, sleep=sleeps.append)
    assert result.commit_url and len(sleeps) == 2
    assert main(["push", str(folder), "--repo-id", REPO]) == 0
    # a refusal whose server message echoes the token
    fake_hub.fail("create_commit", http_error(403, message=f"token {TOKEN} cannot write"))
    with pytest.raises(HfHubHTTPError) as info:
        hub.push_folder(folder, REPO, sleep=sleeps.append)
    fake_hub.fail("create_commit", http_error(403, message=f"token {TOKEN} cannot write"))
    assert main(["push", str(folder), "--repo-id", REPO]) == 1

    # the token did reach the Hub calls, and nothing else
    assert {kwargs["token"] for _, _, kwargs in fake_hub.calls} == {TOKEN}
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value.args)
    assert "cannot write" in str(info.value)
    assert TOKEN not in (info.value.server_message or "")
    out, err = capsys.readouterr()
    assert "403" in err and "nothing was committed" in err
    assert TOKEN not in out + err
    assert caplog.records and any(
        "proxy rejected Bearer ***" in r.getMessage() for r in caplog.records
    )
    assert not [r for r in caplog.records if TOKEN in r.getMessage() or TOKEN in str(r.args)]
    assert TOKEN not in caplog.text
    written = [p for root in (folder, no_login) if root.exists() for p in root.rglob("*")]
    assert not [p for p in written if p.is_file() and TOKEN.encode() in p.read_bytes()]


# --- retries -----------------------------------------------------------------------------------


TRANSIENT = {
    "503": lambda: http_error(503),
    "500": lambda: http_error(500),
    "429": lambda: http_error(429),
    "ConnectionError": lambda: ConnectionError("connection reset by peer"),
    "ConnectTimeout": lambda: httpx2.ConnectTimeout("timed out"),
    "ReadTimeout": lambda: httpx2.ReadTimeout("timed out"),
}


@pytest.mark.parametrize("make_error", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_errors_are_retried_with_growing_delays(export, fake_hub, make_error):
    fake_hub.fail("create_commit", make_error(), make_error())
    sleeps = []
    result = hub.push_folder(export, REPO, token=TOKEN, base_delay=0.5, sleep=sleeps.append)
    assert fake_hub.methods() == ["create_repo"] + ["create_commit"] * 3
    assert sleeps == [0.5, 1.0]
    assert fake_hub.commits == [exported_files(export)]  # the retried commit holds every file
    assert result.commit_url.endswith(f"{1:040x}")


def test_create_repo_is_retried_too_and_retry_after_is_honoured(export, fake_hub):
    fake_hub.fail("create_repo", http_error(429, headers={"Retry-After": "7"}))
    sleeps = []
    hub.push_folder(export, REPO, token=TOKEN, sleep=sleeps.append)
    assert fake_hub.methods() == ["create_repo", "create_repo", "create_commit"]
    assert sleeps == [7.0]
    assert hub.backoff_delay(3, base_delay=1.0, max_delay=60.0) == 8.0
    assert hub.backoff_delay(10, base_delay=1.0, max_delay=60.0) == 60.0


PERMANENT = {
    "401": (lambda: http_error(401), RepositoryNotFoundError),
    "403": (lambda: http_error(403), HfHubHTTPError),
    "404": (lambda: http_error(404), HfHubHTTPError),
    "400": (lambda: http_error(400), BadRequestError),
    "offline": (lambda: OfflineModeIsEnabled("offline mode is enabled"), OfflineModeIsEnabled),
}


@pytest.mark.parametrize("make_error, kind", PERMANENT.values(), ids=PERMANENT.keys())
def test_permanent_errors_are_raised_at_once(export, fake_hub, make_error, kind):
    error = make_error()
    fake_hub.fail("create_commit", error)
    sleeps = []
    with pytest.raises(kind) as info:
        hub.push_folder(export, REPO, token=TOKEN, sleep=sleeps.append)
    assert info.value is error
    assert fake_hub.methods() == ["create_repo", "create_commit"]
    assert sleeps == [] and fake_hub.commits == []


def test_a_commit_that_keeps_failing_raises_and_leaves_the_remote_unchanged(export, fake_hub):
    errors = [http_error(502) for _ in range(4)]
    fake_hub.fail("create_commit", *errors)
    sleeps = []
    with pytest.raises(HfHubHTTPError) as info:
        hub.push_folder(export, REPO, token=TOKEN, max_retries=3, sleep=sleeps.append)
    assert info.value is errors[-1]
    assert sleeps == [1.0, 2.0, 4.0]
    # besides the idempotent create_repo, the single commit was the only write ever attempted
    assert fake_hub.methods() == ["create_repo"] + ["create_commit"] * 4
    assert fake_hub.commits == []


def test_the_real_client_offline_fails_at_once(export, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    sleeps = []
    with pytest.raises(OfflineModeIsEnabled) as info:
        hub.push_folder(export, REPO, token=TOKEN, sleep=sleeps.append)
    assert sleeps == [] and TOKEN not in str(info.value)


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_push_prints_the_commit_and_pr_urls(export, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    argv = ["push", str(export), "--repo-id", REPO, "--private", "--revision", "dev",
            "--create-pr", "--commit-message", "v2 weights"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"https://huggingface.co/{REPO}/commit/{1:040x}",
        f"pull request: https://huggingface.co/{REPO}/discussions/1",
    ]
    assert fake_hub.named("create_repo")[0][1]["private"] is True
    assert fake_hub.named("create_branch")[0][1]["branch"] == "dev"
    ((_, kwargs),) = fake_hub.named("create_commit")
    assert (kwargs["revision"], kwargs["create_pr"]) == ("dev", True)
    assert kwargs["commit_message"] == "v2 weights"
    assert fake_hub.commits == [exported_files(export)]


# --- pull --------------------------------------------------------------------------------------

PULL = textwrap.dedent(
    """
    import json, sys
    import torch, timm
    from safetensors.torch import save_file
    import mochi_hub

    out, overlay = sys.argv[1], sys.argv[2]
    kw = dict(channels=(8, 16, 16, 16), stem_width=8)
    models = {
        "registered": timm.create_model("resnet18_mochi.cifar10", pretrained=True, **kw),
        "hf_hub": timm.create_model("hf-hub:my-lab/resnet18_mochi.cifar10", pretrained=True),
        "overlay": timm.create_model(
            "resnet18_mochi.cifar10", pretrained=True, pretrained_cfg_overlay=dict(file=overlay),
            **kw,
        ),
        "features": timm.create_model(
            "resnet18_mochi.cifar10", pretrained=True, features_only=True, **kw
        ),
    }
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    report = {"hub_id": models["registered"].pretrained_cfg["hf_hub_id"]}
    for name, model in models.items():
        model.eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  f"{out}/{name}.safetensors")
        with torch.no_grad():
            y = model(x)
        report[name] = [t.double().sum().item() for t in (y if isinstance(y, list) else [y])]
    report["channels"] = models["features"].feature_info.channels()
    print(json.dumps(report))
    """
)


def test_pull_through_timm_from_an_offline_hub_cache(export, hub_cache, tmp_path):
    weights = load_file(str(export / "model.safetensors"))
    cache = hub_cache(REPO, export)
    overlay = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(overlay, str(tmp_path / "overlay.safetensors"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), MOCHI_HUB_ORG="my-lab")
    env.pop("HF_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-c", PULL, str(tmp_path), str(tmp_path / "overlay.safetensors")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["hub_id"] == REPO

    for name, expected in (("registered", weights), ("hf_hub", weights), ("overlay", overlay)):
        loaded = load_file(str(tmp_path / f"{name}.safetensors"))
        assert loaded.keys() == expected.keys(), name
        for k, v in expected.items():
            assert torch.equal(loaded[k], v), (name, k)
    features = load_file(str(tmp_path / "features.safetensors"))
    assert features and all(torch.equal(v, weights[k]) for k, v in features.items())
    assert {k.split(".")[0] for k in features} == {"conv1", "bn1", "layer1", "layer2", "layer3",
                                                  "layer4"}  # fmt: skip

    ref = timm.create_model("resnet18", num_classes=0, **KW).eval()
    ref.load_state_dict(weights)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x).double().sum().item()
        feats = ref.forward_intermediates(x, intermediates_only=True)
    assert report["registered"] == pytest.approx([expected], rel=1e-5)
    assert report["hf_hub"] == pytest.approx([expected], rel=1e-5)
    assert report["overlay"] != pytest.approx([expected], rel=1e-3)  # the file's weights, not hub's
    assert report["channels"] == [f.shape[1] for f in feats] == [64, 8, 16, 16, 16]
    assert report["features"] == pytest.approx([f.double().sum().item() for f in feats], rel=1e-5)
