"""The ``anopilad`` command line: one subcommand per module in ``napari_anopilad.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

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


def prepare_output_folder(folder: Path, label: str) -> Path:
    """Create ``folder`` when missing and prove it writable by creating and removing a temporary file.

    Commands call this before loading any model, so that a folder they cannot write to fails at once
    instead of after the slide is scored. ``label`` names the folder in messages (``--out``, ``--store``).

    Raises
    ------
    CommandError
        When ``folder`` is an existing file, cannot be created, or is not writable.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CommandError(
            f"{label} {folder} is a file, not a folder: give a folder path (it is created when missing)"
        )
    file_parent = next((parent for parent in folder.parents if parent.is_file()), None)
    if file_parent is not None:
        raise CommandError(
            f"{label} {folder} could not be created, because {file_parent} is a file: "
            "give a folder path that you can write to"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(
            f"{label} {folder} could not be created ({error.strerror or error}): "
            "give a folder path that you can write to"
        ) from error
    try:
        handle, probe = tempfile.mkstemp(prefix=".anopilad-write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise CommandError(
            f"{label} {folder} is not writable ({error.strerror or error}): give a folder that you can write to"
        ) from error
    return folder


class OutputFolders:
    """Output folders that a command creates, removed again when the command fails while they are empty.

    Use it as a context manager around the checks and the work: when an exception leaves the block, each
    folder (or missing parent) that :meth:`prepare` created and that is still empty is removed, so a
    failed check leaves nothing behind. Folders that existed before, and folders that hold files, stay.
    """

    def __init__(self) -> None:
        self._created: list[Path] = []

    def prepare(self, folder: Path, label: str) -> Path:
        """Run :func:`prepare_output_folder` and remember the folders that it created."""
        folder = Path(folder)
        missing = [path for path in (folder, *folder.parents) if not path.exists()]
        try:
            return prepare_output_folder(folder, label)
        finally:
            self._created.extend(path for path in missing if path.is_dir())

    def remove_empty(self) -> None:
        """Remove the created folders that are empty, deepest first, so that emptied parents go too."""
        for path in sorted(set(self._created), key=lambda path: len(path.absolute().parts), reverse=True):
            try:
                path.rmdir()
            except OSError:
                # The folder contains files that the run wrote, or is already gone, so it stays.
                continue
        self._created.clear()

    def __enter__(self) -> OutputFolders:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.remove_empty()


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
    except (CommandError, ValueError, OSError) as error:
        # OSError covers the file system errors that no check before the work foresaw, such as a full
        # disk; its message names the file.
        if args.verbose:
            raise
        print(f"anopilad {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"anopilad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
