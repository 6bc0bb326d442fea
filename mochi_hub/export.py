"""Export a trained backbone as a Hugging Face Hub folder that timm loads as it is.

The folder holds ``model.safetensors`` (the query backbone only: no momentum encoder, heads or
queue; safetensors metadata ``format: pt`` plus provenance), timm's ``config.json`` naming the
stock architecture (so ``timm.create_model("hf-hub:<org>/<name>", pretrained=True)`` works without
mochi_hub), the resolved training configuration and a model card rendered from a Jinja template.
It is written under a temporary name and renamed when complete. ``overwrite`` replaces only a
previous export (a folder holding nothing but export files) or an empty folder: never a file, nor
a folder with anything else in it, so a mistyped ``--out`` cannot delete unrelated work.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from mochi_hub import __version__
from mochi_hub.config import Config, config_to_dict, load_config
from mochi_hub.fsutil import replace_dir

__all__ = [
    "EXPORT_FILES",
    "check_out_folder",
    "export_backbone",
    "load_checkpoint_backbone",
    "render_card",
    "resolve_checkpoint",
    "write_hub_folder",
]

TEMPLATE = Path(__file__).parent / "model_cards" / "backbone.md.j2"
_DATASET_TAGS = {"digits": "sklearn-digits", "ILSVRC/imagenet-1k": "imagenet-1k"}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint directory, given it or a run directory (its newest checkpoint).

    Raises:
        FileNotFoundError: If there is no complete checkpoint there.
    """
    from mochi_hub.engine import COMPLETE_MARKER, find_checkpoint

    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run directory")
    return found


def load_checkpoint_backbone(ckpt: Path, cfg: Config) -> tuple[torch.nn.Module, dict]:
    """The query backbone of a training checkpoint, verified against ``cfg``'s architecture.

    Returns:
        The model (eval mode, no classifier) and its contiguous state dict.

    Raises:
        FileNotFoundError: If the checkpoint has no ``model.safetensors``.
        ValueError: If ``model.safetensors`` is not a readable safetensors file (empty,
            truncated, a pickle, a directory), holds no backbone, or its backbone does not match
            the architecture (the message names the missing, unexpected and mis-shaped keys).
    """
    from mochi_hub.convert import read_safetensors

    state, _ = read_safetensors(Path(ckpt) / "model.safetensors")
    sd = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not sd:
        raise ValueError(
            f"{ckpt} holds no 'backbone.*' weights (keys seen: {sorted(state)[:4]}): not a "
            "mochi_hub checkpoint"
        )
    model = timm.create_model(cfg.model.arch, num_classes=0, **dict(cfg.model.backbone_kwargs))
    own = model.state_dict()
    problems = {
        "missing keys": [k for k in own if k not in sd],
        "unexpected keys": sorted(k for k in sd if k not in own),
        "shape mismatches": [
            f"{k}: {tuple(sd[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
            for k in sd
            if k in own and sd[k].shape != own[k].shape
        ],
    }
    if any(problems.values()):
        raise ValueError(
            f"the checkpoint's backbone does not match architecture '{cfg.model.arch}' "
            f"{dict(cfg.model.backbone_kwargs)}: "
            + "; ".join(
                f"{len(keys)} {what}: {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                for what, keys in problems.items()
                if keys
            )
        )
    model.load_state_dict(sd, strict=True)
    return model.eval(), {k: v.contiguous() for k, v in model.state_dict().items()}


def render_card(
    model: torch.nn.Module,
    name: str,
    repo_id: str,
    pretrained_cfg: dict,
    *,
    architecture: str,
    method: str,
    mixing: dict | None = None,
    dataset: str | None = None,
    epochs: int | None = None,
    recipe_yaml: str | None = None,
    eval_rows: list[dict] | None = None,
    converted_from: str | None = None,
    base_model: str | None = None,
    limitations: list[str] | None = None,
    images: dict[str, str] | None = None,
) -> str:
    """Render the model card (``model_cards/backbone.md.j2``) through huggingface_hub's ModelCard.

    Args:
        model: The exported backbone.
        name: The folder / repository name.
        repo_id: ``org/name`` used in the usage snippets.
        pretrained_cfg: The ``pretrained_cfg`` written to ``config.json``.
        architecture: The stock timm architecture (``resnet50``).
        method: ``MoCo-v2``, ``MoCo-v3`` or ``MoCo``.
        mixing: ``{"num_hard", "num_synthetic", "num_synthetic_query", "start_epoch"}`` or None.
        dataset: The pretraining data set.
        epochs: Pretraining epochs.
        recipe_yaml: The resolved training configuration, shown in the card.
        eval_rows: Rows ``{"dataset", "split", "protocol", "metric", "value"}``.
        converted_from: The source file of a converted checkpoint.
        base_model: A Hub id this model derives from.
        limitations: Extra lines for the limitations section.
        images: ``{file name in the repo: caption}`` of images shown in the card.

    Returns:
        The card's text (YAML front matter and Markdown).
    """
    eval_rows = list(eval_rows or [])
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    pretraining = f"MoCHi (hard negative mixing) on top of {method}" if mixing else method
    tag = _DATASET_TAGS.get(dataset or "", dataset if dataset and "/" in dataset else None)
    results = [
        EvalResult(
            task_type="image-classification",
            task_name=f"{r['protocol']} classification",
            dataset_type=str(r["dataset"]),
            dataset_name=str(r["dataset"]),
            dataset_split=str(r["split"]),
            metric_type=str(r["metric"]),
            metric_name=f"{r['protocol']} {r['metric']}",
            metric_value=float(r["value"]),
        )
        for r in eval_rows
    ]
    data = ModelCardData(
        eval_results=results or None,
        library_name="timm",
        license="mit",
        pipeline_tag="image-classification" if num_classes else "image-feature-extraction",
        tags=[
            "image-feature-extraction",
            "timm",
            "self-supervised",
            "contrastive",
            "moco",
            "mochi",
        ],
        datasets=[tag] if tag else None,
        base_model=base_model,
        model_name=name,
    )
    stock = architecture in _TORCHVISION_BUILDERS and _is_stock(model, architecture)
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_id=name,
        repo_id=repo_id,
        description=f"A {architecture} backbone pretrained without labels by {pretraining}.",
        architecture=architecture,
        num_features=model.num_features,
        num_classes=num_classes,
        method=method,
        mixing=mixing,
        dataset=dataset,
        epochs=epochs,
        input_size=pretrained_cfg.get("input_size"),
        mean=list(pretrained_cfg.get("mean", ())),
        std=list(pretrained_cfg.get("std", ())),
        interpolation=pretrained_cfg.get("interpolation"),
        crop_pct=pretrained_cfg.get("crop_pct"),
        mochi_hub_version=__version__,
        timm_name=_registered_name(repo_id),
        torchvision_builder=architecture if stock else None,
        recipe_yaml=recipe_yaml,
        eval_rows=eval_rows,
        converted_from=converted_from,
        limitations=limitations,
        images=images or {},
    ).content


_TORCHVISION_BUILDERS = ("resnet18", "resnet50")
_RESERVED = ("model.safetensors", "config.json", "README.md")
EXPORT_FILES = (*_RESERVED, "training_config.yaml", "eval_results.json")
"""The files an export holds (besides ``*.png`` images shown in its card)."""


def _is_export_file(path: Path) -> bool:
    return (
        path.is_file()
        and not path.is_symlink()
        and (path.name in EXPORT_FILES or path.suffix == ".png")
    )


def check_out_folder(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` if an export may be written there: it does not exist, or may be replaced.

    With ``overwrite``, an existing ``out`` is replaced only if it is an empty directory or a
    previous export: a directory holding ``model.safetensors`` and ``config.json`` and nothing
    but export files (:data:`EXPORT_FILES` and ``*.png`` images).

    Args:
        out: The folder to write.
        overwrite: Whether an existing previous export may be replaced.

    Returns:
        ``out`` as a Path.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is False; or it is a file or a
            symbolic link; or it is a directory holding anything an export does not (the
            message names those entries); or its parent is a file.
    """
    out = Path(out)
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise FileExistsError(f"cannot create {out}: {parent} is a file, not a directory")
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link: give the real folder as --out")
    if not out.exists():
        return out
    if not out.is_dir():
        raise FileExistsError(
            f"{out} is an existing file, not an export folder: choose another --out (a file is "
            "never replaced, even with --overwrite)"
        )
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace")
    entries = sorted(out.iterdir())
    if not entries:
        return out
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if not _is_export_file(p)]
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise FileExistsError(
            f"{out} is not a previous export: it holds {', '.join(foreign[:10])}{more}; "
            "--overwrite only replaces an export folder or an empty one. Choose another --out "
            "or move those files away"
        )
    missing = [name for name in ("model.safetensors", "config.json") if not (out / name).is_file()]
    if missing:
        raise FileExistsError(
            f"{out} is not a previous export (no {', '.join(missing)}); --overwrite only "
            "replaces an export folder or an empty one. Choose another --out"
        )
    return out


def _registered_name(repo_id: str) -> str | None:
    """The registered ``arch.tag`` whose weights live in ``repo_id``, if there is one."""
    for name in timm.list_pretrained("*_mochi*"):
        if timm.models.get_pretrained_cfg(name).hf_hub_id == repo_id:
            return name
    return None


def _is_stock(model: torch.nn.Module, architecture: str) -> bool:
    """Whether ``model`` has exactly the parameter shapes of the stock timm ``architecture``."""
    ref = timm.create_model(architecture, num_classes=0, pretrained=False)
    mine = {k: v.shape for k, v in model.state_dict().items()}
    return mine == {k: v.shape for k, v in ref.state_dict().items()}


def write_hub_folder(
    model: torch.nn.Module,
    out: str | os.PathLike,
    *,
    architecture: str,
    metadata: dict[str, str],
    data_config: dict[str, Any],
    card: dict[str, Any],
    repo_id: str | None = None,
    training_config: str | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    images: dict[str, tuple[str | os.PathLike, str]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hub folder, atomically: all files appear together or none does.

    Args:
        model: The backbone (``num_classes=0``) whose state dict is published.
        out: The folder to create; its name is the repository name.
        architecture: The stock timm architecture named in ``config.json``.
        metadata: safetensors metadata (``format: pt`` is added).
        data_config: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``.
        card: Keyword arguments of :func:`render_card` besides the model, names and config.
        repo_id: The Hub repository the folder is meant for (used in the card's snippets).
        training_config: YAML text written as ``training_config.yaml``.
        eval_results: Rows ``{"dataset", "split", "protocol", "metric", "value"}``.
        images: ``{name in the folder: (source file, caption)}``: PNG images copied into the
            folder and shown in the card (e.g. the training curves of ``mochi-hub report``).
        overwrite: Replace ``out`` if it is a previous export or an empty folder.

    Returns:
        The folder.

    Raises:
        FileExistsError: If ``out`` exists and may not be replaced (see
            :func:`check_out_folder`); nothing is changed then.
        FileNotFoundError: If an image does not exist.
        ValueError: If an image name is not a plain ``.png`` file name, or ``repo_id`` is not
            a valid ``org/name``.
    """
    from mochi_hub.hub import check_repo_id

    out = Path(out)
    if repo_id is not None:
        check_repo_id(repo_id)
    images = dict(images or {})
    for name, (source, _) in images.items():
        if Path(name).name != name or not name.endswith(".png") or name in _RESERVED:
            raise ValueError(f"image name {name!r} must be a plain .png file name")
        if not Path(source).is_file():
            raise FileNotFoundError(f"image {source} not found")
    check_out_folder(out, overwrite)
    name = out.name
    repo_id = repo_id or f"<org>/{name}"
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    # What an export of this folder that was killed left next to it (its temporary folder, or
    # the old folder between the two renames where no atomic exchange exists). Exports of one
    # folder are not meant to run concurrently.
    esc = glob.escape(name)
    stale = [*out.parent.glob(f".{esc}.tmp-*"), *out.parent.glob(f".{esc}.old-*")]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out.parent))
    try:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", **metadata})
        save_config_for_hf(
            model,
            str(tmp / "config.json"),
            model_config={"architecture": architecture},
            data_config=data_config,
        )
        if training_config is not None:
            (tmp / "training_config.yaml").write_text(training_config)
        rows = list(eval_results or [])
        if rows:
            (tmp / "eval_results.json").write_text(json.dumps(rows, indent=2))
        for name, (source, _) in images.items():
            shutil.copyfile(source, tmp / name)
        exported = json.loads((tmp / "config.json").read_text())["pretrained_cfg"]
        text = render_card(
            model,
            name,
            repo_id,
            exported,
            architecture=architecture,
            eval_rows=rows,
            images={name: caption for name, (_, caption) in images.items()},
            **card,
        )
        (tmp / "README.md").write_text(text)
        for f in tmp.iterdir():  # durable before it becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        check_out_folder(out, overwrite)  # again: it may have changed while this one was written
        replace_dir(tmp, out)  # an existing export is replaced only once the new one is in
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_backbone(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    repo_id: str | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    training_curves: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the query backbone of a training checkpoint as a Hub-ready folder.

    Args:
        checkpoint: A checkpoint directory, or a run directory (its newest checkpoint is used).
        out: The folder to create.
        repo_id: The Hub repository the folder is meant for (used in the card's snippets).
        eval_results: Rows ``{"dataset", "split", "protocol", "metric", "value"}`` for the card.
        training_curves: A PNG of the training curves (``mochi-hub report``) shown in the card.
        overwrite: Replace ``out`` if it is a previous export or an empty folder.

    Returns:
        The folder.

    Raises:
        FileExistsError: If ``out`` exists and may not be replaced (see
            :func:`check_out_folder`).
        ValueError: If the checkpoint's weights are unreadable or do not match its recorded
            architecture, or ``repo_id`` is invalid.
    """
    from mochi_hub.hub import check_repo_id

    if repo_id is not None:
        check_repo_id(repo_id)
    ckpt = resolve_checkpoint(checkpoint)
    out = check_out_folder(out, overwrite)
    run_dir = ckpt.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    model, _ = load_checkpoint_backbone(ckpt, cfg)
    x, d = cfg.mixing, cfg.data
    mixing = (x.num_hard, x.num_synthetic, x.num_synthetic_query)
    metadata = {
        "mochi_hub_version": __version__,
        "architecture": cfg.model.arch,
        "method": cfg.model.method,
        "recipe": cfg.name,
        "epochs": str(state.get("epoch")),
        "steps": str(state.get("step")),
        "mixing": json.dumps(list(mixing) if x.enabled else None),
    }
    mixes = x.enabled and x.num_synthetic + x.num_synthetic_query > 0
    recipe_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return write_hub_folder(
        model,
        out,
        architecture=cfg.model.arch,
        metadata=metadata,
        data_config={
            "input_size": (3, d.image_size, d.image_size),
            "mean": tuple(d.mean),
            "std": tuple(d.std),
            "interpolation": "bilinear",  # MoCo's evaluation resize
            "crop_pct": d.eval_crop_pct,
        },
        card=dict(
            method="MoCo-v2" if cfg.model.method == "mocov2" else "MoCo-v3",
            mixing=dataclasses.asdict(x) if mixes else None,
            dataset=d.source,
            epochs=state.get("epoch"),
            recipe_yaml=recipe_yaml.strip(),
        ),
        repo_id=repo_id,
        training_config=recipe_yaml,
        eval_results=eval_results,
        images=(
            {"training_curves.png": (training_curves, "Training curves (mochi-hub report)")}
            if training_curves is not None
            else None
        ),
        overwrite=overwrite,
    )
