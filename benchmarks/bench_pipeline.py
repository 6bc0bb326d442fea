"""Two-view MoCo-v2 augmentation throughput of one data-loading process (images/s per worker).

Standalone script (no pytest). Both pipelines decode every image from its JPEG bytes on every
pass and produce two augmented, normalised float32 (3, 224, 224) views per image with the
MoCo-v2 ``--aug-plus`` augmentation: RandomResizedCrop(224, scale (0.2, 1)), ColorJitter(0.4,
0.4, 0.4, 0.1) w.p. 0.8, grayscale w.p. 0.2, Gaussian blur (sigma 0.1..2) w.p. 0.5, horizontal
flip, ToTensor / Normalize.

* ``mochi_hub`` (candidate): the training set's own item path, ``RobustTwoViewDataset`` over
  ``{"bytes": ...}`` cells with the ``two_view_transform("mocov2", 224)`` preset (decode with
  ``decode_image``, uint8 crop and resize, colour and blur on the torchvision v2 tensor path).
* ``torchvision_pil`` (baseline): facebookresearch/moco's ``main_moco.py`` pipeline, a
  torchvision v1 ``transforms.Compose`` of PIL operations with moco's PIL ``GaussianBlur``,
  ``ToTensor`` and ``Normalize``, each image opened with ``PIL.Image.open(...).convert("RGB")``.

One timed unit is one pass over all images; the pipelines alternate inside each repetition
(order rotated) after a warm-up, and the median images/s are compared (target: mochi_hub >=
1.5x the baseline). Decode-only rates of both decoders are timed the same way, for context.

torch runs with one intra-op thread, as in a DataLoader worker (``--threads`` changes it), so
the rates are per worker process. From them the script derives how many workers one GPU needs
at the throughput anchors of ``shared/docs/performance.md``.

Images: ``--source synthetic`` (default) makes natural-looking 500x375 colour images from
random fields with a 1/f amplitude spectrum (the spectrum of natural photographs), JPEG
quality 85, about ImageNet's bytes per image; ``--source cifar10`` upsamples CIFAR-10 images
(bicubic) from the project's Parquet copy to the same size instead (blurrier, smaller files).

Examples::

    python benchmarks/bench_pipeline.py --quick
    python benchmarks/bench_pipeline.py                       # 64 images, 7 repetitions
    python benchmarks/bench_pipeline.py --source cifar10
"""

from __future__ import annotations

import argparse
import io
import math
import random
from pathlib import Path

import _common
import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from mochi_hub.data.sources import RobustTwoViewDataset, decode_image
from mochi_hub.data.transforms import IMAGENET_MEAN, IMAGENET_STD, two_view_transform

VARIANTS = ("torchvision_pil", "mochi_hub", "decode_pil", "decode_mochi_hub")
TARGET = 1.5
QUICK = dict(images=6, reps=2, warmup=1)
CIFAR10_DIR = _common.ROOT.parent / "shared" / "data" / "cifar10"

# Images/s one GPU consumes for MoCo-v2 ResNet-50 pretraining, from shared/docs/performance.md.
ANCHORS = (
    ("V100, official MoCo-v2 (53 h / 200 ep on 8 GPUs, fp32, PIL loader)", 168),
    ("A100, MoCo-v2 R50 AMP GPU-bound estimate (2,470 supervised img/s / 1.33)", 1850),
    ("A100, supervised R50 AMP (NVIDIA DLE, one crop)", 2470),
    ("H100, MoCo-v2 R50 AMP estimate (A100 x 1.96, MLPerf ratio)", 3630),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs (default 64)")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    p.add_argument("--source", choices=["synthetic", "cifar10"], default="synthetic")
    p.add_argument("--cifar10-dir", default=str(CIFAR10_DIR))
    p.add_argument("--image-size", type=int, default=224, help="output side (default 224)")
    p.add_argument("--reps", type=int, default=7, help="timed passes per variant (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per variant")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    _common.add_run_args(p, str(QUICK))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------- images


def _one_over_f(rng: np.random.Generator, h: int, w: int, exponent: float) -> np.ndarray:
    """A zero-mean, unit-variance random field with amplitude spectrum 1 / f**exponent."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    spec = rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)
    spec /= f**exponent
    spec[0, 0] = 0.0
    x = np.fft.irfft2(spec, s=(h, w))
    return (x - x.mean()) / (x.std() + 1e-12)


def synthetic_images(n: int, width: int, height: int, seed: int) -> list[Image.Image]:
    """Natural-looking colour images: a 1/f luminance field plus smoother chroma fields."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lum = _one_over_f(rng, height, width, 1.0)
        c1, c2 = (_one_over_f(rng, height, width, 1.2) for _ in range(2))
        rgb = np.stack([lum + 0.5 * c1, lum - 0.3 * c1 + 0.3 * c2, lum - 0.6 * c2], axis=-1)
        rgb = rgb * rng.uniform(35, 60) + rng.uniform(90, 150, size=3)
        out.append(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)))
    return out


def cifar10_images(n: int, width: int, height: int, folder: str) -> list[Image.Image]:
    """The first ``n`` CIFAR-10 test images, upsampled (bicubic) to width x height."""
    import pyarrow.parquet as pq

    path = Path(folder) / "test-00000-of-00001.parquet"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --cifar10-dir or use --source synthetic")
    column = pq.read_table(path, columns=["image"]).column("image").to_pylist()[:n]
    arrays = [np.frombuffer(raw, dtype=np.uint8).reshape(32, 32, 3) for raw in column]
    return [Image.fromarray(a).resize((width, height), Image.BICUBIC) for a in arrays]


def encode(images: list[Image.Image], quality: int) -> list[bytes]:
    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)  # baseline JFIF, 4:2:0
        blobs.append(buf.getvalue())
    return blobs


# --------------------------------------------------------------------------- pipelines


class MocoGaussianBlur:
    """facebookresearch/moco ``moco.loader.GaussianBlur``: PIL blur with a random sigma."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x: Image.Image) -> Image.Image:
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


def torchvision_pil_pipeline(size: int):
    """MoCo-v2 ``--aug-plus`` from facebookresearch/moco ``main_moco.py``, two crops."""
    augmentation = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([MocoGaussianBlur([0.1, 2.0])], p=0.5),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ]
    )

    def item(blob: bytes):
        img = Image.open(io.BytesIO(blob)).convert("RGB")  # ImageFolder's pil_loader
        return augmentation(img), augmentation(img)

    return item


def mochi_hub_pipeline(blobs: list[bytes], size: int):
    """The training set's item path: RobustTwoViewDataset + the mocov2 two-view preset."""
    views = two_view_transform("mocov2", size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    rows = [{"image": {"bytes": b, "path": None}} for b in blobs]
    dataset = RobustTwoViewDataset(rows, views, label_column=None)

    def item(index: int):
        out = dataset[index]
        return out["view1"], out["view2"]

    return item, views


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    info = _common.machine("cpu")
    _common.print_machine(info)

    if args.source == "synthetic":
        images = synthetic_images(args.images, args.width, args.height, args.seed)
        what = "synthetic 1/f-spectrum colour fields"
    else:
        images = cifar10_images(args.images, args.width, args.height, args.cifar10_dir)
        what = f"CIFAR-10 test images upsampled bicubic from 32x32 ({args.cifar10_dir})"
    blobs = encode(images, args.quality)
    del images
    kib = np.mean([len(b) for b in blobs]) / 1024
    print(
        f"images: {len(blobs)} x {args.width}x{args.height} JPEG q{args.quality}, "
        f"mean {kib:.0f} KiB ({what}); decoded from bytes on every pass"
    )
    print(f"torch threads: {torch.get_num_threads()} (one DataLoader worker)")

    pil_item = torchvision_pil_pipeline(args.image_size)
    mochi_item, views = mochi_hub_pipeline(blobs, args.image_size)
    print(f"mochi_hub preset: {views!r}")
    a, b = pil_item(blobs[0]), mochi_item(0)
    for x, y in zip(a, b, strict=True):  # same output contract
        assert x.shape == y.shape == (3, args.image_size, args.image_size), (x.shape, y.shape)
        assert x.dtype == y.dtype == torch.float32

    def decode_pil(blob: bytes):
        return Image.open(io.BytesIO(blob)).convert("RGB")

    def decode_mochi(blob: bytes):
        return decode_image({"bytes": blob, "path": None})

    passes = {
        "torchvision_pil": lambda: [pil_item(x) for x in blobs],
        "mochi_hub": lambda: [mochi_item(i) for i in range(len(blobs))],
        "decode_pil": lambda: [decode_pil(x) for x in blobs],
        "decode_mochi_hub": lambda: [decode_mochi(x) for x in blobs],
    }

    def one(variant: str) -> float:
        return _common.timed(passes[variant], torch.device("cpu"))

    times = _common.interleaved(VARIANTS, one, args.reps, args.warmup)
    rate = {v: len(blobs) / _common.median(t) for v, t in times.items()}
    print(f"\n{'pipeline':<18} {'img/s (median)':>15} {'best img/s':>11} {'ms/img':>8}")
    for v in VARIANTS:
        best = len(blobs) / min(times[v])
        print(f"{v:<18} {rate[v]:15.1f} {best:11.1f} {1e3 / rate[v]:8.2f}")
    ratio = rate["mochi_hub"] / rate["torchvision_pil"]
    met = "met" if ratio >= TARGET else "NOT met"
    print(
        f"\nspeed-up mochi_hub / torchvision_pil (two views, medians): {ratio:.2f}x  "
        f"target >= {TARGET}: {met}"
    )

    print("\nworkers (1 thread each) one GPU needs to be fed, at the measured per-worker rates:")
    print(f"{'GPU consumption anchor':<76} {'img/s':>6} {'pil':>5} {'mochi':>6}")
    needs = []
    for name, need in ANCHORS:
        w_pil = math.ceil(need / rate["torchvision_pil"])
        w_mochi = math.ceil(need / rate["mochi_hub"])
        needs.append(
            {
                "anchor": name,
                "images_per_s": need,
                "workers_torchvision_pil": w_pil,
                "workers_mochi_hub": w_mochi,
            }
        )
        print(f"{name:<76} {need:6d} {w_pil:5d} {w_mochi:6d}")
    print("(x 8 for an 8-GPU node; the main process of each GPU also needs a core)")

    out = {
        "benchmark": "bench_pipeline",
        "machine": info,
        "quick": args.quick,
        "images": {
            "count": len(blobs),
            "width": args.width,
            "height": args.height,
            "jpeg_quality": args.quality,
            "mean_kib": kib,
            "source": what,
        },
        "image_size": args.image_size,
        "reps": args.reps,
        "warmup": args.warmup,
        "times_s": times,
        "images_per_s": rate,
        "ratio_mochi_hub_over_torchvision_pil": ratio,
        "target": TARGET,
        "target_met": ratio >= TARGET,
        "workers_per_gpu": needs,
    }
    path = args.json or (
        None if args.no_json else _common.default_json("pipeline", "cpu", args.quick)
    )
    _common.write_json(path, out)
    return out


if __name__ == "__main__":
    main()
