import os

# No test touches the network: huggingface_hub reads these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def make_hub_cache(cache_dir, repo_id, folder, files=("model.safetensors", "config.json")):
    """Lay ``folder``'s files out as huggingface_hub's cache holds a downloaded model repo.

    ``<cache>/models--<org>--<name>/{refs/main, blobs/<sha256>, snapshots/<commit>/<file>}``,
    snapshot files being symlinks to the blobs, as ``hf_hub_download`` leaves them. Loading with
    ``HF_HUB_CACHE=<cache>`` and ``HF_HUB_OFFLINE=1`` then resolves without a network.

    Returns:
        The snapshot directory.
    """
    import hashlib
    from pathlib import Path

    folder, cache_dir = Path(folder), Path(cache_dir)
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in files:
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap


@pytest.fixture
def hub_cache(tmp_path):
    """``hub_cache(repo_id, folder)`` fills a fresh cache under tmp_path; returns the cache root."""
    root = tmp_path / "hf_cache"

    def fill(repo_id, folder, files=("model.safetensors", "config.json")):
        make_hub_cache(root, repo_id, folder, files)
        return root

    return fill
