"""The ``anopilad`` command line: one subcommand per module in ``napari_anopilad.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Each module defines ``add_parser(subparsers)`` and ``run(args) -> int``.
# Modules are imported lazily so that ``anopilad info`` does not pay for importing torch.
COMMANDS: dict[str, str] = {
    "info": "napari_anopilad.commands.info",
    "prompt": "napari_anopilad.commands.prompt",
    "make-demo-bundle": "napari_anopilad.commands.demo_bundle",
    "analyze": "napari_anopilad.commands.analyze",
    "analyze-cohort": "napari_anopilad.commands.analyze_cohort",
    "demo": "napari_anopilad.commands.demo",
}


class CommandError(Exception):
    """An error that the command line prints as one line, with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anopilad",
        description="Find lymph node metastases in whole-slide images with AnoPILaD.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except (CommandError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as error:
        if args.verbose:
            raise
        print(f"anopilad {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"anopilad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
