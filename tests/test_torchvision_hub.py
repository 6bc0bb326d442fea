"""torchvision builders and weights enums, and torch.hub entrypoints, on an offline Hub cache."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants as hub_constants
import pytest
import timm
import torch
import torchvision
from conftest import make_hub_cache
from safetensors.torch import load_file, save_file
from torchvision.transforms import InterpolationMode

import mochi_hub
from mochi_hub.export import write_hub_folder
from mochi_hub.torchvision import ResNet18_MoCHi_Weights, ResNet50_MoCHi_Weights, resnet18, resnet50

ROOT = Path(__file__).resolve().parents[1]
R50 = "my-lab/resnet50_mochi.in1k_200ep"
R18 = "my-lab/resnet18_mochi.cifar10"
CUSTOM = "other-lab/moco-r50-custom"  # not a registered config: any exported repository
WRONG = "my-lab/resnet50_mochi.in1k_800ep"  # holds ResNet-18 weights
HEADED = "other-lab/resnet18-with-classifier"  # a ResNet-18 file with fc.* keys
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CIFAR = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def _random_backbone(arch, seed):
    """A timm feature backbone whose every tensor is random (BN too, so no block is a no-op)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(arch, num_classes=0)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if name.endswith("running_var") or (name.endswith("weight") and t.ndim == 1):
                    t.uniform_(0.5, 1.5)
                elif name.endswith(("running_mean", "bias")):
                    t.normal_(0.0, 0.1)
    return model.eval()


def _export(model, arch, out, size, stats, crop_pct):
    return write_hub_folder(
        model,
        out,
        architecture=arch,
        metadata={"architecture": arch, "method": "mocov2"},
        data_config={"input_size": (3, size, size), "interpolation": "bilinear",
                     "crop_pct": crop_pct, **stats},
        card=dict(method="MoCo-v2"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Exports of random ResNet-50/18 backbones, laid out as an offline Hugging Face Hub cache."""
    root = tmp_path_factory.mktemp("tv_hub")
    cache = root / "hf_cache"
    ref50, ref18 = _random_backbone("resnet50", 0), _random_backbone("resnet18", 1)
    f50 = _export(ref50, "resnet50", root / "resnet50_mochi.in1k_200ep", 224, IMAGENET, 0.875)
    f18 = _export(ref18, "resnet18", root / "resnet18_mochi.cifar10", 32, CIFAR, 1.0)
    for repo, folder in ((R50, f50), (CUSTOM, f50), (R18, f18), (WRONG, f18)):
        make_hub_cache(cache, repo, folder)
    headed = root / "headed"
    headed.mkdir()
    sd18 = ref18.state_dict()
    save_file({**sd18, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)},
              str(headed / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    make_hub_cache(cache, HEADED, headed, files=("model.safetensors",))
    gen = torch.Generator().manual_seed(2)
    x50, x18 = torch.randn(2, 3, 96, 96, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
    save_file({"x50": x50, "x18": x18}, str(root / "inputs.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (_run)
    try:
        with torch.no_grad():
            y50, y18 = ref50(x50), ref18(x18)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(
        root=root, cache=cache, inputs=root / "inputs.safetensors", sd18=sd18, y50=y50, y18=y18
    )


@pytest.fixture
def offline(hub, monkeypatch):
    """This process reads the module's Hub cache, offline, with the weights under ``my-lab``."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    before = mochi_hub.hub_org()
    mochi_hub.set_hub_org("my-lab")
    yield hub
    mochi_hub.set_hub_org(before)


def _run(hub, script, *args, **env):
    """Run ``script`` in a fresh interpreter, offline on the Hub cache, org set before import."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub.cache),
        "MOCHI_HUB_ORG": "my-lab",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "OMP_NUM_THREADS": "1",  # OpenMP threads spin badly on a busy 2-core CI machine
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True, text=True, env=env, cwd=hub.root, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


TV_SCRIPT = """
import json, sys
import timm, torch
from safetensors.torch import load_file, save_file
from mochi_hub.torchvision import ResNet50_MoCHi_Weights, resnet50

x = load_file(sys.argv[1])["x50"]
tv = resnet50(weights=ResNet50_MoCHi_Weights.DEFAULT).eval()
tm = timm.create_model("resnet50_mochi.in1k_200ep", pretrained=True).eval()
hub = resnet50(weights="hf-hub:other-lab/moco-r50-custom").eval()
by_name = resnet50(weights="IN1K_200EP").eval()
head = resnet50(weights="ResNet50_MoCHi_Weights.DEFAULT", num_classes=10).eval()
with torch.no_grad():
    out = {"tv": tv(x), "timm": tm(x), "hub": hub(x), "name": by_name(x), "logits": head(x),
           "fc_weight": head.fc.weight.clone(), "fc_bias": head.fc.bias.clone()}
    head.fc = torch.nn.Identity()
    out["head_features"] = head(x)
save_file(out, sys.argv[2])
print(json.dumps({"type": f"{type(tv).__module__}.{type(tv).__qualname__}",
                  "fc": type(tv.fc).__name__, "url": ResNet50_MoCHi_Weights.DEFAULT.url}))
"""


def test_builder_and_timm_load_the_same_offline_file_under_the_env_org(hub):
    info = _run(hub, TV_SCRIPT, hub.inputs, hub.root / "tv_out.safetensors")
    out = load_file(str(hub.root / "tv_out.safetensors"))
    assert info["type"] == "torchvision.models.resnet.ResNet" and info["fc"] == "Identity"
    assert info["url"] == f"https://huggingface.co/{R50}/resolve/main/model.safetensors"
    assert out["tv"].shape == (2, 2048)
    assert torch.equal(out["tv"], out["timm"])  # one file, timm and torchvision alike
    torch.testing.assert_close(out["tv"], hub.y50, rtol=1e-6, atol=1e-6)  # the exported model
    assert torch.equal(out["hub"], out["tv"]) and torch.equal(out["name"], out["tv"])
    # num_classes: the pretrained backbone under a fresh torchvision-initialised nn.Linear
    assert out["logits"].shape == (2, 10) and out["fc_weight"].shape == (10, 2048)
    bound = 1 / 2048**0.5  # nn.Linear's default (kaiming-uniform) init, which ResNet keeps
    assert 0 < out["fc_weight"].abs().max() <= bound and out["fc_bias"].abs().max() <= bound
    torch.testing.assert_close(out["head_features"], hub.y50, rtol=1e-6, atol=1e-6)


def test_weights_transforms_and_meta_follow_the_registered_config():
    w = ResNet50_MoCHi_Weights.DEFAULT
    assert w is ResNet50_MoCHi_Weights.IN1K_200EP
    assert [m.name for m in ResNet50_MoCHi_Weights] == ["IN1K_200EP", "IN1K_800EP", "IN100_200EP"]
    t = w.transforms()
    assert isinstance(t, torchvision.transforms._presets.ImageClassification)
    assert (t.crop_size, t.resize_size, t.interpolation) == (
        [224],
        [256],
        InterpolationMode.BILINEAR,
    )
    assert (tuple(t.mean), tuple(t.std)) == (IMAGENET["mean"], IMAGENET["std"])
    assert t(torch.rand(3, 300, 400)).shape == (3, 224, 224)
    c = ResNet18_MoCHi_Weights.DEFAULT.transforms()
    assert (c.crop_size, c.resize_size, tuple(c.mean)) == ([32], [32], CIFAR["mean"])
    for weights, builder in ((w, resnet50), (ResNet18_MoCHi_Weights.CIFAR10, resnet18)):
        meta = weights.meta
        assert meta["categories"] is None and meta["min_size"] == (1, 1) and meta["_metrics"] == {}
        assert meta["num_params"] == sum(p.numel() for p in builder().parameters())
        assert meta["recipe"].startswith("https://") and meta["recipe"].endswith(".yaml")
        assert (ROOT / "recipes" / meta["recipe"].rsplit("/", 1)[1]).is_file()
        assert "arXiv:2010.01028" in meta["paper"] and "MoCHi" in meta["_docs"]
        assert meta["hf_hub_id"] == f"{mochi_hub.hub_org()}/{weights.timm_name}"
        cfg = timm.models.get_pretrained_cfg(weights.timm_name)
        assert weights.transforms().crop_size == [cfg.input_size[-1]]


def test_get_model_weights_and_verify():
    assert torchvision.models.get_model_weights(resnet50) is ResNet50_MoCHi_Weights
    assert torchvision.models.get_model_weights(resnet18) is ResNet18_MoCHi_Weights
    verify = ResNet50_MoCHi_Weights.verify
    assert verify("IN1K_200EP") is ResNet50_MoCHi_Weights.IN1K_200EP
    assert verify("ResNet50_MoCHi_Weights.DEFAULT") is ResNet50_MoCHi_Weights.IN1K_200EP
    assert verify(None) is None
    with pytest.raises(TypeError, match="ResNet50_MoCHi_Weights"):
        verify(ResNet18_MoCHi_Weights.CIFAR10)
    with pytest.raises(ValueError, match="IN1K_800EP.*hf-hub"):
        resnet50(weights="IN22K")  # unknown names are refused before any download
    with pytest.raises(ValueError, match="hf-hub:<org>/<name>"):
        resnet50(weights="hf-hub:no-org-here")
    model = resnet50()  # no weights: the same feature backbone, randomly initialised
    assert isinstance(model.fc, torch.nn.Identity)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    assert resnet50(num_classes=7).fc.out_features == 7


def test_url_meta_and_download_follow_the_current_hub_org(offline):
    w = ResNet18_MoCHi_Weights.CIFAR10
    assert (
        w.url
        == "https://huggingface.co/my-lab/resnet18_mochi.cifar10/resolve/main/model.safetensors"
    )
    state = w.get_state_dict(progress=False, check_hash=True)  # torchvision's call, from my-lab
    assert state.keys() == offline.sd18.keys() and "fc.weight" not in state
    assert all(torch.equal(state[k], v) for k, v in offline.sd18.items())
    mochi_hub.set_hub_org("nobody")
    assert w.url.startswith("https://huggingface.co/nobody/resnet18_mochi.cifar10/")
    assert w.meta["hf_hub_id"] == "nobody/resnet18_mochi.cifar10"
    with pytest.raises(FileNotFoundError):  # looked up under the new org: not in the cache
        w.get_state_dict()


def test_a_file_of_another_architecture_is_a_clear_error(offline):
    with pytest.raises(ValueError) as err:
        resnet50(weights=ResNet50_MoCHi_Weights.IN1K_800EP)
    msg = str(err.value)
    assert "ResNet50_MoCHi_Weights.IN1K_800EP (hf-hub:my-lab/resnet50_mochi.in1k_800ep)" in msg
    assert "exported from 'resnet18'" in msg and "torchvision's resnet50" in msg
    assert "missing keys" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatches" in msg and "layer1.0.conv1.weight: (64, 64, 3, 3)" in msg
    with pytest.raises(ValueError, match="missing keys.*layer1.0.conv3.weight"):
        resnet50(weights="IN1K_800EP", num_classes=10)  # only fc.* may be missing
    with pytest.raises(ValueError, match=f"hf-hub:{R18}.*torchvision's resnet50"):
        resnet50(weights=f"hf-hub:{R18}")
    with pytest.raises(ValueError, match=r"2 unexpected keys: \['fc.bias', 'fc.weight'\]"):
        resnet18(weights=f"hf-hub:{HEADED}")  # a classifier the backbone does not have
    model = resnet18(weights=f"hf-hub:{R18}")  # while the right file loads
    assert all(torch.equal(model.state_dict()[k], v) for k, v in offline.sd18.items())


HUB_SCRIPT = """
import json, os, sys
import torch
from safetensors.torch import load_file, save_file

root, inputs, out = sys.argv[1:4]
x = load_file(inputs)
m = torch.hub.load(root, "resnet18_mochi", source="local", pretrained=True, tag="cifar10").eval()
other = torch.hub.load(root, "from_hub", "other-lab/moco-r50-custom", source="local").eval()
tv = torch.hub.load(root, "resnet18_tv", source="local", weights="CIFAR10").eval()
enum = torch.hub.load(root, "get_model_weights", "resnet50_tv", source="local")
# torch.hub.list/help take only a GitHub "owner/repo:ref": serve this checkout as its cached copy
hub_dir = torch.hub.get_dir()
os.makedirs(hub_dir)
os.symlink(root, os.path.join(hub_dir, "mochi-hub_mochi_hub_main"))
names = torch.hub.list("mochi-hub/mochi_hub:main", trust_repo=True)
doc = torch.hub.help("mochi-hub/mochi_hub:main", "resnet50_mochi", trust_repo=True)
with torch.no_grad():
    tensors = {"timm18": m(x["x18"]), "tv18": tv(x["x18"]), "from_hub": other(x["x50"])}
save_file({**tensors, **{"sd." + k: v for k, v in m.state_dict().items()}}, out)
print(json.dumps({"names": names, "doc": doc, "enum": f"{enum.__module__}.{enum.__qualname__}",
                  "timm_type": type(m).__module__, "tv_type": type(tv).__module__}))
"""


def test_torch_hub_local_load_list_and_help(hub):
    out_path = hub.root / "hub_out.safetensors"
    info = _run(hub, HUB_SCRIPT, ROOT, hub.inputs, out_path, TORCH_HOME=hub.root / "torch_home")
    out = load_file(str(out_path))
    state = {k.removeprefix("sd."): v for k, v in out.items() if k.startswith("sd.")}
    assert state.keys() == hub.sd18.keys()  # the exported weights, no classifier
    assert all(torch.equal(state[k], v) for k, v in hub.sd18.items())
    assert (
        info["timm_type"] == "timm.models.resnet" and info["tv_type"] == "torchvision.models.resnet"
    )
    torch.testing.assert_close(out["timm18"], hub.y18, rtol=1e-6, atol=1e-6)
    assert torch.equal(out["tv18"], out["timm18"])
    torch.testing.assert_close(out["from_hub"], hub.y50, rtol=1e-6, atol=1e-6)
    assert info["enum"] == "mochi_hub.torchvision.ResNet50_MoCHi_Weights"
    assert set(info["names"]) == {
        "resnet18_mochi", "resnet50_mochi", "vit_small_patch16_224_mochi",
        "vit_base_patch16_224_mochi", "from_hub", "resnet18_tv", "resnet50_tv",
        "get_model_weights",
    }  # fmt: skip
    assert info["doc"].startswith("ResNet-50 pretrained with MoCo-v2 + MoCHi")
    assert "in1k_800ep" in info["doc"] and "Args:" in info["doc"]
