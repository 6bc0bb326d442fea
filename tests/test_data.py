import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from mochi_hub.data import (
    DIGITS_CLASS_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    SeparableGaussianBlur,
    TwoViewTransform,
    ViewAugmentation,
    blur_kernel_size,
    eval_batch_transform,
    eval_transform,
    gaussian_blur_matrix,
    load_digits_dataset,
    to_rgb,
    two_view_batch_transform,
    two_view_transform,
)

# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_sizes_and_stratification(digits):
    train, test = digits["train"], digits["test"]
    assert set(digits) == {"train", "test"}
    assert len(train) + len(test) == 1797
    assert len(test) == 360  # ceil(0.2 * 1797)
    assert len(train) == 1437
    train_counts = np.bincount(train["label"], minlength=10)
    test_counts = np.bincount(test["label"], minlength=10)
    total = train_counts + test_counts
    assert total.sum() == 1797 and total.min() >= 170  # every digit ~180 times
    # stratified: each class's test share is 20% up to rounding
    np.testing.assert_allclose(test_counts / total, 0.2, atol=0.01)


def test_digits_features_and_images(digits):
    features = digits["train"].features
    assert features["label"].names == list(DIGITS_CLASS_NAMES) == [str(i) for i in range(10)]
    assert type(features["image"]).__name__ == "Image"
    for split in ("train", "test"):
        row = digits[split][0]
        assert isinstance(row["image"], Image.Image)
        assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
        arr = np.asarray(row["image"])
        assert arr.dtype == np.uint8
        # grey replicated to RGB, real content spanning the intensity range
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
        assert arr.max() > 200 and arr.min() < 30


def test_digits_native_size_matches_sklearn():
    from sklearn.datasets import load_digits

    ds = load_digits_dataset(image_size=8)
    ours = [
        (np.asarray(im)[..., 0].tobytes(), label)
        for split in ("train", "test")
        for im, label in zip(ds[split]["image"], ds[split]["label"], strict=True)
    ]
    bunch = load_digits()
    reference = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    # the two splits partition sklearn's images exactly (no resize at the native size)
    expected = [(r.tobytes(), int(t)) for r, t in zip(reference, bunch.target, strict=True)]
    assert sorted(ours) == sorted(expected)


def test_digits_deterministic_and_seeded():
    a = load_digits_dataset(image_size=16, seed=3)
    b = load_digits_dataset(image_size=16, seed=3)
    assert a["test"]["label"] == b["test"]["label"]
    assert np.array_equal(np.asarray(a["test"][5]["image"]), np.asarray(b["test"][5]["image"]))
    c = load_digits_dataset(image_size=16, seed=4)
    assert a["test"]["label"] != c["test"]["label"]
    assert a["train"][0]["image"].size == (16, 16)


def test_digits_cache_is_not_shared_mutable_state():
    a = load_digits_dataset()
    a["train"].set_transform(lambda batch: {"x": [0] * len(batch["label"])})
    b = load_digits_dataset()
    assert set(b["train"][0]) == {"image", "label"}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 2.5}, "image_size"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": 0.001}, "test_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_digits_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        load_digits_dataset(**kwargs)


# ----------------------------------------------------------------------------- transforms


def _random_rgb(size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_two_view_shapes_dtypes_and_views_differ(preset):
    torch.manual_seed(0)
    t = two_view_transform(preset, 32)
    assert isinstance(t, TwoViewTransform) and t.size == 32
    v1, v2 = t(_random_rgb())
    for v in (v1, v2):
        assert type(v) is torch.Tensor
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
        assert torch.isfinite(v).all()
    assert not torch.equal(v1, v2)


def test_presets_parameters():
    v1, v2 = PRESETS["mocov2"]
    assert v1 == v2 and v1.crop_scale == (0.2, 1.0) and v1.jitter == (0.4, 0.4, 0.4, 0.1)
    assert (v1.jitter_p, v1.grayscale_p, v1.blur_p, v1.hflip_p) == (0.8, 0.2, 0.5, 0.5)
    assert v1.blur_sigma == (0.1, 2.0) and v1.solarize_p == 0.0
    a, b = PRESETS["mocov3"]
    assert a.crop_scale == b.crop_scale == (0.08, 1.0) and a.jitter == (0.4, 0.4, 0.2, 0.1)
    assert (a.blur_p, a.solarize_p, b.blur_p, b.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    for name in ("mocov2_small", "mocov3_small"):
        for view in PRESETS[name]:
            assert view.blur_p == 0.0 and view.crop_scale == (0.2, 1.0)
    assert PRESETS["mocov3_small"][1].solarize_p == 0.2
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3 and blur_kernel_size(96) == 9


def test_small_presets_have_no_blur_in_pipeline():
    t = two_view_transform("mocov2_small", 32)
    assert "GaussianBlur" not in repr(t._t1)
    assert "GaussianBlur" in repr(two_view_transform("mocov2", 32)._t1)


@pytest.mark.parametrize("hw, k", [((224, 224), 23), ((30, 17), 3), ((5, 7), 9), ((64, 48), 7)])
def test_separable_blur_matches_torchvision(hw, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=g)
    blur = SeparableGaussianBlur(k, sigma=(0.1, 2.0))
    params = {"sigma": [1.3, 0.7]}  # different x / y sigmas
    out = blur.transform(tv_tensors.Image(x), params)
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.uint8 and out.shape == x.shape
    ref = v2.functional.gaussian_blur(x, [k, k], [1.3, 0.7])
    assert (out.int() - ref.int()).abs().max() <= 1  # rounding of the float result
    xf = x.float() / 255.0
    torch.testing.assert_close(
        blur.transform(xf, params), v2.functional.gaussian_blur(xf, [k, k], [1.3, 0.7])
    )


def test_blur_matrix_rows_and_wide_kernels():
    m = gaussian_blur_matrix(6, 3, 1.0)
    torch.testing.assert_close(m.sum(1), torch.ones(6))
    # kernels wider than the signal still reflect (torch's pad would raise)
    torch.testing.assert_close(gaussian_blur_matrix(2, 9, 5.0).sum(1), torch.ones(2))
    out = SeparableGaussianBlur(9).transform(
        torch.full((3, 1, 4), 7, dtype=torch.uint8), {"sigma": [2.0, 2.0]}
    )
    assert out.shape == (3, 1, 4) and (out == 7).all()  # constant image stays constant
    mask = tv_tensors.Mask(torch.ones(1, 8, 8))
    _, kept = v2.Compose([SeparableGaussianBlur(3)])(torch.zeros(3, 8, 8, dtype=torch.uint8), mask)
    assert torch.equal(kept, mask)  # non-image inputs pass through, as in v2.GaussianBlur


def test_two_view_normalisation_identity_when_no_augmentation():
    # full-image crop of an already-S image, no colour ops: the output is the normalised input
    t = two_view_transform(
        "mocov2",
        16,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        crop_scale=(1.0, 1.0),
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        hflip_p=0.0,
    )
    img = _random_rgb((16, 16))
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0
    for v in t(img):
        torch.testing.assert_close(v, expected)


def test_two_view_accepts_uint8_tensor_and_rejects_float():
    t = two_view_transform("mocov3_small", 24)
    x = torch.randint(0, 256, (3, 30, 28), dtype=torch.uint8)
    assert [v.shape for v in t(x)] == [(3, 24, 24)] * 2
    assert [v.shape for v in t(x[:1])] == [(3, 24, 24)] * 2  # single channel replicated
    with pytest.raises(ValueError, match="uint8"):
        t(x.float())


def test_overrides_apply_to_both_views():
    t = two_view_transform("mocov3", 64, hflip_p=0.0, crop_scale=(0.3, 1.0))
    assert t.view1.hflip_p == t.view2.hflip_p == 0.0
    assert t.view1.crop_scale == t.view2.crop_scale == (0.3, 1.0)
    assert t.view1.size == 64 and t.view1.mean == IMAGENET_MEAN and t.view2.std == IMAGENET_STD
    assert (t.view1.blur_p, t.view2.blur_p) == (1.0, 0.1)  # the asymmetry is kept


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match=r"'mocov9'.*mocov2.*mocov3"):
        two_view_transform("mocov9", 32)
    with pytest.raises(ValueError, match=r"'flip_p'.*hflip_p"):
        two_view_transform("mocov2", 32, flip_p=0.0)
    with pytest.raises(ValueError, match="image_size"):
        two_view_transform("mocov2", 32, size=64)
    with pytest.raises(ValueError, match="grayscale_p"):
        two_view_transform("mocov2", 32, grayscale_p=1.5)
    with pytest.raises(ValueError, match="size"):
        ViewAugmentation(size=0)


def test_eval_transform_deterministic_and_sizes():
    img = _random_rgb((300, 200))
    e = eval_transform(224)
    assert e.resize_size == 256
    a, b = e(img), e(img)
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # crop_pct=1.0 on an image that already has the size: only conversion + Normalize
    e1 = eval_transform(32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0)
    assert e1.resize_size == 32
    small = _random_rgb((32, 32))
    expected = torch.from_numpy(np.array(small)).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(e1(small), expected)
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(32, crop_pct=0.0)


def _odd_images():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    return {
        "L": Image.fromarray(grey),
        "P": Image.fromarray(grey).convert("P"),
        "RGBA": Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)),
        "CMYK": _random_rgb((11, 9)).convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (9, 11), dtype=np.uint16)),
        "1": Image.fromarray(grey).convert("1"),
        "LA": Image.fromarray(grey).convert("LA"),
        "F": Image.fromarray(rng.random((9, 11), dtype=np.float32)),
        "1x1": Image.new("RGB", (1, 1), (200, 10, 30)),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
def test_every_odd_mode_converts(name):
    img = _odd_images()[name]
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == img.size
    v1, v2 = two_view_transform("mocov2", 32)(img)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert eval_transform(32)(img).shape == (3, 32, 32)


def test_to_rgb_value_handling():
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 128, 255]  # not clipped at 255
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # fully transparent -> white background
    assert np.asarray(to_rgb(rgba)).min() == 255
    opaque = Image.new("RGBA", (2, 2), (10, 20, 30, 255))
    assert np.asarray(to_rgb(opaque))[0, 0].tolist() == [10, 20, 30]
    rgb = _random_rgb()
    assert to_rgb(rgb) is rgb
    with pytest.raises(TypeError):
        to_rgb(np.zeros((2, 2)))


def test_with_transform_dataloader_two_views(digits):
    fn = two_view_batch_transform(two_view_transform("mocov2_small", 32))
    ds = digits["train"].with_transform(fn)
    row = ds[0]
    assert set(row) == {"view1", "view2", "label"}
    loader = DataLoader(ds, batch_size=8, shuffle=False)
    batch = next(iter(loader))
    assert batch["view1"].shape == batch["view2"].shape == (8, 3, 32, 32)
    assert batch["view1"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == digits["train"]["label"][:8]
    assert not torch.equal(batch["view1"], batch["view2"])


def test_with_transform_eval_and_no_label(digits):
    fn = eval_batch_transform(eval_transform(32, crop_pct=1.0))
    ds = digits["test"].with_transform(fn)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)
    torch.testing.assert_close(ds[0]["image"], ds[0]["image"])  # deterministic
    fn = two_view_batch_transform(two_view_transform("mocov3_small", 32), label_column=None)
    row = digits["test"].with_transform(fn)[0]
    assert set(row) == {"view1", "view2"}


def test_batch_transform_undecoded_bytes(digits):
    from datasets import Image as ImageFeature

    raw = digits["test"].cast_column("image", ImageFeature(decode=False))
    fn = eval_batch_transform(eval_transform(32, crop_pct=1.0))
    decoded = digits["test"].with_transform(fn)[0]["image"]
    lazy = raw.with_transform(fn)[0]["image"]
    assert torch.equal(decoded, lazy)


def test_missing_column_errors(digits):
    fn = two_view_batch_transform(two_view_transform("mocov2_small", 32), image_column="img")
    with pytest.raises(ValueError, match=r"'img'.*\['image', 'label'\]"):
        digits["train"].with_transform(fn)[0]
    fn = eval_batch_transform(eval_transform(32), label_column="target")
    with pytest.raises(ValueError, match=r"'target'.*available"):
        fn({"image": [_random_rgb()], "label": [0]})


def test_transforms_pickle():
    fn = two_view_batch_transform(two_view_transform("mocov3", 32))
    clone = pickle.loads(pickle.dumps(fn))
    out = clone({"image": [_random_rgb()], "label": [3]})
    assert out["view1"][0].shape == (3, 32, 32) and out["label"] == [3]
    assert pickle.loads(pickle.dumps(eval_transform(32)))(_random_rgb()).shape == (3, 32, 32)
