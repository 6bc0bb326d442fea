"""Tests of mochi_hub.data.sources: source resolution, column handling, robust decoding."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from mochi_hub.data import eval_transform, sources, two_view_transform
from mochi_hub.data.sources import (
    IMAGENET100_CLASSES,
    RobustEvalDataset,
    RobustTwoViewDataset,
    check_corrupt_budget,
    check_imagenet100,
    decode_image,
    load_image_source,
)

# The project's shared/ folder sits beside the checkout (on developer machines and in CI).
SHARED = Path(os.environ.get("MOCHI_HUB_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CIFAR_DIR = str(SHARED / "data" / "cifar10")
CORRUPT_NAMES = {"truncated.jpg", "empty.jpg", "notes.png"}


# --------------------------------------------------------------------------- fixtures


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write_odd_images(folder) -> None:
    """Every odd-but-valid mode plus three corrupt files, in one class folder."""
    folder.mkdir(parents=True)
    _rgb(1).convert("L").save(folder / "grey.png")
    _rgb(2).convert("P").save(folder / "palette.png")
    rgba = _rgb(3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    _rgb(4).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.arange(24 * 20, dtype=np.uint16).reshape(20, 24) * 100).save(
        folder / "deep16.png"
    )
    _rgb(5, size=(1, 1)).save(folder / "tiny.png")
    rotated = _rgb(6, size=(40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "rotated.jpg", exif=exif.tobytes())
    buf = io.BytesIO()
    _rgb(7, size=(64, 64)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """root/{train,test}/{cat,dog,odd}/..., odd holding odd and corrupt images."""
    root = tmp_path_factory.mktemp("imgs")
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                _rgb(hash((split, cls, i)) % 1000).save(root / split / cls / f"{i}.jpg")
    _write_odd_images(root / "train" / "odd")
    return root


@pytest.fixture(scope="module")
def train_ds(image_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_image_source(str(image_root), split="train", cache_dir=str(cache))


def _is_corrupt(ds, i: int) -> bool:
    return os.path.basename(ds[i]["image"]["path"]) in CORRUPT_NAMES


def _expected_skips(ds, i: int) -> int:
    """Consecutive corrupt rows from i on (wrapping): what item i must skip."""
    n, k = len(ds), 0
    while _is_corrupt(ds, (i + k) % n):
        k += 1
    return k


def _image_dataset(names, labels, label_names=None, image_col="image") -> datasets.Dataset:
    feats = {image_col: datasets.Image()}
    feats["label"] = datasets.ClassLabel(names=label_names or sorted(set(names)))
    return datasets.Dataset.from_dict(
        {
            image_col: [{"bytes": _png_bytes(_rgb(i)), "path": None} for i in range(len(labels))],
            "label": labels,
        },
        features=datasets.Features(feats),
    )


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_canonical_columns(train_ds, image_root, tmp_path):
    assert train_ds.column_names == ["image", "label"]
    assert isinstance(train_ds.features["image"], datasets.Image)
    assert train_ds.features["image"].decode is False
    assert train_ds.features["label"].names == ["cat", "dog", "odd"]
    assert len(train_ds) == 3 + 3 + 10
    cell = train_ds[0]["image"]
    assert set(cell) == {"bytes", "path"}
    test = load_image_source(str(image_root), split="test", cache_dir=str(tmp_path))
    # Class names are the union over splits, so label indices agree between splits.
    assert len(test) == 4 and test.features["label"].names == ["cat", "dog", "odd"]
    unlabeled = load_image_source(
        str(image_root), split="test", label_column=None, cache_dir=str(tmp_path)
    )
    assert unlabeled.column_names == ["image"]


@pytest.mark.parametrize("layout", ["split/class", "class"])
def test_a_single_class_folder_keeps_its_label(layout, tmp_path):
    # datasets' imagefolder infers labels only from two or more class folders
    root = tmp_path / "one_class"
    folder = root / "train" / "cat" if layout == "split/class" else root / "cat"
    folder.mkdir(parents=True)
    for i in range(3):
        _rgb(i).save(folder / f"{i}.png")
    ds = load_image_source(str(root), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["image", "label"]
    assert ds.features["label"].names == ["cat"] and ds["label"] == [0, 0, 0]
    # images straight under the split folder stay an unlabelled set
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    _rgb(5).save(flat / "a.png")
    unlabelled = load_image_source(
        str(flat.parent), split="train", label_column=None, cache_dir=str(tmp_path / "cache")
    )
    assert unlabelled.column_names == ["image"]


def test_flat_class_layout(image_root, tmp_path):
    ds = load_image_source(str(image_root / "test"), split="train", cache_dir=str(tmp_path))
    assert len(ds) == 4 and ds.features["label"].names == ["cat", "dog"]


def test_decode_odd_modes(image_root):
    odd = image_root / "train" / "odd"
    for name in ("grey.png", "palette.png", "alpha.png", "cmyk.jpg", "deep16.png", "tiny.png"):
        img = decode_image({"bytes": None, "path": str(odd / name)})
        assert img.mode == "RGB", name
    deep = np.asarray(decode_image({"bytes": None, "path": str(odd / "deep16.png")}))
    # The 16-bit range is rescaled (max 47,900 / 257 = 186), not clipped to 255 (white).
    assert deep.max() == round(47_900 / 257)
    rotated = decode_image({"bytes": (odd / "rotated.jpg").read_bytes(), "path": None})
    assert rotated.size == (20, 40)  # EXIF orientation applied, as datasets.Image does
    for name in CORRUPT_NAMES:
        with pytest.raises(OSError):
            decode_image({"bytes": None, "path": str(odd / name)})
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_robust_two_view_counts_corrupt(train_ds, caplog):
    tf = two_view_transform("mocov2_small", 16)
    robust = RobustTwoViewDataset(train_ds, tf)
    n_corrupt_rows = sum(_is_corrupt(train_ds, i) for i in range(len(train_ds)))
    assert n_corrupt_rows == len(CORRUPT_NAMES)
    total = 0
    with caplog.at_level(logging.WARNING, logger="mochi_hub.data.sources"):
        for i in range(len(robust)):
            item = robust[i]
            assert set(item) == {"view1", "view2", "label", "corrupt"}
            for key in ("view1", "view2"):
                assert item[key].shape == (3, 16, 16) and item[key].dtype == torch.float32
                assert torch.isfinite(item[key]).all()
            assert item["corrupt"] == _expected_skips(train_ds, i)
            total += item["corrupt"]
    # imagefolder lists files in sorted order, so the three corrupt files are not adjacent
    # (empty.jpg, notes.png, and truncated.jpg last, whose replacement wraps to row 0).
    assert total == len(CORRUPT_NAMES) == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == total
    for name in CORRUPT_NAMES:
        assert any(name in msg for msg in warned), name
    assert all("corrupt image at index" in msg for msg in warned)
    assert os.path.basename(train_ds[len(train_ds) - 1]["image"]["path"]) == "truncated.jpg"
    assert robust[len(robust) - 1]["label"] == train_ds[0]["label"]

    # A replacement keeps the replacement row's label, and is deterministic.
    first_bad = next(i for i in range(len(train_ds)) if _is_corrupt(train_ds, i))
    k = _expected_skips(train_ds, first_bad)
    replacement = (first_bad + k) % len(train_ds)
    assert robust[first_bad]["label"] == train_ds[replacement]["label"]

    clone = pickle.loads(pickle.dumps(robust))  # DataLoader workers under "spawn"
    assert clone[1]["view1"].shape == (3, 16, 16)
    assert clone[len(clone) - 1]["corrupt"] == 1
    loader = torch.utils.data.DataLoader(robust, batch_size=4, shuffle=False)
    batches = list(loader)
    assert all(b["view1"].shape == (4, 3, 16, 16) for b in batches)
    assert sum(int(b["corrupt"].sum()) for b in batches) == total


def test_robust_eval_and_decoded_input(train_ds):
    robust = RobustEvalDataset(train_ds, eval_transform(8, crop_pct=1.0))
    items = [robust[i] for i in range(len(robust))]
    assert all(it["image"].shape == (3, 8, 8) for it in items)
    assert sum(it["corrupt"] for it in items) == sum(
        _expected_skips(train_ds, i) for i in range(len(train_ds))
    )
    # Already-decoding datasets: the error surfaces while fetching the row, and is caught too.
    decoded = train_ds.cast_column("image", datasets.Image(decode=True))
    robust_dec = RobustEvalDataset(decoded, eval_transform(8, crop_pct=1.0))
    bad = next(i for i in range(len(train_ds)) if _is_corrupt(train_ds, i))
    assert robust_dec[bad]["corrupt"] == _expected_skips(train_ds, bad)
    assert robust_dec[-1]["image"].shape == (3, 8, 8)
    with pytest.raises(IndexError):
        robust_dec[len(train_ds)]


def test_robust_all_corrupt_and_unlabeled():
    rows = [{"image": {"bytes": b"junk", "path": f"bad{i}.png"}} for i in range(3)]
    robust = RobustEvalDataset(rows, eval_transform(8), max_tries=3)
    with pytest.raises(RuntimeError, match="3 consecutive images"):
        robust[0]
    rows.append({"image": {"bytes": _png_bytes(_rgb(0)), "path": None}})
    item = RobustTwoViewDataset(rows, two_view_transform("mocov2_small", 8), max_tries=4)[0]
    assert item["corrupt"] == 3 and item["view1"].shape == (3, 8, 8)
    assert "label" not in item  # rows without a label give items without one
    with pytest.raises(ValueError, match="max_tries"):
        RobustEvalDataset(rows, eval_transform(8), max_tries=0)
    with pytest.raises(ValueError, match="empty"):
        RobustEvalDataset([], eval_transform(8))


def test_decompression_bomb_is_skipped(monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rows = [
        {"image": {"bytes": _png_bytes(_rgb(0, size=(64, 64))), "path": "bomb.png"}, "label": 0},
        {"image": {"bytes": _png_bytes(_rgb(1, size=(8, 8))), "path": "ok.png"}, "label": 1},
    ]
    with caplog.at_level(logging.WARNING, logger="mochi_hub.data.sources"):
        item = RobustEvalDataset(rows, eval_transform(8))[0]
    assert item["corrupt"] == 1 and item["label"] == 1
    assert "DecompressionBombError" in caplog.text and "bomb.png" in caplog.text


def test_check_corrupt_budget():
    check_corrupt_budget(5, None)
    check_corrupt_budget(3, 3)
    check_corrupt_budget(0, 0)
    with pytest.raises(
        RuntimeError, match=r"4 corrupt images skipped, more than data\.max_corrupt=3"
    ):
        check_corrupt_budget(4, 3)
    with pytest.raises(ValueError, match="max_corrupt"):
        check_corrupt_budget(1, -1)
    with pytest.raises(ValueError, match="total_skipped"):
        check_corrupt_budget(-1, 3)


# --------------------------------------------------------------------------- parquet


def _write_hf_parquet(path, n: int, offset: int = 0) -> None:
    labels = [(i + offset) % 2 for i in range(n)]
    _image_dataset(["cat", "dog"], labels).to_parquet(str(path))


def test_parquet_single_file_dir_and_glob(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_hf_parquet(shards / "train-00000-of-00002.parquet", 5)
    _write_hf_parquet(shards / "train-00001-of-00002.parquet", 4, offset=1)
    _write_hf_parquet(shards / "test-00000-of-00001.parquet", 3)
    cache = str(tmp_path / "cache")

    one = load_image_source(str(shards / "test-00000-of-00001.parquet"), cache_dir=cache)
    assert len(one) == 3 and one.column_names == ["image", "label"]
    assert one.features["image"].decode is False

    train = load_image_source(str(shards), split="train", cache_dir=cache)
    test = load_image_source(str(shards), split="test", cache_dir=cache)
    assert (len(train), len(test)) == (9, 3)
    assert train.features["label"].names == ["cat", "dog"]

    globbed = load_image_source(str(shards / "train-*.parquet"), split="train", cache_dir=cache)
    assert len(globbed) == 9
    with pytest.raises(ValueError, match=r"split 'validation'.*\['test', 'train'\]"):
        load_image_source(str(shards), split="validation", cache_dir=cache)
    with pytest.raises(ValueError, match="no Parquet file matches"):
        load_image_source(str(shards / "val-*.parquet"), cache_dir=cache)

    item = RobustTwoViewDataset(train, two_view_transform("mocov2_small", 8))[0]
    assert item["view1"].shape == (3, 8, 8) and item["corrupt"] == 0


def test_parquet_plain_struct_and_binary_columns(tmp_path):
    pngs = [_png_bytes(_rgb(i)) for i in range(3)]
    struct_col = pa.array(
        [{"bytes": b, "path": None} for b in pngs],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"img": struct_col, "target": pa.array([0, 1, 0], pa.int64())})
    pq.write_table(table, tmp_path / "struct.parquet")
    ds = load_image_source(
        str(tmp_path / "struct.parquet"), label_column="target", cache_dir=str(tmp_path / "c")
    )
    assert ds.column_names == ["image", "label"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert np.array_equal(np.asarray(decode_image(ds[1]["image"])), np.asarray(_rgb(1)))

    pq.write_table(pa.table({"png": pa.array(pngs, pa.binary())}), tmp_path / "bin.parquet")
    ds = load_image_source(
        str(tmp_path / "bin.parquet"), label_column=None, cache_dir=str(tmp_path / "c")
    )
    assert ds.column_names == ["image"] and ds.features["image"].decode is False
    assert decode_image(ds[2]["image"]).size == (24, 20)


def test_raw_pixel_parquet(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)  # (N, H, W, C)
    col = pa.array([p.tobytes() for p in pixels], pa.binary(5 * 6 * 3))
    table = pa.table({"image": col, "label": pa.array([0, 1, 1, 0], pa.int16())})
    table = table.replace_schema_metadata(
        {"height": "5", "width": "6", "channels": "3", "class_names": json.dumps(["x", "y"])}
    )
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    ds = load_image_source(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert ds.features["label"].names == ["x", "y"]
    assert ds["label"][:] == [0, 1, 1, 0]
    for i in range(4):
        assert np.array_equal(np.asarray(decode_image(ds[i]["image"])), pixels[i])


def test_raw_pixels_without_metadata_rejected(tmp_path):
    col = pa.array([bytes(12)], pa.binary(12))
    pq.write_table(pa.table({"image": col}), tmp_path / "raw.parquet")
    with pytest.raises(ValueError, match="without 'height'/'width'/'channels'"):
        load_image_source(
            str(tmp_path / "raw.parquet"), label_column=None, cache_dir=str(tmp_path / "c")
        )


def test_shared_cifar10_test_split(tmp_path):
    assert os.path.isdir(CIFAR_DIR), f"the shared CIFAR-10 copy is missing: {CIFAR_DIR}"
    ds = load_image_source(CIFAR_DIR, split="test", cache_dir=str(tmp_path))
    assert len(ds) == 10_000
    assert ds.column_names == ["image", "label"]
    names = json.loads(
        pq.read_schema(f"{CIFAR_DIR}/test-00000-of-00001.parquet").metadata[b"class_names"]
    )
    assert ds.features["label"].names == names
    assert names[:3] == ["airplane", "automobile", "bird"] and len(names) == 10
    raw = pq.read_table(f"{CIFAR_DIR}/test-00000-of-00001.parquet").slice(0, 3)
    for i in range(3):
        expected = np.frombuffer(raw.column("image")[i].as_py(), np.uint8).reshape(32, 32, 3)
        assert np.array_equal(np.asarray(decode_image(ds[i]["image"])), expected)
        assert ds[i]["label"] == raw.column("label")[i].as_py()
    robust = RobustEvalDataset(ds, eval_transform(32, crop_pct=1.0))
    assert robust[9_999]["image"].shape == (3, 32, 32) and robust[9_999]["corrupt"] == 0


# --------------------------------------------------------------------------- class subsets


def test_class_subset_filters_and_remaps(tmp_path):
    syn = ["n01558993", "n02869837", "n09999999"]  # two ImageNet-100 synsets, one other
    root = tmp_path / "in"
    for j, name in enumerate(syn):
        (root / "train" / name).mkdir(parents=True)
        for i in range(j + 1):
            _rgb(10 * j + i).save(root / "train" / name / f"{i}.png")
    cache = str(tmp_path / "c")
    full = load_image_source(str(root), cache_dir=cache)
    assert full.features["label"].names == syn
    sub = load_image_source(str(root), class_subset=["n02869837", "n01558993"], cache_dir=cache)
    assert sub.features["label"].names == ["n01558993", "n02869837"]
    assert sorted(sub["label"][:]) == [0, 1, 1]
    # Row content survives the relabelling: label 1 rows are the n02869837 images.
    paths = {os.path.basename(os.path.dirname(r["image"]["path"])): r["label"] for r in sub}
    assert paths == {"n01558993": 0, "n02869837": 1}
    streamed = load_image_source(
        str(root), class_subset=["n09999999", "n01558993"], streaming=True, cache_dir=cache
    )
    assert sorted(r["label"] for r in streamed) == [0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"not label names.*'n00000001'"):
        load_image_source(str(root), class_subset=["n00000001", "n01558993"], cache_dir=cache)
    with pytest.raises(ValueError, match="class_subset needs labels"):
        load_image_source(str(root), class_subset=["n01558993"], label_column=None)


def test_imagenet100_classes():
    assert len(IMAGENET100_CLASSES) == 100 == len(set(IMAGENET100_CLASSES))
    assert all(c.startswith("n") and len(c) == 9 for c in IMAGENET100_CLASSES)
    with open(SHARED / "data" / "imagenet100" / "classes.txt") as f:
        assert tuple(line.strip() for line in f if line.strip()) == IMAGENET100_CLASSES
    shuffled = list(IMAGENET100_CLASSES)
    random.Random(0).shuffle(shuffled)
    check_imagenet100(shuffled)
    wrong = shuffled[:-1] + ["n09999999"]
    with pytest.raises(ValueError, match=r"1 ImageNet-100 class\(es\) missing.*n09999999"):
        check_imagenet100(wrong)
    with pytest.raises(ValueError, match="missing"):
        check_imagenet100(shuffled[:99])
    with pytest.raises(ValueError, match="repeated"):
        check_imagenet100(shuffled + shuffled[:1])


# --------------------------------------------------------------------------- hub ids


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    fake = _image_dataset(["airplane", "cat"], [0, 1, 1], image_col="img")
    fake = fake.add_column("extra", ["a", "b", "c"])

    def fake_load_dataset(path, **kwargs):
        calls.append({"path": path, **kwargs})
        return fake.to_iterable_dataset() if kwargs.get("streaming") else fake

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_id_arguments_and_img_column(fake_hub):
    ds = load_image_source("hf:uoft-cs/cifar10", split="test", cache_dir="/nowhere")
    assert fake_hub[-1] == {
        "path": "uoft-cs/cifar10",
        "split": "test",
        "streaming": False,
        "cache_dir": "/nowhere",
        "data_files": None,
    }
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["image", "label"]
    assert ds.features["image"] == datasets.Image(decode=False)

    streamed = load_image_source("uoft-cs/cifar10", split="train", streaming=True)
    assert fake_hub[-1]["path"] == "uoft-cs/cifar10"
    assert fake_hub[-1]["split"] == "train" and fake_hub[-1]["streaming"] is True
    assert isinstance(streamed, datasets.IterableDataset)
    rows = list(streamed)
    assert [r["label"] for r in rows] == [0, 1, 1]
    assert set(rows[0]) == {"image", "label"} and set(rows[0]["image"]) == {"bytes", "path"}


def test_hub_errors(fake_hub):
    with pytest.raises(ValueError, match=r"'fine_label' not found.*\['img', 'label', 'extra'\]"):
        load_image_source("org/name", label_column="fine_label")
    with pytest.raises(ValueError, match=r"image column 'photo' not found"):
        load_image_source("org/name", image_column="photo")
    load_image_source("hf:cifar10")  # "hf:" also takes an org-less name
    assert fake_hub[-1]["path"] == "cifar10"
    load_image_source("org/name", split="test", data_files="data/test-*.parquet")
    assert fake_hub[-1]["data_files"] == {"test": "data/test-*.parquet"}
    with pytest.raises(ValueError, match="neither 'digits'"):
        load_image_source("not a source")
    with pytest.raises(ValueError, match="data_files only applies"):
        load_image_source("digits", data_files="x.parquet")


def test_no_image_column_and_empty(tmp_path):
    pq.write_table(pa.table({"text": ["a"], "label": [0]}), tmp_path / "text.parquet")
    with pytest.raises(ValueError, match=r"no image column found.*\['text', 'label'\]"):
        load_image_source(str(tmp_path / "text.parquet"), cache_dir=str(tmp_path / "c"))
    empty = pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())})
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match=r"data set .*empty\.parquet.* split 'train' is empty"):
        load_image_source(str(tmp_path / "empty.parquet"), cache_dir=str(tmp_path / "c"))
    # An empty shard next to non-empty ones is skipped (datasets cannot read it).
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(empty, shards / "train-00000-of-00002.parquet")
    _write_hf_parquet(shards / "train-00001-of-00002.parquet", 2)
    assert len(load_image_source(str(shards), cache_dir=str(tmp_path / "c"))) == 2


def test_empty_hub_split(monkeypatch):
    empty = _image_dataset(["a"], [], label_names=["a"])
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda path, **kwargs: empty)
    with pytest.raises(ValueError, match="data set 'org/name' split 'test' is empty"):
        load_image_source("org/name", split="test")


def test_digits_source():
    ds = load_image_source("digits", split="test", image_size=8)
    assert ds.column_names == ["image", "label"] and len(ds) == 360
    assert decode_image(ds[0]["image"]).size == (8, 8)
    with pytest.raises(ValueError, match="digits"):
        load_image_source("digits", split="validation")
