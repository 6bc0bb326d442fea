"""Convert released MoCo / MoCHi checkpoints into Hub folders or detectron2 weights.

Reads the ``.pth.tar`` files the MoCo v1/v2, MoCHi and MoCo-v3 code bases save (and their
linear-classification checkpoints, bare state dicts and ``.safetensors`` files) without running
any pickled code: ``torch.load(..., weights_only=True)`` only. The layout is detected from the
keys; the query (base) encoder is kept, loaded strictly into the stock timm architecture, and
everything else (projection heads, momentum encoder, predictor, queue) is dropped and reported.
The result is written as a Hub folder (:func:`mochi_hub.export.write_hub_folder`) or as the
``.pkl`` detectron2 reads (the renaming of MoCo's ``detection/convert-pretrain-to-detectron2.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pickle
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch

from mochi_hub import __version__

__all__ = [
    "ConversionReport",
    "convert_checkpoint",
    "detectron2_name",
    "infer_architecture",
    "read_safetensors",
]

LAYOUTS = {
    "mocov1": "MoCo v1 pretraining: encoder_q with a linear fc head, encoder_k, queue",
    "mocov2": "MoCo v2 / MoCHi pretraining: encoder_q with an MLP fc head, encoder_k, queue",
    "mocov3": "MoCo v3 pretraining: base_encoder, momentum_encoder, predictor",
    "linear": "linear classification: a backbone with a trained fc / head classifier",
    "backbone": "bare backbone state dict, no heads",
}
_METHODS = {"mocov1": "MoCo", "mocov2": "MoCo-v2", "mocov3": "MoCo-v3"}
_ROLES = {
    "encoder_q.fc": "projection head",
    "encoder_k": "momentum encoder",
    "queue": "queue of negatives",
    "queue_ptr": "queue pointer",
    "base_encoder.fc": "projection head",
    "base_encoder.head": "projection head",
    "momentum_encoder": "momentum encoder",
    "predictor": "prediction head",
    "fc": "linear classifier",
    "head": "linear classifier",
    "num_batches_tracked": "BatchNorm step counters (unused by detectron2)",
}
_HEADS = ("fc", "head")
_MIXING_KEYS = ("num_hard", "num_synthetic", "num_synthetic_query", "start_epoch")
# The MoCo-v3 code names its ViTs vit_small / vit_base; its ViT-S has 12 heads (timm's has 6).
_MOCOV3_VITS = {
    "vit_small": ("vit_small_patch16_224", {"num_heads": 12}),
    "vit_base": ("vit_base_patch16_224", {}),
}
_RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_VIT_SIZES = {(192, 12): "tiny", (384, 12): "small", (768, 12): "base", (1024, 24): "large"}
IMAGENET_DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",  # MoCo's evaluation resize
    "crop_pct": 0.875,
}


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_checkpoint` found, kept, dropped and wrote.

    Attributes:
        source: The checkpoint read.
        out: The folder (``to="timm"``) or ``.pkl`` file (``to="detectron2"``) written.
        layout: The detected layout, a key of :data:`LAYOUTS`.
        architecture: The stock timm architecture the weights were loaded into.
        model_args: Extra ``timm.create_model`` arguments (``num_heads`` of MoCo-v3's ViT-S).
        kept: Number of source tensors written.
        dropped: Tensors left out, per key group (``encoder_k``, ``encoder_q.fc``, ``queue``...).
        to: ``timm`` or ``detectron2``.
        notes: Remarks worth reading (assumptions made during the conversion).
    """

    source: Path
    out: Path
    layout: str
    architecture: str
    model_args: dict[str, Any]
    kept: int
    dropped: dict[str, int]
    to: str
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """The report as a few human-readable lines."""
        args = "".join(f", {k}={v}" for k, v in self.model_args.items())
        lines = [
            f"layout: {self.layout} ({LAYOUTS[self.layout]})",
            f"architecture: {self.architecture}{args}",
            f"kept {self.kept} tensors",
        ]
        if self.dropped:
            lines.append(f"dropped {sum(self.dropped.values())} tensors:")
            width = max(map(len, self.dropped))
            for group, n in self.dropped.items():
                role = _ROLES.get(group, "not part of the backbone")
                lines.append(f"  {group:<{width}}  {n:>5}  {role}")
        else:
            lines.append("dropped nothing")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"wrote {self.out} ({self.to})")
        return "\n".join(lines)


def _refusal(path: Path, err: Exception) -> ValueError:
    found = re.search(r"GLOBAL (\S+)", str(err))
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
    what = f" (it references {found.group(1)})" if found else ""
    what = what or (f" (torch: {detail.group(1).strip()})" if detail else "")
    return ValueError(
        f"{path.name} is not a plain-tensor checkpoint{what}: mochi_hub loads checkpoints with "
        "torch.load(weights_only=True) and never executes pickled code. Re-save its state dict "
        "(tensors only) or a .safetensors file from a trusted environment."
    )


def _kind(path: Path) -> str:
    """What an unreadable weights file looks like, for error messages."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "it is empty (0 bytes)"
    if head[8:9] == b"{":  # a safetensors header: its 8-byte length, then JSON
        return "it is truncated or corrupt"
    if (head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5) or head[:4] == b"PK\x03\x04":
        return "it is a pickle / torch.save file, which mochi_hub never unpickles"
    if head.isascii() and all(c >= 32 or c in b"\t\r\n" for c in head):
        return "it is a text file"
    return "it is truncated, corrupt or in another format"


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors (on the CPU) and metadata, with errors that say what is wrong.

    Only the safetensors format is read: a pickle under a ``.safetensors`` name is refused, never
    unpickled.

    Args:
        path: The file.

    Returns:
        ``(tensors, metadata)``; the metadata is ``{}`` when the file has none.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is a directory, or not a complete safetensors file (empty, truncated,
            text, a pickle); the message names the file and the problem.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a safetensors weights file")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path} is not a valid safetensors file: {_kind(path)} ({' '.join(str(e).split())})"
        ) from e


def _read(path: Path) -> Any:
    """The object stored in ``path``, read without executing code."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a checkpoint file (.pth.tar, .safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read {path.name}: it is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise _refusal(path, e) from e
        raise ValueError(f"cannot read {path.name}: truncated or corrupt pickle ({e})") from e
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError) as e:
        detail = str(e).split(".")[0] or type(e).__name__
        raise ValueError(
            f"cannot read {path.name}: truncated, corrupt or not a PyTorch checkpoint ({detail})"
        ) from e


def _tensors(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and the scalar entries (``epoch``, ``arch``) of a loaded checkpoint."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} holds a {type(obj).__name__}, not a checkpoint dict")
    meta = {k: obj[k] for k in ("epoch", "arch") if isinstance(obj.get(k), int | str)}
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{path.name} holds no tensors (top-level keys: {list(obj)[:8]})")
    return sd, meta


def _detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """The layout of a state dict whose ``module.`` prefixes are already stripped."""
    if any(k.startswith("encoder_q.") for k in sd):
        return "mocov2" if any(re.match(r"encoder_q\.fc\.\d+\.", k) for k in sd) else "mocov1"
    if any(k.startswith("base_encoder.") for k in sd):
        return "mocov3"
    resnet = "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd)
    if resnet or "patch_embed.proj.weight" in sd:
        return "linear" if {"fc.weight", "head.weight"} & set(sd) else "backbone"
    known = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise ValueError(
        f"unknown checkpoint layout (keys seen: {list(sd)[:6]}); known layouts: {known}"
    )


def _split(
    sd: dict[str, torch.Tensor], layout: str, keep_classifier: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The encoder's tensors (prefix stripped) and the dropped tensors counted per group."""
    prefix = {"mocov1": "encoder_q.", "mocov2": "encoder_q.", "mocov3": "base_encoder."}
    encoder = prefix.get(layout, "")
    kept: dict[str, torch.Tensor] = {}
    dropped: Counter[str] = Counter()
    for key, value in sd.items():
        if not key.startswith(encoder):
            dropped[key.split(".")[0]] += 1
            continue
        name = key.removeprefix(encoder)
        head = name.split(".")[0]
        if head in _HEADS and not (keep_classifier and layout == "linear"):
            dropped[encoder + head] += 1
        else:
            kept[name] = value
    return kept, dict(dropped)


def _resnet_name(sd: dict[str, torch.Tensor]) -> str | None:
    blocks = tuple(
        len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    )
    bottleneck = "layer1.0.conv3.weight" in sd
    name = _RESNETS.get((blocks, bottleneck))
    if name and bottleneck and sd["layer1.0.conv1.weight"].shape[0] == 128:
        name = f"wide_{name}_2"  # wide_resnet50_2: twice the bottleneck width
    return name


def _vit_name(sd: dict[str, torch.Tensor]) -> str | None:
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    size = _VIT_SIZES.get((dim, depth))
    tokens = sd["pos_embed"].shape[1] - ("cls_token" in sd) if "pos_embed" in sd else 0
    side = math.isqrt(tokens)
    if size is None or side * side != tokens:
        return None
    return f"vit_{size}_patch{patch}_{side * patch}"


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> str:
    """The stock timm architecture of a backbone state dict, from its keys and shapes.

    Recognises torchvision/timm ResNets (18, 34, 50, 101, 152 and the wide 50/101 variants) by
    their block counts and widths, and timm VisionTransformers (tiny, small, base, large) by embed
    dimension, depth, patch size and number of position embeddings. Only shapes are read, so
    tensors on the ``meta`` device work.

    Args:
        state_dict: Backbone keys without prefixes (``conv1.weight``, ``blocks.0.attn.qkv.weight``).

    Returns:
        A timm model name such as ``resnet50`` or ``vit_small_patch16_224``.

    Raises:
        ValueError: If the keys match no known architecture.
    """
    name = None
    if "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        name = _resnet_name(state_dict)
    elif "patch_embed.proj.weight" in state_dict:
        name = _vit_name(state_dict)
    if name is None or not timm.is_model(name):
        raise ValueError(
            f"cannot infer the architecture from the keys (e.g. {list(state_dict)[:4]}); "
            "pass --arch with a timm model name (resnet50, vit_small_patch16_224, ...)"
        )
    return name


def _resolve_arch(
    arch: str | None, entry: str | None, sd: dict[str, torch.Tensor], layout: str
) -> tuple[str, dict[str, Any], list[str]]:
    """The timm architecture, its extra create_model arguments and notes on assumptions made."""
    notes = []
    name = arch or entry
    if name in _MOCOV3_VITS:  # the MoCo-v3 code's own names
        name, kwargs = _MOCOV3_VITS[name]
        return name, dict(kwargs), notes
    if name is None:
        name = infer_architecture(sd)
    elif not timm.is_model(name):
        source = "--arch" if arch else "the checkpoint's 'arch' entry"
        raise ValueError(f"unknown timm architecture '{name}' ({source}); pass --arch")
    kwargs: dict[str, Any] = {}
    if name.startswith("vit_small"):
        if layout == "mocov3":
            kwargs["num_heads"] = 12  # MoCo-v3's ViT-S; head count is not visible in the weights
        else:
            notes.append(
                "ViT-S head count cannot be read from the weights: using timm's default (6); "
                "pass --arch vit_small for MoCo-v3's 12-head ViT-S"
            )
    return name, kwargs, notes


def _shape_problems(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in ref]
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(ref[k].shape)}"
        for k in sd
        if k in ref and sd[k].shape != ref[k].shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {keys[:3]})")
    return problems


def _build(arch: str, kwargs: dict[str, Any], sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``arch`` with ``sd`` loaded, or a ValueError naming what does not fit."""
    num_classes = sd["fc.weight"].shape[0] if "fc.weight" in sd else 0
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else num_classes
    with torch.device("meta"):  # shapes only: no random initialisation to throw away
        model = timm.create_model(arch, num_classes=num_classes, **kwargs)
    problems = _shape_problems(model, sd)
    if problems:
        raise ValueError(
            f"the checkpoint's encoder does not match architecture '{arch}': "
            + "; ".join(problems)
            + " (pass the right --arch)"
        )
    full = {  # own copies in the model's dtypes; a missing num_batches_tracked counter starts at 0
        k: sd[k].detach().to(ref.dtype, copy=True)
        if k in sd
        else torch.zeros_like(ref, device="cpu")
        for k, ref in model.state_dict().items()
    }
    model.load_state_dict(full, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = timm.create_model(arch, num_classes=num_classes, **kwargs)  # derived buffers
        model.load_state_dict(full, strict=True)
    return model.eval()


def detectron2_name(key: str) -> str:
    """The detectron2 name of a torchvision/timm ResNet key (MoCo's detectron2 renaming).

    ``conv1``/``bn1`` at the top become ``stem.conv1``/``stem.conv1.norm``, ``layerN`` becomes
    ``res{N+1}``, ``bnK`` inside blocks ``convK.norm`` and ``downsample.0``/``.1`` become
    ``shortcut``/``shortcut.norm``.
    """
    if not key.startswith("layer"):
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _write_detectron2(
    sd: dict[str, torch.Tensor], out: Path, overwrite: bool
) -> tuple[int, dict[str, int]]:
    """Write the detectron2 ``.pkl`` atomically; return the kept count and dropped groups."""
    _check_pkl_out(out, overwrite)
    weights = {
        detectron2_name(k): v.detach().cpu().numpy()
        for k, v in sd.items()
        if not k.endswith("num_batches_tracked")
    }
    skipped = len(sd) - len(weights)
    blob = {"model": weights, "__author__": "MOCO", "matching_heuristics": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(weights), ({"num_batches_tracked": skipped} if skipped else {})


def _check_pkl_out(out: Path, overwrite: bool) -> None:
    """Refuse a detectron2 output that is not a ``.pkl`` file that may be (re)written."""
    if out.suffix != ".pkl":
        raise ValueError(f"the detectron2 output must be a .pkl file, got {out}")
    if out.is_symlink() or out.is_dir():
        raise FileExistsError(f"{out} is a directory or a link: give a .pkl file name as --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace")


def _mixing_dict(mixing: Any) -> dict[str, Any] | None:
    """``(N, s, s')`` or ``(N, s, s', start_epoch)`` or a dict, as the card's mixing dict."""
    if mixing is None or isinstance(mixing, dict):
        return mixing
    values = [int(v) for v in mixing]
    if len(values) not in (3, 4):
        raise ValueError(f"mixing takes N S SQ [START_EPOCH], got {values}")
    return dict(zip(_MIXING_KEYS, values + [None] * (4 - len(values)), strict=True))


def _write_hub(
    model: torch.nn.Module,
    out: Path,
    *,
    source: Path,
    layout: str,
    architecture: str,
    meta: dict[str, Any],
    dropped: dict[str, int],
    mixing: dict[str, Any] | None,
    repo_id: str | None,
    base_model: str | None,
    overwrite: bool,
) -> None:
    from mochi_hub.export import write_hub_folder

    method = _METHODS.get(layout, "MoCo-v3" if meta.get("arch") in _MOCOV3_VITS else "MoCo")
    metadata = {
        "mochi_hub_version": __version__,
        "architecture": architecture,
        "method": method,
        "converted_from": source.name,
        "source_layout": layout,
        "dropped": json.dumps(dropped),
        "mixing": json.dumps(mixing and [mixing[k] for k in _MIXING_KEYS[:3]]),
    }
    if "epoch" in meta:
        metadata["epochs"] = str(meta["epoch"])
    notes = [f"Converted from `{source.name}` ({LAYOUTS[layout]}) with `mochi-hub convert`."]
    if mixing is None:
        notes.append("The source does not record whether MoCHi mixing was used (no --mixing).")
    if model.num_classes:
        notes.append(
            f"Keeps the source's {model.num_classes}-class linear classifier "
            "(linear-evaluation protocol); pass num_classes=0 for features."
        )
    write_hub_folder(
        model,
        out,
        architecture=architecture,
        metadata=metadata,
        data_config=dict(IMAGENET_DATA_CONFIG),
        card=dict(
            method=method,
            mixing=mixing,
            epochs=meta.get("epoch"),
            converted_from=source.name,
            base_model=base_model,
            limitations=notes,
        ),
        repo_id=repo_id,
        overwrite=overwrite,
    )


def convert_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str | None = None,
    to: str = "timm",
    keep_classifier: bool = False,
    repo_id: str | None = None,
    mixing: Any = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert a released MoCo / MoCHi / MoCo-v3 checkpoint into a Hub folder or detectron2 file.

    Args:
        path: A ``.pth.tar``/``.pth`` checkpoint (``{"state_dict": ...}`` or a bare state dict)
            or a ``.safetensors`` file.
        out: The Hub folder to create (``to="timm"``) or the ``.pkl`` file (``"detectron2"``).
        arch: A timm model name; by default the checkpoint's ``arch`` entry, else inferred from
            the keys. MoCo-v3's own ``vit_small`` / ``vit_base`` names are accepted too.
        to: ``timm`` (Hub folder) or ``detectron2`` (ResNets only).
        keep_classifier: Keep the classifier of a linear-classification checkpoint.
        repo_id: The Hub repository the folder is meant for (used in the card).
        mixing: MoCHi's ``(N, s, s')`` (optionally ``start_epoch`` 4th) if the source used it.
        base_model: A Hub id the model derives from, for the card (``org/name``).
        overwrite: Replace ``out`` if it is a previous export or an empty folder (``timm``), or
            an existing ``.pkl`` file (``detectron2``).

    Returns:
        What was detected, kept, dropped and written.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        FileExistsError: If ``out`` exists and may not be replaced
            (:func:`mochi_hub.export.check_out_folder`); nothing is changed then.
        ValueError: If the file holds pickled code, is unreadable or a directory, has an unknown
            layout or does not match the architecture, ``repo_id`` or ``base_model`` is not a
            valid ``org/name``, or the options do not apply to it.
    """
    from mochi_hub.export import check_out_folder
    from mochi_hub.hub import check_repo_id

    if to not in ("timm", "detectron2"):
        raise ValueError(f"unknown target '{to}': use timm or detectron2")
    for hub_id in (repo_id, base_model):
        if hub_id is not None:
            check_repo_id(hub_id)
    source, out = Path(path), Path(out)
    if to == "timm":
        check_out_folder(out, overwrite)
    else:
        _check_pkl_out(out, overwrite)
    sd, meta = _tensors(_read(source), source)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    layout = _detect_layout(sd)
    if keep_classifier and (layout != "linear" or to != "timm"):
        raise ValueError(
            "--keep-classifier applies to a linear-classification checkpoint exported for timm; "
            f"this one is {layout} ({LAYOUTS[layout]})"
        )
    kept, dropped = _split(sd, layout, keep_classifier)
    name, kwargs, notes = _resolve_arch(arch, meta.get("arch"), kept, layout)
    model = _build(name, kwargs, kept)
    if to == "detectron2":
        if not isinstance(model, timm.models.ResNet):
            raise ValueError(f"detectron2 export supports ResNets only, not '{name}'")
        n, skipped = _write_detectron2(kept, out, overwrite)
        dropped.update(skipped)
    else:
        n = len(kept)
        _write_hub(
            model,
            out,
            source=source,
            layout=layout,
            architecture=name,
            meta=meta,
            dropped=dropped,
            mixing=_mixing_dict(mixing),
            repo_id=repo_id,
            base_model=base_model,
            overwrite=overwrite,
        )
    return ConversionReport(source, out, layout, name, kwargs, n, dropped, to, tuple(notes))
