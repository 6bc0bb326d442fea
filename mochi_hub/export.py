"""Export a trained backbone as a Hugging Face Hub folder that timm loads as it is.

The folder holds ``model.safetensors`` (the query backbone only: no momentum encoder, heads or
queue; safetensors metadata ``format: pt`` plus provenance), timm's ``config.json`` naming the
stock architecture (so ``timm.create_model("hf-hub:<org>/<name>", pretrained=True)`` works without
mochi_hub), the resolved training configuration and a model card rendered from a Jinja template.
It is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

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
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf

from mochi_hub import __version__
from mochi_hub.config import Config, config_to_dict, load_config

__all__ = ["export_backbone", "resolve_checkpoint"]

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


def _backbone_state(ckpt: Path, cfg: Config) -> tuple[torch.nn.Module, dict]:
    state = load_file(str(ckpt / "model.safetensors"))
    sd = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not sd:
        raise ValueError(f"{ckpt} holds no 'backbone.*' weights: not a mochi_hub checkpoint")
    model = timm.create_model(cfg.model.arch, num_classes=0, **dict(cfg.model.backbone_kwargs))
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(
            f"the checkpoint's backbone does not match architecture '{cfg.model.arch}' "
            f"{dict(cfg.model.backbone_kwargs)}: {e}"
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the checkpoint's backbone does not match architecture '{cfg.model.arch}' "
            f"{dict(cfg.model.backbone_kwargs)}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval(), {k: v.contiguous() for k, v in model.state_dict().items()}


def _card(
    cfg: Config, model, name: str, repo_id: str, state: dict, eval_rows: list, pcfg: dict
) -> str:
    d, m, x = cfg.data, cfg.model, cfg.mixing
    dataset = _DATASET_TAGS.get(d.source, d.source if "/" in d.source else None)
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
        pipeline_tag="image-feature-extraction",
        tags=[
            "image-feature-extraction",
            "timm",
            "self-supervised",
            "contrastive",
            "moco",
            "mochi",
        ],
        datasets=[dataset] if dataset else None,
        model_name=name,
    )
    mixing = x if x.enabled and x.num_synthetic + x.num_synthetic_query > 0 else None
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_id=name,
        repo_id=repo_id,
        description=None,
        architecture=m.arch,
        num_features=model.num_features,
        num_classes=0,
        method="MoCo-v2" if m.method == "mocov2" else "MoCo-v3",
        mixing=mixing,
        dataset=d.source,
        epochs=state.get("epoch"),
        input_size=(3, d.image_size, d.image_size),
        mean=list(d.mean),
        std=list(d.std),
        interpolation=pcfg.get("interpolation"),
        crop_pct=pcfg.get("crop_pct"),
        mochi_hub_version=__version__,
        timm_name=f"{m.arch}_mochi" if timm.is_model(f"{m.arch}_mochi") else m.arch,
        recipe_yaml=yaml.safe_dump(config_to_dict(cfg), sort_keys=False).strip(),
        eval_rows=eval_rows,
    ).content


def export_backbone(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    repo_id: str | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the query backbone of a training checkpoint as a Hub-ready folder.

    Args:
        checkpoint: A checkpoint directory, or a run directory (its newest checkpoint is used).
        out: The folder to create.
        repo_id: The Hub repository the folder is meant for (used in the card's snippets).
        eval_results: Rows ``{"dataset", "split", "protocol", "metric", "value"}`` for the card.
        overwrite: Replace ``out`` if it already exists.

    Returns:
        The folder.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is False.
        ValueError: If the checkpoint does not match its recorded architecture.
    """
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace")
    run_dir = ckpt.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    model, sd = _backbone_state(ckpt, cfg)
    name = out.name
    repo_id = repo_id or f"<org>/{name}"
    mixing = (cfg.mixing.num_hard, cfg.mixing.num_synthetic, cfg.mixing.num_synthetic_query)
    metadata = {
        "format": "pt",
        "mochi_hub_version": __version__,
        "architecture": cfg.model.arch,
        "method": cfg.model.method,
        "recipe": cfg.name,
        "epochs": str(state.get("epoch")),
        "steps": str(state.get("step")),
        "mixing": json.dumps(list(mixing) if cfg.mixing.enabled else None),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out.parent))
    try:
        save_file(sd, str(tmp / "model.safetensors"), metadata=metadata)
        d = cfg.data
        save_config_for_hf(
            model,
            str(tmp / "config.json"),
            model_config={"architecture": cfg.model.arch},
            data_config={
                "input_size": (3, d.image_size, d.image_size),
                "mean": tuple(d.mean),
                "std": tuple(d.std),
                "interpolation": "bilinear",  # MoCo's evaluation resize
                "crop_pct": d.eval_crop_pct,
            },
        )
        (tmp / "training_config.yaml").write_text(
            yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        )
        rows = list(eval_results or [])
        if rows:
            (tmp / "eval_results.json").write_text(json.dumps(rows, indent=2))
        exported = json.loads((tmp / "config.json").read_text())["pretrained_cfg"]
        card = _card(cfg, model, name, repo_id, state, rows, exported)
        (tmp / "README.md").write_text(card)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
