"""Command line: ``mochi-hub <command>`` or ``python -m mochi_hub <command>``.

Works under ``accelerate launch -m mochi_hub pretrain ...`` for several processes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mochi_hub import __version__

__all__ = ["main"]


def _pretrain(args: argparse.Namespace) -> int:
    from mochi_hub.config import load_config
    from mochi_hub.engine import pretrain

    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        import yaml

        from mochi_hub.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    pretrain(cfg)
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from mochi_hub.export import export_backbone

    rows = json.loads(open(args.eval_results).read()) if args.eval_results else None
    out = export_backbone(
        args.checkpoint,
        args.out,
        repo_id=args.repo_id,
        eval_results=rows,
        training_curves=args.training_curves,
        overwrite=args.overwrite,
    )
    print(f"exported {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mochi_hub.report import render_report

    for path in render_report(args.runs, args.out, labels=args.labels):
        print(f"wrote {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from mochi_hub.convert import convert_checkpoint

    mixing = args.mixing
    if args.mixing_start_epoch is not None:
        if not mixing:
            raise ValueError("--mixing-start-epoch needs --mixing N S SQ")
        mixing = [*mixing, args.mixing_start_epoch]
    report = convert_checkpoint(
        args.file,
        args.out,
        arch=args.arch,
        to=args.to,
        keep_classifier=args.keep_classifier,
        repo_id=args.repo_id,
        mixing=mixing,
        base_model=args.base_model,
        overwrite=args.overwrite,
    )
    print(report.summary())
    return 0


def _push(args: argparse.Namespace) -> int:
    from mochi_hub.hub import HUB_ERRORS, push_folder

    try:
        result = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            dry_run=args.dry_run,
            commit_message=args.commit_message,
        )
    except HUB_ERRORS as e:  # the token is already redacted from the message
        reason = " ".join(str(e).split())
        print(f"mochi-hub push: {reason} (nothing was committed)", file=sys.stderr)
        return 1
    if result.dry_run:
        for f in result.files:
            print(f"{f.size:>12}  {f.path}")
        print(f"{result.total_bytes:>12}  total, {len(result.files)} files (dry run: not uploaded)")
        return 0
    print(result.commit_url)
    if result.pr_url:
        print(f"pull request: {result.pr_url}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from accelerate import PartialState

    from mochi_hub.evaluate import PROBE_L2_GRID, default_output_dir, evaluate, format_results
    from mochi_hub.linear import linear_settings

    linear = None
    if args.protocol == "linear":
        linear = linear_settings(
            args.preset,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            milestones=args.milestones,
            crop_scale=args.crop_scale,
        )
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.spec)
    out = Path(args.out) if args.out else output_dir / f"eval_{args.protocol}.json"
    rows = evaluate(
        args.spec,
        args.data,
        protocol=args.protocol,
        train_split=args.train_split,
        val_split=args.val_split,
        image_column=args.image_column,
        label_column=args.label_column,
        output_dir=output_dir,
        out=out,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        knn_k=args.knn_k,
        knn_t=args.knn_t,
        probe_l2=args.probe_l2 or PROBE_L2_GRID,
        linear=linear,
        resume=None if args.resume == "none" else args.resume,
        max_steps=args.max_steps,
        max_train_images=args.max_train_images,
        seed=args.seed,
        batch_size=args.eval_batch_size,
        workers=args.workers,
    )
    if PartialState().is_main_process:
        print(format_results(rows))
        print(f"results: {out}")
    return 0


# Commands whose bad input (a missing file, a bad id, a refused overwrite) is reported in one line.
_USER_ERRORS_OF = {"export", "push", "convert", "eval", "report"}


_OVERWRITE_HELP = "replace --out if it is a previous export or an empty folder (never other data)"


def build_parser() -> argparse.ArgumentParser:
    """The ``mochi-hub`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mochi-hub",
        description="MoCHi hard negative mixing for MoCo: pretrain and evaluate backbones.",
    )
    parser.add_argument("--version", action="version", version=f"mochi_hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="pretrain a backbone with MoCo-v2/v3 (+ MoCHi) from a recipe",
        description=(
            "Pretrain a backbone. RECIPE is a YAML file (recipes/quickstart.yaml) or the name of a "
            "shipped recipe (quickstart); key=value arguments override it, e.g. "
            "mixing.num_hard=128 train.epochs=10."
        ),
    )
    p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_pretrain)

    e = sub.add_parser(
        "export",
        help="write a checkpoint's backbone as a Hub-ready folder (safetensors, config, card)",
    )
    e.add_argument("checkpoint", help="checkpoint directory, or a run directory (newest one)")
    e.add_argument("--out", required=True, help="folder to create, named like the Hub repo")
    e.add_argument("--repo-id", help="Hub repository the folder is for (used in the card)")
    e.add_argument("--eval-results", help="JSON list of {dataset, split, protocol, metric, value}")
    e.add_argument("--training-curves", help="PNG shown in the card (from mochi-hub report)")
    e.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    e.set_defaults(func=_export)

    r = sub.add_parser(
        "report",
        help="plot a run's training analysis (loss, proxy accuracy, hardness profile, ...)",
        description=(
            "Render PNG plots from the logs of one or several run directories (several are drawn "
            "on the same axes, e.g. MoCo-v2 against MoCHi). Needs matplotlib (mochi_hub[plots])."
        ),
    )
    r.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    r.add_argument("--out", help="output folder (default: <first run>/report)")
    r.add_argument("--labels", nargs="+", help="legend names of the runs")
    r.set_defaults(func=_report)

    c = sub.add_parser(
        "convert",
        help="convert a released MoCo/MoCHi/MoCo-v3 checkpoint into a Hub folder or detectron2",
        description=(
            "Convert a MoCo v1/v2, MoCHi or MoCo-v3 checkpoint (.pth.tar, a bare state dict or "
            ".safetensors; read with weights_only=True, never executing pickled code). The query "
            "encoder is kept and loaded strictly into the timm architecture; heads, momentum "
            "encoder, predictor and queue are dropped and reported."
        ),
    )
    c.add_argument("file", help="checkpoint file (.pth.tar, .pth, .safetensors)")
    c.add_argument("--out", required=True, help="Hub folder to create (.pkl for detectron2)")
    c.add_argument("--arch", help="timm architecture (default: the checkpoint's, else inferred)")
    c.add_argument("--to", choices=("timm", "detectron2"), default="timm", help="output format")
    c.add_argument(
        "--keep-classifier",
        action="store_true",
        help="keep the 1000-class fc of a linear-classification checkpoint",
    )
    c.add_argument(
        "--mixing",
        nargs=3,
        type=int,
        metavar=("N", "S", "SQ"),
        help="MoCHi's (N, s, s') if the checkpoint was trained with hard negative mixing",
    )
    c.add_argument(
        "--mixing-start-epoch", type=int, metavar="E", help="epoch MoCHi mixing started at"
    )
    c.add_argument("--repo-id", help="Hub repository the folder is for (used in the card)")
    c.add_argument("--base-model", help="Hub id the weights derive from (card metadata)")
    c.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    c.set_defaults(func=_convert)

    u = sub.add_parser(
        "push",
        help="upload an exported folder to a Hugging Face Hub model repo in one commit",
        description=(
            "Upload a folder written by `mochi-hub export` (safetensors only) to the Hub in a "
            "single commit. Log in first with `hf auth login` or set HF_TOKEN."
        ),
    )
    u.add_argument("folder", help="folder written by `mochi-hub export`")
    u.add_argument("--repo-id", required=True, help="Hub model repository, org/name")
    u.add_argument("--private", action="store_true", help="create the repository private")
    u.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    u.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    u.add_argument("--dry-run", action="store_true", help="list the files and sizes; upload none")
    u.add_argument("--commit-message", help="commit title")
    u.set_defaults(func=_push)
    _add_eval_parser(sub)
    return parser


# mochi_hub.evaluate.PROTOCOLS and mochi_hub.linear.LINEAR_PRESETS, without importing them here
_EVAL_PROTOCOLS = ("knn", "linear", "probe")
_LINEAR_PRESETS = ("in1k", "in100", "mocov3_vit")


def _add_eval_parser(sub) -> None:
    v = sub.add_parser(
        "eval",
        help="evaluate a backbone: weighted kNN, logistic-regression probe or linear protocol",
        description=(
            "Evaluate a frozen backbone on a labelled data set. SPEC is a training checkpoint or "
            "run directory, an exported folder, or a timm name (resnet18_mochi.cifar10, "
            "hf-hub:org/name; an untagged name such as resnet50 is randomly initialised). "
            "Features of knn/probe are cached; the linear protocol is resumable. Several "
            "processes: accelerate launch -m mochi_hub eval ..."
        ),
    )
    v.add_argument("spec", metavar="SPEC", help="checkpoint / run / export directory or timm name")
    v.add_argument("--data", required=True, help="digits, an image folder, Parquet or a Hub id")
    v.add_argument("--protocol", choices=_EVAL_PROTOCOLS, default="knn", help="default: knn")
    v.add_argument("--train-split", default="train", help="default: train")
    v.add_argument("--val-split", help="default: test for digits, else validation, val or test")
    v.add_argument("--image-column", help="image column (detected by default)")
    v.add_argument("--label-column", default="label", help="default: label")
    v.add_argument("--output-dir", help="default: the run directory, else runs/eval/<name>")
    v.add_argument("--out", help="results JSON (default: <output dir>/eval_<protocol>.json)")
    v.add_argument("--cache-dir", help="feature cache (default: <output dir>/features)")
    v.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    v.add_argument("--knn-k", type=int, default=200, help="kNN neighbours (default: 200)")
    v.add_argument("--knn-t", type=float, default=0.07, help="kNN temperature (default: 0.07)")
    v.add_argument("--probe-l2", type=float, nargs="+", metavar="L2", help="probe's L2 sweep")
    v.add_argument("--preset", choices=_LINEAR_PRESETS, default="in1k", help="default: in1k")
    v.add_argument("--epochs", type=int, help="linear: epochs (milestones scale along)")
    v.add_argument("--lr", type=float, help="linear: lr (per 256 images for mocov3_vit)")
    v.add_argument("--batch-size", type=int, help="linear: global batch size")
    v.add_argument("--milestones", type=int, nargs="+", metavar="EPOCH", help="linear: lr steps")
    v.add_argument(
        "--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
        help="linear: RandomResizedCrop area range (default 0.08 1)",
    )  # fmt: skip
    v.add_argument("--resume", default="auto", help="linear: auto, none or a checkpoint")
    v.add_argument("--max-steps", type=int, help="linear: stop after this many steps")
    v.add_argument("--eval-batch-size", type=int, default=256, help="per process (default 256)")
    v.add_argument("--workers", type=int, default=4, help="loader workers per process")
    v.add_argument("--max-train-images", type=int, help="seeded subset of the training split")
    v.add_argument("--seed", type=int, default=0, help="default: 0")
    v.set_defaults(func=_eval)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mochi-hub`` console script."""
    from mochi_hub.config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mochi-hub: configuration error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, PermissionError, ValueError) as e:
        if args.command not in _USER_ERRORS_OF:
            raise
        print(f"mochi-hub {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
