"""Bad and odd image inputs through the image data pipeline: a generated corpus plus a fuzz.

Every file of an image folder either becomes two finite float32 (3, S, S) views, or is skipped,
counted in "corrupt" and replaced by a valid row; nothing escapes as an exception from deep in
PIL or torch. Complements tests/test_sources.py (one mixed folder) with one folder per case,
exact corrupt counts, pixel-level checks of the mode conversions, and a hypothesis fuzz of
decode_image and the robust datasets over random and mutated JPEG/PNG bytes.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mochi_hub.data import sources
from mochi_hub.data.sources import (
    RobustEvalDataset,
    RobustTwoViewDataset,
    check_corrupt_budget,
    decode_image,
    load_image_source,
)
from mochi_hub.data.transforms import eval_transform, to_uint8_rgb_tensor, two_view_transform

SIZE = 32
DECODE_ERRORS = sources._DECODE_ERRORS  # what the robust datasets count as a corrupt image


# --------------------------------------------------------------------------- image makers


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, with one tiny IDAT: costs ~60 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _truncated_jpeg() -> bytes:
    data = _encode(_noise(7, (64, 64)), "JPEG", quality=90)
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = _encode(_noise(8, (64, 64)), "PNG")
    return data[: len(data) // 2]


def _grey() -> bytes:
    return _encode(_noise(1).convert("L"), "PNG")


def _one_pixel(mode: str) -> Callable[[], bytes]:
    def make() -> bytes:
        return _encode(_noise(2, (1, 1)).convert(mode), "PNG")

    return make


def _deep16() -> bytes:
    img = Image.fromarray(np.full((20, 24), 257 * 100, dtype=np.uint16))
    assert img.mode == "I;16"
    return _encode(img, "PNG")


def _cmyk_jpeg() -> bytes:
    return _encode(_noise(3).convert("CMYK"), "JPEG", quality=95)


def _palette(transparent: bool) -> Callable[[], bytes]:
    """Left half index 0 (red, transparent if asked), right half index 1 (opaque blue)."""

    def make() -> bytes:
        idx = np.zeros((20, 24), dtype=np.uint8)
        idx[:, 12:] = 1
        img = Image.new("P", (24, 20))
        img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
        img.putdata(idx.ravel().tolist())
        kwargs = {"transparency": 0} if transparent else {}
        return _encode(img, "PNG", **kwargs)

    return make


def _la() -> bytes:
    """Black everywhere; the left half fully transparent."""
    arr = np.zeros((20, 24, 2), dtype=np.uint8)
    arr[:, 12:, 1] = 255
    return _encode(Image.fromarray(arr, mode="LA"), "PNG")


def _rgba() -> bytes:
    """Green everywhere; the left half fully transparent."""
    arr = np.zeros((20, 24, 4), dtype=np.uint8)
    arr[..., 1] = 200
    arr[:, 12:, 3] = 255
    return _encode(Image.fromarray(arr, mode="RGBA"), "PNG")


def _exif_rotated() -> bytes:
    """40 x 20 (W x H), left half red, right half blue, EXIF orientation 6."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:, 2] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[Image.ExifTags.Base.Orientation] = 6  # rotate 90 degrees clockwise to display
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


# name -> (file name, maker, decodable)
CASES: dict[str, tuple[str, Callable[[], bytes], bool]] = {
    "truncated_jpeg": ("x.jpg", _truncated_jpeg, False),
    "truncated_png": ("x.png", _truncated_png, False),
    "zero_byte_jpg": ("x.jpg", lambda: b"", False),
    "zero_byte_png": ("x.png", lambda: b"", False),
    "text_as_jpg": ("x.jpg", lambda: b"this is not an image\n" * 4, False),
    "html_as_png": ("x.png", lambda: b"<html><body>404 Not Found</body></html>\n", False),
    "bomb_header_100000x100000": ("x.png", lambda: _png_header_only(100_000, 100_000), False),
    "grey_L": ("x.png", _grey, True),
    "one_pixel_RGB": ("x.png", _one_pixel("RGB"), True),
    "one_pixel_L": ("x.png", _one_pixel("L"), True),
    "one_pixel_P": ("x.png", _one_pixel("P"), True),
    "one_pixel_RGBA": ("x.png", _one_pixel("RGBA"), True),
    "deep16_png": ("x.png", _deep16, True),
    "cmyk_jpeg": ("x.jpg", _cmyk_jpeg, True),
    "palette_png": ("x.png", _palette(False), True),
    "palette_png_transparent": ("x.png", _palette(True), True),
    "la_png": ("x.png", _la, True),
    "rgba_png": ("x.png", _rgba, True),
    "exif_rotated_jpeg": ("x.jpg", _exif_rotated, True),
}


def _assert_views(item: dict) -> None:
    for key in ("view1", "view2"):
        view = item[key]
        assert type(view) is torch.Tensor, key
        assert view.dtype == torch.float32 and view.shape == (3, SIZE, SIZE), key
        assert torch.isfinite(view).all(), key


@pytest.fixture(scope="module")
def tf():
    return two_view_transform("mocov2_small", SIZE)


def _folder(root, files: dict[str, dict[str, bytes]]):
    """Write ``root/train/<class>/<name>`` for each class and file; return ``root``."""
    for cls, named in files.items():
        (root / "train" / cls).mkdir(parents=True)
        for name, data in named.items():
            (root / "train" / cls / name).write_bytes(data)
    return root


# --------------------------------------------------------------------------- one folder per case


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_through_image_folder(case, tf, tmp_path, caplog):
    file_name, make, decodable = CASES[case]
    data = make()
    good = {f"{i}.png": _encode(_noise(10 + i), "PNG") for i in range(2)}
    root = _folder(tmp_path / "imgs", {"a_good": good, "b_case": {file_name: data}})
    ds = load_image_source(str(root), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3
    case_row = next(i for i in range(3) if ds[i]["image"]["path"].endswith(file_name))
    assert case_row == 2  # sorted: the good class first, so the case's replacement wraps to 0

    robust = RobustTwoViewDataset(ds, tf)
    with caplog.at_level(logging.WARNING, logger="mochi_hub.data.sources"):
        items = [robust[i] for i in range(len(robust))]
    for item in items:
        _assert_views(item)
    corrupt = [item["corrupt"] for item in items]
    warned = [r for r in caplog.records if r.name == "mochi_hub.data.sources"]
    if decodable:
        assert corrupt == [0, 0, 0]
        assert warned == []
        assert items[2]["label"] == ds[2]["label"]
    else:
        assert corrupt == [0, 0, 1]
        assert items[2]["label"] == ds[0]["label"]  # the replacement row's label
        assert len(warned) == 1 and file_name in warned[0].getMessage()
    check_corrupt_budget(sum(corrupt), 0 if decodable else 1)

    # The same file decoded directly: an RGB image, or one of the counted error types.
    cell = {"bytes": data, "path": None}
    if decodable:
        img = decode_image(cell)
        assert img.mode == "RGB"
        ev = RobustEvalDataset([{"image": cell}], eval_transform(SIZE))[0]
        assert ev["corrupt"] == 0 and ev["image"].shape == (3, SIZE, SIZE)
    else:
        with pytest.raises(DECODE_ERRORS):
            decode_image(cell)


# --------------------------------------------------------------------------- decoded content


def _decoded(case: str) -> np.ndarray:
    img = decode_image({"bytes": CASES[case][1](), "path": None})
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_bomb_header_is_a_decompression_bomb_error_without_allocating():
    data = _png_header_only(100_000, 100_000)
    assert len(data) < 100
    assert 100_000 * 100_000 > 2 * Image.MAX_IMAGE_PIXELS  # the default limit, untouched
    with pytest.raises(Image.DecompressionBombError):
        decode_image({"bytes": data, "path": None})
    rows = [{"image": {"bytes": data, "path": "bomb.png"}, "label": 0}]
    rows.append({"image": {"bytes": _encode(_noise(0), "PNG"), "path": "ok.png"}, "label": 1})
    item = RobustTwoViewDataset(rows, two_view_transform("mocov2_small", SIZE))[0]
    assert item["corrupt"] == 1 and item["label"] == 1
    _assert_views(item)


def test_between_one_and_two_times_the_pixel_limit_only_warns(monkeypatch):
    # Documented: only images over *twice* MAX_IMAGE_PIXELS raise; in between, PIL warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(_noise(0, (40, 40)), "PNG")  # 1600 pixels
    with pytest.warns(Image.DecompressionBombWarning):
        img = decode_image({"bytes": data, "path": None})
    assert img.size == (40, 40) and img.mode == "RGB"
    bomb = _encode(_noise(0, (50, 50)), "PNG")  # 2500 > 2 * 1000 pixels
    with pytest.raises(Image.DecompressionBombError):
        decode_image({"bytes": bomb, "path": None})


def test_exif_orientation_6_is_applied():
    # Orientation 6 = rotate 90 degrees clockwise: W x H = 40 x 20 becomes 20 x 40, and the
    # left (red) half becomes the top half.
    arr = _decoded("exif_rotated_jpeg")
    assert arr.shape == (40, 20, 3)
    top, bottom = arr[:20].mean(axis=(0, 1)), arr[20:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_transparency_is_composited_on_white():
    pal = _decoded("palette_png_transparent")
    assert (pal[:, :12] == 255).all()  # transparent red -> white
    assert (pal[:, 12:] == [0, 0, 255]).all()
    opaque = _decoded("palette_png")
    assert (opaque[:, :12] == [255, 0, 0]).all() and (opaque[:, 12:] == [0, 0, 255]).all()
    la = _decoded("la_png")
    assert (la[:, :12] == 255).all() and (la[:, 12:] == 0).all()
    rgba = _decoded("rgba_png")
    assert (rgba[:, :12] == 255).all() and (rgba[:, 12:] == [0, 200, 0]).all()


def test_grey_16bit_cmyk_and_one_pixel_values():
    grey = _decoded("grey_L")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert (_decoded("deep16_png") == 100).all()  # 25,700 / 257, not clipped to 255
    assert _decoded("cmyk_jpeg").shape == (20, 24, 3)
    for mode in ("RGB", "L", "P", "RGBA"):
        assert _decoded(f"one_pixel_{mode}").shape == (1, 1, 3), mode


# --------------------------------------------------------------------------- mixed and all-bad


BAD = [c for c in sorted(CASES) if not CASES[c][2]]
GOOD = [c for c in sorted(CASES) if CASES[c][2]]


def test_k_bad_files_are_counted_exactly_k_times(tf, tmp_path):
    # Interleave: every bad file is followed by a good one, so each bad row is skipped once.
    files = {}
    for i, case in enumerate(BAD):
        bad_name, bad_make, _ = CASES[case]
        good_name, good_make, _ = CASES[GOOD[i % len(GOOD)]]
        files[f"{i:02d}a{bad_name[1:]}"] = bad_make()
        files[f"{i:02d}b{good_name[1:]}"] = good_make()
    # Two classes: imagefolder drops the labels of a single-class folder.
    extra = {"z.png": _encode(_noise(30), "PNG")}
    root = _folder(tmp_path / "imgs", {"mixed": files, "z_extra": extra})
    ds = load_image_source(str(root), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2 * len(BAD) + 1
    robust = RobustTwoViewDataset(ds, tf)
    loader = torch.utils.data.DataLoader(robust, batch_size=4, shuffle=False)
    total = 0
    for batch in loader:
        assert batch["view1"].shape[1:] == (3, SIZE, SIZE)
        assert torch.isfinite(batch["view1"]).all() and torch.isfinite(batch["view2"]).all()
        total += int(batch["corrupt"].sum())
    assert total == len(BAD)
    check_corrupt_budget(total, len(BAD))
    with pytest.raises(RuntimeError, match="max_corrupt"):
        check_corrupt_budget(total, len(BAD) - 1)


def test_only_bad_images_raise_a_clear_runtime_error(tf, tmp_path):
    files = {f"{i:02d}{CASES[c][0][1:]}": CASES[c][1]() for i, c in enumerate(BAD)}
    half = len(BAD) // 2
    first, second = dict(list(files.items())[:half]), dict(list(files.items())[half:])
    root = _folder(tmp_path / "imgs", {"bad1": first, "bad2": second})
    ds = load_image_source(str(root), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == len(BAD)
    for robust in (
        RobustTwoViewDataset(ds, tf, max_tries=len(BAD)),
        RobustEvalDataset(ds, eval_transform(SIZE), max_tries=len(BAD)),
    ):
        for index in (0, len(BAD) - 1):
            with pytest.raises(RuntimeError, match=r"consecutive images .* could not be decoded"):
                robust[index]


# --------------------------------------------------------------------------- fuzz

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SEEDS = {
    "jpeg": _encode(_noise(20, (16, 12)), "JPEG", quality=80),
    "png": _encode(_noise(21, (16, 12)), "PNG"),
    "png_palette": _palette(True)(),
    "jpeg_exif": _exif_rotated(),
}
_FUZZ_TF = two_view_transform("mocov2_small", SIZE)
_VALID_ROW = {"image": {"bytes": SEEDS["png"], "path": "valid.png"}, "label": 1}


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


def _check_outcome(data: bytes) -> None:
    """decode_image gives a usable RGB image or a counted error; the dataset agrees."""
    cell = {"bytes": data, "path": "fuzz.bin"}
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1 << 18  # keep mutated dimensions cheap: bombs over 512K pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's corrupt-EXIF and bomb warnings
            try:
                img = decode_image(cell)
            except DECODE_ERRORS:
                decodable = False
            else:
                decodable = True
                assert isinstance(img, Image.Image) and img.mode == "RGB"
                assert img.width >= 1 and img.height >= 1
                x = to_uint8_rgb_tensor(img)
                assert x.dtype == torch.uint8 and x.shape == (3, img.height, img.width)
            rows = [{"image": cell, "label": 0}, _VALID_ROW]
            item = RobustTwoViewDataset(rows, _FUZZ_TF, max_tries=2)[0]
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    event("decoded" if decodable else "skipped")  # see --hypothesis-show-statistics
    _assert_views(item)
    assert item["corrupt"] == (0 if decodable else 1)
    assert item["label"] == (0 if decodable else 1)


@FUZZ
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _check_outcome(data)


@FUZZ
@given(data=mutated())
def test_fuzz_mutated_jpeg_png(data):
    _check_outcome(data)


@FUZZ
@given(data=st.sampled_from(sorted(SEEDS)).flatmap(lambda k: st.just(SEEDS[k])), cut=st.data())
def test_fuzz_every_truncation_point(data, cut):
    n = cut.draw(st.integers(0, len(data) - 1))
    _check_outcome(data[:n])
