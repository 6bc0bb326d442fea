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
        args.checkpoint, args.out, repo_id=args.repo_id, eval_results=rows, overwrite=args.overwrite
    )
    print(f"exported {out}")
    return 0


# Commands whose bad input (a missing file, a bad id, a refused overwrite) is reported in one line.
_USER_ERRORS_OF = {"export", "push", "convert"}


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
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=_export)
    return parser


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
