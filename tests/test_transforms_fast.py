"""The float colour path of the two-view augmentation against torchvision's own operations.

The training views are cropped in uint8 and augmented in float32 (closed-form hue, truncated
separable blur, solarize at 128 / 255): these tests pin that every step matches torchvision's
float kernels to float rounding, that the random parameters are drawn exactly as before, and
that the views stay within uint8 rounding of the former all-uint8 pipeline.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from mochi_hub.data.transforms import (
    _INTERPOLATIONS,
    PRESETS,
    FastColorJitter,
    SeparableGaussianBlur,
    adjust_hue_float,
    blur_kernel_size,
    gaussian_blur_matrix,
)

F = v2.functional


def _hue_test_image(gen: torch.Generator, shape=(3, 40, 36), quantised=False) -> torch.Tensor:
    """Random [0, 1] RGB with grey pixels, black, white, primaries, secondaries and ties."""
    x = torch.rand(shape, generator=gen)
    specials = [
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        (0.5, 0.5, 0.5),
        (1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.0, 0.0, 1.0),
        (1.0, 1.0, 0.0),  # R and G tie for the maximum
        (1.0, 0.0, 1.0),  # R and B tie
        (0.2, 0.7, 0.7),  # G and B tie
        (0.3, 0.3, 0.1),
        (1e-7, 0.0, 0.0),  # tiny chroma
    ]
    for i, rgb in enumerate(specials):
        x[..., :, i, :] = torch.tensor(rgb)[:, None]
    x[..., :, -4:, :] = x[..., :1, -4:, :]  # grey rows (C == 0) from random values
    return (x * 255).round() / 255 if quantised else x


def test_adjust_hue_float_matches_torchvision():
    gen = torch.Generator().manual_seed(0)
    factors = [-0.5, 0.5, -0.25, 1e-7, -1e-7, 0.1, -0.1, 1 / 3]
    factors += torch.empty(40).uniform_(-0.5, 0.5, generator=gen).tolist()
    worst = 0.0
    for i, hue in enumerate(factors):
        shape = (3, 40, 36) if i % 3 else (2, 3, 20, 24)  # batched too
        x = _hue_test_image(gen, shape, quantised=i % 2 == 1)
        ours, ref = adjust_hue_float(x, hue), F.adjust_hue(x, hue)
        assert ours.shape == x.shape and ours.dtype == x.dtype and type(ours) is torch.Tensor
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= 5e-6, worst
    x = _hue_test_image(gen)
    grey = x[:, -4:, :]
    torch.testing.assert_close(adjust_hue_float(x, 0.3)[:, -4:, :], grey)  # grey unchanged


def test_adjust_hue_float_dtypes_edge_cases_and_errors():
    gen = torch.Generator().manual_seed(1)
    x = _hue_test_image(gen)
    x64 = x.double()
    ours64 = adjust_hue_float(x64, 0.2)  # computed in float64
    assert ours64.dtype == torch.float64
    torch.testing.assert_close(ours64, F.adjust_hue(x, 0.2).double(), atol=5e-6, rtol=0)
    half = adjust_hue_float(x.half(), 0.2)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), F.adjust_hue(x, 0.2), atol=2e-3, rtol=0)
    img = tv_tensors.Image(x)
    assert type(adjust_hue_float(img, 0.2)) is torch.Tensor
    assert adjust_hue_float(x, 0.0) is x
    one = x[:1]
    assert adjust_hue_float(one, 0.3) is one  # one channel: unchanged, as in PIL
    empty = torch.empty(3, 0, 5)
    assert adjust_hue_float(empty, 0.3) is empty
    with pytest.raises(ValueError, match="hue_factor"):
        adjust_hue_float(x, 0.6)
    with pytest.raises(TypeError, match="float"):
        adjust_hue_float((x * 255).to(torch.uint8), 0.1)
    with pytest.raises(TypeError, match="shape"):
        adjust_hue_float(torch.rand(4, 5, 5), 0.1)


@pytest.mark.parametrize(
    "jitter",
    [(0.4, 0.4, 0.4, 0.1), (0.4, 0.4, 0.2, 0.1), (0.0, 0.0, 0.0, 0.5), (0.8, 0.0, 0.0, 0.0)],
)
def test_fast_color_jitter_same_draws_and_values_as_torchvision(jitter):
    gen = torch.Generator().manual_seed(2)
    fast, ref = FastColorJitter(*jitter), v2.ColorJitter(*jitter)
    x = tv_tensors.Image(torch.rand(3, 32, 30, generator=gen))
    for seed in range(25):  # many seeds: every order of the four operations occurs
        torch.manual_seed(seed)
        a = fast(x)
        state_a = torch.get_rng_state()
        torch.manual_seed(seed)
        b = ref(x)
        assert torch.equal(state_a, torch.get_rng_state())  # same numbers drawn
        assert isinstance(a, tv_tensors.Image) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    u8 = tv_tensors.Image(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=gen))
    torch.manual_seed(0)
    a = fast(u8)
    torch.manual_seed(0)
    assert torch.equal(a, ref(u8))  # uint8 defers to torchvision entirely
    plain = x.as_subclass(torch.Tensor)
    torch.manual_seed(0)
    assert type(fast(plain)) is torch.Tensor


def _matrix_blur(x: torch.Tensor, k: int, sigma_x: float, sigma_y: float) -> torch.Tensor:
    """The full-kernel reflect-padded blur as banded matrices (torchvision's kernel, in f64)."""
    h, w = x.shape[-2:]
    b_h = gaussian_blur_matrix(h, k, sigma_y).double()
    b_w = gaussian_blur_matrix(w, k, sigma_x).double()
    return (b_h @ x.double() @ b_w.T).float()


@pytest.mark.parametrize(
    "hw, k",
    [((224, 224), 23), ((96, 80), 9), ((30, 17), 3), ((12, 12), 23), ((5, 7), 9)],
)
@pytest.mark.parametrize("sigma", [(0.1, 0.1), (0.5, 1.7), (1.3, 0.7), (2.0, 2.0), (4.0, 3.0)])
def test_separable_blur_float_matches_torchvision(hw, k, sigma):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, *hw, generator=gen)
    blur = SeparableGaussianBlur(k, sigma=(0.1, 2.0))
    out = blur.transform(x, {"sigma": list(sigma)})
    assert type(out) is torch.Tensor and out.shape == x.shape and out.dtype == torch.float32
    if k // 2 < min(hw):  # torchvision's reflect padding needs the image wider than k // 2
        ref = F.gaussian_blur(x, [k, k], list(sigma))
        assert (out - ref).abs().max().item() <= 2e-5
    ref = _matrix_blur(x, k, *sigma)  # any size: the former (untruncated) matrix path
    assert (out - ref).abs().max().item() <= 2e-5


@pytest.mark.parametrize("hw", [(4, 3), (1, 9), (9, 1), (2, 2), (11, 6)])
def test_separable_blur_images_smaller_than_kernel(hw):
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, *hw, generator=gen)  # batched
    blur = SeparableGaussianBlur(23)
    for sigma in ((0.1, 0.1), (0.6, 0.9), (2.0, 1.5), (6.0, 6.0)):
        out = blur.transform(x, {"sigma": list(sigma)})
        assert out.shape == x.shape
        torch.testing.assert_close(out, _matrix_blur(x, 23, *sigma), atol=2e-5, rtol=0)
    const = torch.full((3, *hw), 0.25)
    torch.testing.assert_close(blur.transform(const, {"sigma": [2.0, 2.0]}), const)


def test_separable_blur_float_keeps_tv_tensor_and_dtype():
    x = tv_tensors.Image(torch.rand(3, 20, 20, dtype=torch.float64))
    out = SeparableGaussianBlur(7).transform(x, {"sigma": [1.0, 1.5]})
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.float64
    ref = F.gaussian_blur(x.as_subclass(torch.Tensor).float(), [7, 7], [1.0, 1.5])
    torch.testing.assert_close(out.float(), ref, atol=2e-5, rtol=0)


def test_solarize_threshold_equivalent_to_uint8():
    k = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 2, 256)
    f = F.to_dtype(k, torch.float32, scale=True)
    threshold = 128 / 255
    assert torch.equal(f >= threshold, k >= 128)  # the same pixels are inverted
    ref = F.to_dtype(F.solarize(k, 128), torch.float32, scale=True)
    torch.testing.assert_close(F.solarize(f, threshold), ref, atol=1e-6, rtol=0)
    pil = np.asarray(Image.fromarray(k[0].numpy()).point(lambda v: 255 - v if v >= 128 else v))
    assert torch.equal(F.solarize(k, 128)[0], torch.from_numpy(pil.copy()))  # PIL semantics
    steps = PRESETS["mocov3"][1].build().transforms
    (solarize,) = [t for t in steps if isinstance(t, v2.RandomSolarize)]
    assert solarize.threshold == threshold


def test_view_pipeline_order_converts_right_after_the_crop():
    names = [type(t).__name__ for t in PRESETS["mocov2"][0].build().transforms]
    assert names[:3] == ["ToImage", "RandomResizedCrop", "ToDtype"]
    assert names[-1] == "Normalize" and names.count("ToDtype") == 1
    jitter = PRESETS["mocov2"][0].build().transforms[3]
    assert isinstance(jitter.transforms[0], FastColorJitter)


def _random_apply(transform: v2.Transform, p: float) -> v2.Transform:
    """As the module builds it: bare when p == 1 (no random number drawn)."""
    return transform if p == 1.0 else v2.RandomApply([transform], p=p)


def _reference_pipeline(view, mode: str) -> v2.Compose:
    """The view built from torchvision's own operations: all-uint8 (the former pipeline) or
    float right after the crop (v2.ColorJitter, v2.GaussianBlur, solarize at 128 / 255)."""
    b, c, s, h = view.jitter
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            view.size,
            scale=view.crop_scale,
            interpolation=_INTERPOLATIONS[view.interpolation],
            antialias=True,
        ),
    ]
    if mode == "float":
        steps.append(v2.ToDtype(torch.float32, scale=True))
    if view.jitter_p:
        steps.append(_random_apply(v2.ColorJitter(b, c, s, h), view.jitter_p))
    if view.grayscale_p:
        steps.append(v2.RandomGrayscale(view.grayscale_p))
    k = blur_kernel_size(view.size)
    blur_cls = v2.GaussianBlur if mode == "float" else SeparableGaussianBlur
    blur = blur_cls(k, view.blur_sigma)
    if view.blur_p:
        steps.append(_random_apply(blur, view.blur_p))
    if view.solarize_p:
        steps.append(v2.RandomSolarize(128 / 255 if mode == "float" else 128, p=view.solarize_p))
    if view.hflip_p:
        steps.append(v2.RandomHorizontalFlip(view.hflip_p))
    if mode == "uint8":
        steps.append(v2.ToDtype(torch.float32, scale=True))
    steps.append(v2.Normalize(list(view.mean), list(view.std)))
    return v2.Compose(steps)


def _photo(seed: int, size=(150, 110)) -> torch.Tensor:
    """A smooth random colour image (uint8 CHW), less noisy than uniform noise."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 5, generator=gen)
    up = torch.nn.functional.interpolate(low, size=size[::-1], mode="bicubic")
    noise = 0.05 * torch.randn(1, 3, *size[::-1], generator=gen)
    return ((up + noise).clamp(0, 1) * 255).round().to(torch.uint8)[0]


def _seeded(pipeline, x, seed):
    torch.manual_seed(seed)
    out = pipeline(x)
    return out.as_subclass(torch.Tensor), torch.get_rng_state()


def test_crops_and_flips_identical_to_the_uint8_pipeline():
    # no colour steps: the same seed gives the same crop and flip, hence the same pixels
    for preset in ("mocov2", "mocov3"):
        view = dataclasses.replace(
            PRESETS[preset][0], size=48, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
        )
        new, old = view.build(), _reference_pipeline(view, "uint8")
        for seed in range(10):
            x = _photo(seed)
            a, state_a = _seeded(new, x, seed)
            b, state_b = _seeded(old, x, seed)
            assert torch.equal(a, b) and torch.equal(state_a, state_b)


@pytest.mark.parametrize("preset", ["mocov2", "mocov3"])
def test_two_view_matches_torchvision_float_ops_and_uint8_pipeline(preset):
    diff_float, diff_uint8 = [], []
    for view in PRESETS[preset]:
        view = dataclasses.replace(view, size=96, mean=(0.0,) * 3, std=(1.0,) * 3)
        new = view.build()
        ref_float = _reference_pipeline(view, "float")
        ref_uint8 = _reference_pipeline(view, "uint8")
        for seed in range(12):
            x = _photo(seed)
            a, state = _seeded(new, x, seed)
            b, state_float = _seeded(ref_float, x, seed)
            c, state_uint8 = _seeded(ref_uint8, x, seed)
            # the same random numbers, drawn in the same order, by all three pipelines
            assert torch.equal(state, state_float) and torch.equal(state, state_uint8)
            diff_float.append((a - b).abs().flatten())
            diff_uint8.append((a - c).abs().flatten())
    d_float, d_uint8 = torch.cat(diff_float), torch.cat(diff_uint8)
    # torchvision's float ops: equal to float rounding (a pixel within ~1e-6 of the solarize
    # threshold could flip, hence a fraction rather than a maximum)
    assert (d_float > 1e-4).float().mean().item() <= 1e-4
    assert d_float.median().item() <= 1e-6
    # the former uint8 pipeline: within its rounding (torchvision's uint8 colour kernels
    # truncate after each step, ~1.5 / 255 darker on average)
    assert d_uint8.mean().item() <= 2.5 / 255
    assert np.quantile(d_uint8.numpy(), 0.999) <= 8 / 255
