"""Result store: the finished patch scores of one slide, bundle and settings, safe against kills.

Layout of one store folder (``<root>/<slide>_<bundle>_<settings>[_<grid>]/``)::

    manifest.json                  slide identity, bundle identity, settings and grid, written first
    batch-00000001-<token>.npz     one file per finished batch (rows, cols, scores, keywords, prompts)
    reconstructions/r<row>_c<col>.png

Every file is written to a temporary name in the same folder, flushed to disk and renamed over its
final name, so a reader sees a batch whole or not at all. A process killed at any moment loses only
the batch it had not finished writing. Changed settings, a changed bundle or a changed patch
grid give a different folder, so stale scores are never reused. The chosen score (``settings.score``)
is not part of the key: every batch holds all of the method's scores, so choosing another score reuses
the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_anopilad.method.baselines.base import BaselineSettings
from napari_anopilad.method.settings import InferenceSettings

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
RECONSTRUCTIONS_DIR = "reconstructions"
STORE_DIR_ENV = "NAPARI_ANOPILAD_STORE"

# Batch files keep each score under "score_<name>"; files written before named scores have
# "lpips" and "mse_latent" keys, which load as those two scores.
_SCORE_PREFIX = "score_"
_LEGACY_SCORES = ("lpips", "mse_latent")
_BATCH_PATTERN = re.compile(r"^batch-(\d{8})-([0-9a-f]+)\.npz$")
_TEMP_PREFIX = ".tmp-"
# Temporary files of another machine (a shared file system) are removed only once they are this old.
_FOREIGN_TEMP_MAX_AGE_S = 3600.0


def default_store_root() -> Path:
    """Return the user cache folder for result stores of the napari plugin.

    ``$NAPARI_ANOPILAD_STORE`` overrides it; otherwise it is the platform's user cache folder
    (``~/.cache/napari-anopilad/store`` on Linux).
    """
    override = os.environ.get(STORE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".cache" / "napari-anopilad" / "store"
    return Path(platformdirs.user_cache_dir("napari-anopilad")) / "store"


def grid_description(grid: Any) -> dict[str, Any]:
    """Describe the parts of a patch grid that decide which pixels a ``(row, col)`` cell contains.

    Two grids with the same description read the same pixels for the same cell, so their scores
    can share a store.
    """
    description: dict[str, Any] = {
        "patch_size_level0": int(grid.patch_size_level0),
        "shape": [int(size) for size in grid.shape],
    }
    for name in ("patch_size", "read_level", "patch_size_read", "target_mpp"):
        value = getattr(grid, name, None)
        if value is not None:
            description[name] = value.item() if isinstance(value, np.generic) else value
    return description


def _short_hash(value: Any, length: int = 12) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def stored_settings(settings: Any) -> dict[str, Any]:
    """Return the settings that key a store: all but the chosen score, which the stored batches do not depend on."""
    values = settings.to_dict()
    values.pop("score", None)
    return values


def _folder_part(identity: str, length: int = 16) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9]", "", identity)
    return cleaned[:length] if cleaned else _short_hash(identity)


@dataclass(frozen=True)
class StoredPatches:
    """Scores of the finished patches, one entry per ``(row, col)`` cell, in the store's order.

    Attributes
    ----------
    rows, cols : ndarray of int64, shape (n,)
        Patch grid index.
    values : dict of str to ndarray of float64, shape (n,)
        Every stored score by name: ``lpips`` and ``mse_latent`` for AnoPILaD, the method's own
        scores for a comparison method.
    keywords : ndarray of str, shape (n, k)
        The prompt's keywords, best first (``k = 0`` for unprompted runs).
    similarities, weights : ndarray of float64, shape (n, k)
        Cosine similarity and prompt weight of each keyword.
    prompts : ndarray of str, shape (n,)
        The prompt that guided the reconstruction.
    has_reconstruction : ndarray of bool, shape (n,)
        Whether the store contains the patch's reconstruction PNG.
    """

    rows: NDArray[np.int64]
    cols: NDArray[np.int64]
    values: dict[str, NDArray[np.float64]]
    keywords: NDArray[np.str_]
    similarities: NDArray[np.float64]
    weights: NDArray[np.float64]
    prompts: NDArray[np.str_]
    has_reconstruction: NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.rows.size)

    def scores(self, name: str) -> NDArray[np.float64]:
        """Return the patch scores named ``name`` (``"lpips"``, ``"mse_latent"`` or a comparison method's)."""
        if name in self.values:
            return self.values[name]
        if not len(self):
            return np.zeros(0, np.float64)
        raise ValueError(f"score {name!r} is not stored here: the stored scores are {', '.join(self.values)}")

    @property
    def score_names(self) -> list[str]:
        """Names of the stored scores."""
        return list(self.values)

    @property
    def lpips(self) -> NDArray[np.float64]:
        """AnoPILaD's LPIPS score of each patch."""
        return self.scores("lpips")

    @property
    def mse_latent(self) -> NDArray[np.float64]:
        """AnoPILaD's latent MSE score of each patch."""
        return self.scores("mse_latent")

    def cells(self) -> NDArray[np.int64]:
        """Return the ``(n, 2)`` array of ``(row, col)``."""
        return np.stack([self.rows, self.cols], axis=1)

    def select(self, cells: Iterable[tuple[int, int]] | NDArray[np.integer]) -> StoredPatches:
        """Return the stored entries of the given cells, in the store's order."""
        wanted = {(int(row), int(col)) for row, col in np.asarray(cells, dtype=np.int64).reshape(-1, 2)}
        keep = np.array([(int(r), int(c)) in wanted for r, c in zip(self.rows, self.cols)], dtype=bool)
        return StoredPatches(
            rows=self.rows[keep],
            cols=self.cols[keep],
            values={name: values[keep] for name, values in self.values.items()},
            keywords=self.keywords[keep],
            similarities=self.similarities[keep],
            weights=self.weights[keep],
            prompts=self.prompts[keep],
            has_reconstruction=self.has_reconstruction[keep],
        )

    @classmethod
    def empty(cls, top_k: int = 0) -> StoredPatches:
        return cls(
            rows=np.zeros(0, np.int64),
            cols=np.zeros(0, np.int64),
            values={},
            keywords=np.zeros((0, top_k), dtype="<U1"),
            similarities=np.zeros((0, top_k), np.float64),
            weights=np.zeros((0, top_k), np.float64),
            prompts=np.zeros(0, dtype="<U1"),
            has_reconstruction=np.zeros(0, bool),
        )


class ResultStore:
    """Append-only store of finished patch scores for one slide, bundle, settings and patch grid.

    Parameters
    ----------
    root : str or Path
        Folder of result stores. This store uses a subfolder named from the keys below.
    slide_identity : str
        ``Slide.identity``, a content hash of the slide file.
    bundle_identity : str
        ``Bundle.identity``, a hash of the weights and the bundle's settings.
    settings : InferenceSettings or BaselineSettings
        Scoring settings; a hash of all but ``score`` (:func:`stored_settings`) is part of the folder name.
    grid : dict, optional
        ``grid_description(grid)`` of the patch grid, so that a different patch size or mpp never
        shares cells. Part of the folder name when given.

    Raises
    ------
    ValueError
        If the folder exists with a manifest for other keys (a hash collision or a hand-edited folder).

    Notes
    -----
    Writes and reads are thread-safe within one process. Two processes may write to the same store:
    batch file names carry a random token, and loading merges every batch file.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        slide_identity: str,
        bundle_identity: str,
        settings: InferenceSettings | BaselineSettings,
        grid: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.slide_identity = str(slide_identity)
        self.bundle_identity = str(bundle_identity)
        self.settings = settings
        self.grid = dict(grid) if grid is not None else None
        self._lock = threading.Lock()

        key_settings = stored_settings(settings)
        name = f"{_folder_part(self.slide_identity)}_{_folder_part(self.bundle_identity)}_{_short_hash(key_settings, 16)}"
        if self.grid is not None:
            name += f"_{_short_hash(self.grid, 8)}"
        self.folder = self.root / name
        self._manifest = {
            "format_version": STORE_FORMAT_VERSION,
            "slide_identity": self.slide_identity,
            "bundle_identity": self.bundle_identity,
            "settings": key_settings,
            "grid": self.grid,
        }
        self._open_folder()

    # -- opening -------------------------------------------------------------------------------

    def _open_folder(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(
                f"cannot create the result store folder {self.folder}: {error.strerror}; "
                "choose another output or store folder"
            ) from error

        manifest_path = self.folder / MANIFEST_NAME
        if manifest_path.exists():
            self._check_manifest(manifest_path)
        else:
            self._write_atomic(manifest_path, json.dumps(self._manifest, indent=2).encode())
        self._remove_stale_temp_files()

    def _check_manifest(self, manifest_path: Path) -> None:
        try:
            existing = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"the result store manifest {manifest_path} is unreadable ({error}); "
                "delete the folder to start this analysis afresh"
            ) from error
        keys = ("slide_identity", "bundle_identity", "settings", "grid")
        if any(existing.get(key) != self._manifest[key] for key in keys):
            raise ValueError(
                f"the result store {self.folder} belongs to another slide, bundle or settings; "
                "delete the folder or use another store folder"
            )

    def _remove_stale_temp_files(self) -> None:
        """Remove temporary files left by a process that was killed while writing."""
        this_host = socket.gethostname()
        for directory in (self.folder, self.folder / RECONSTRUCTIONS_DIR):
            if not directory.is_dir():
                continue
            for path in directory.glob(f"{_TEMP_PREFIX}*"):
                if self._temp_owner_is_gone(path, this_host):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        logger.info("Removed the unfinished file %s of an interrupted run", path.name)

    @staticmethod
    def _temp_owner_is_gone(path: Path, this_host: str) -> bool:
        # Temporary names are ".tmp-<host>-<pid>-<token>-<final name>".
        parts = path.name[len(_TEMP_PREFIX) :].split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            return True
        host, pid = parts[0], int(parts[1])
        if host != _safe_host(this_host):
            try:
                return time.time() - path.stat().st_mtime > _FOREIGN_TEMP_MAX_AGE_S
            except FileNotFoundError:
                return False
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    # -- writing -------------------------------------------------------------------------------

    def _write_atomic(self, path: Path, data: bytes) -> None:
        temp_path = path.with_name(
            f"{_TEMP_PREFIX}{_safe_host(socket.gethostname())}-{os.getpid()}-{secrets.token_hex(4)}-{path.name}"
        )
        try:
            with open(temp_path, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_path, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp_path.unlink()
            raise
        _fsync_directory(path.parent)

    def _next_sequence(self) -> int:
        numbers = [int(match.group(1)) for match in map(_BATCH_PATTERN.match, self._batch_names()) if match]
        return max(numbers, default=0) + 1

    def _batch_names(self) -> list[str]:
        return [path.name for path in self.folder.glob("batch-*.npz")]

    def write_batch(
        self,
        cells: Sequence[tuple[int, int]] | NDArray[np.integer],
        lpips: Sequence[float] | NDArray[np.floating] | None = None,
        mse_latent: Sequence[float] | NDArray[np.floating] | None = None,
        keywords: Sequence[Sequence[str]] | NDArray[np.str_] | None = None,
        similarities: Sequence[Sequence[float]] | NDArray[np.floating] | None = None,
        weights: Sequence[Sequence[float]] | NDArray[np.floating] | None = None,
        prompts: Sequence[str] | NDArray[np.str_] | None = None,
        reconstructions: NDArray[np.uint8] | None = None,
        *,
        scores: Mapping[str, Sequence[float] | NDArray[np.floating]] | None = None,
    ) -> Path:
        """Write one finished batch atomically and return the batch file's path.

        Parameters
        ----------
        cells : array_like, shape (n, 2)
            ``(row, col)`` of each patch.
        lpips, mse_latent : array_like, shape (n,), optional
            AnoPILaD's patch discrepancies (the same as passing them in ``scores``).
        keywords : array_like of str, shape (n, k), optional
            Keywords of each prompt, best first; none (``k = 0``) by default.
        similarities, weights : array_like, shape (n, k), optional
            Cosine similarity and prompt weight of each keyword.
        prompts : array_like of str, shape (n,), optional
            Prompt strings; empty by default.
        reconstructions : ndarray of uint8, shape (n, height, width, 3), optional
            Reconstructed patches, saved as PNG files before the batch file so that a stored batch
            always finds its reconstructions.
        scores : mapping of str to array_like, shape (n,), optional
            Every score by name; each batch of one store must hold the same names.
        """
        cell_array = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
        n = cell_array.shape[0]
        named = dict(scores or {})
        if lpips is not None:
            named["lpips"] = lpips
        if mse_latent is not None:
            named["mse_latent"] = mse_latent
        if not named:
            raise ValueError("write_batch needs at least one score")
        for name in named:
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"score name {name!r} is invalid: use letters, digits and underscores")
        if keywords is None:
            keywords = np.zeros((n, 0), dtype="<U1")
            similarities = np.zeros((n, 0))
            weights = np.zeros((n, 0))
        if prompts is None:
            prompts = np.full(n, "", dtype="<U1")
        arrays: dict[str, NDArray[Any]] = {
            "rows": cell_array[:, 0],
            "cols": cell_array[:, 1],
            **{
                _SCORE_PREFIX + name: np.asarray(values, dtype=np.float64).reshape(n)
                for name, values in named.items()
            },
            "keywords": np.asarray(keywords, dtype=np.str_).reshape(n, -1) if n else np.zeros((0, 0), "<U1"),
            "similarities": np.asarray(similarities, dtype=np.float64).reshape(n, -1)
            if n
            else np.zeros((0, 0)),
            "weights": np.asarray(weights, dtype=np.float64).reshape(n, -1) if n else np.zeros((0, 0)),
            "prompts": np.asarray(prompts, dtype=np.str_).reshape(n),
            "has_reconstruction": np.full(n, reconstructions is not None, dtype=bool),
        }
        if reconstructions is not None:
            images = np.asarray(reconstructions)
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[3] != 3:
                raise ValueError(
                    f"reconstructions must be uint8 of shape ({n}, height, width, 3), "
                    f"got {images.dtype} {images.shape}"
                )
            self._write_reconstructions(cell_array, images)

        buffer = _npz_bytes(arrays)
        with self._lock:
            sequence = self._next_sequence()
            path = self.folder / f"batch-{sequence:08d}-{secrets.token_hex(4)}.npz"
            self._write_atomic(path, buffer)
        return path

    def _write_reconstructions(self, cells: NDArray[np.int64], images: NDArray[np.uint8]) -> None:
        from PIL import Image

        directory = self.folder / RECONSTRUCTIONS_DIR
        directory.mkdir(exist_ok=True)
        for (row, col), image in zip(cells, images):
            encoded = _png_bytes(Image.fromarray(image))
            self._write_atomic(self.reconstruction_path(int(row), int(col)), encoded)

    # -- reading -------------------------------------------------------------------------------

    def reconstruction_path(self, row: int, col: int) -> Path:
        """Return where the reconstruction PNG of cell ``(row, col)`` is (or would be) stored."""
        return self.folder / RECONSTRUCTIONS_DIR / f"r{row}_c{col}.png"

    def read_reconstruction(self, row: int, col: int) -> NDArray[np.uint8] | None:
        """Return the stored reconstruction of cell ``(row, col)`` as uint8 RGB, or None if there is none."""
        from PIL import Image

        path = self.reconstruction_path(row, col)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except FileNotFoundError:
            return None

    def load(self) -> StoredPatches:
        """Merge every batch file into one entry per cell; a later batch replaces an earlier one.

        A batch file that cannot be read (a damaged disk, a file truncated outside this program) is
        skipped with a warning, so its patches count as not done and are analysed again.
        """
        with self._lock:
            names = sorted(self._batch_names(), key=_batch_sort_key)
        batches = []
        loaded_names = []
        for name in names:
            path = self.folder / name
            try:
                with np.load(path, allow_pickle=False) as data:
                    batches.append({key: data[key] for key in data.files})
                    loaded_names.append(name)
            except (OSError, ValueError, KeyError, EOFError) as error:
                logger.warning("Skipped the unreadable result batch %s: %s", path, error)
        if not batches:
            unprompted = getattr(self.settings, "unprompted", True)
            return StoredPatches.empty(0 if unprompted else int(getattr(self.settings, "top_k", 0)))

        for batch in batches:
            for name in _LEGACY_SCORES:
                if name in batch:
                    batch[_SCORE_PREFIX + name] = batch.pop(name)
        keys = set(batches[0])
        for name, batch in zip(loaded_names, batches):
            if set(batch) != keys:
                raise ValueError(
                    f"the result batch {self.folder / name} holds other scores than the store's first batch; "
                    "delete the store folder to analyse this slide afresh"
                )
        merged = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
        rows = merged["rows"].astype(np.int64)
        cols = merged["cols"].astype(np.int64)
        # Keep the last entry of each cell: unique over the reversed order finds last occurrences.
        flat = rows * (int(cols.max()) + 1 if cols.size else 1) + cols
        _, first_in_reversed = np.unique(flat[::-1], return_index=True)
        keep = np.sort(flat.size - 1 - first_in_reversed)
        return StoredPatches(
            rows=rows[keep],
            cols=cols[keep],
            values={
                key[len(_SCORE_PREFIX) :]: merged[key][keep].astype(np.float64)
                for key in sorted(merged)
                if key.startswith(_SCORE_PREFIX)
            },
            keywords=merged["keywords"][keep],
            similarities=merged["similarities"][keep].astype(np.float64),
            weights=merged["weights"][keep].astype(np.float64),
            prompts=merged["prompts"][keep],
            has_reconstruction=merged["has_reconstruction"][keep].astype(bool),
        )

    def done_cells(self, need_reconstructions: bool = False) -> set[tuple[int, int]]:
        """Return the cells with stored scores (and a stored reconstruction if ``need_reconstructions``)."""
        stored = self.load()
        keep = stored.has_reconstruction if need_reconstructions else np.ones(len(stored), dtype=bool)
        return {(int(row), int(col)) for row, col in zip(stored.rows[keep], stored.cols[keep])}

    def __repr__(self) -> str:
        return f"ResultStore({str(self.folder)!r})"


def _batch_sort_key(name: str) -> tuple[int, str]:
    match = _BATCH_PATTERN.match(name)
    return (int(match.group(1)), name) if match else (0, name)


def _safe_host(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", host)[:32] or "host"


def _npz_bytes(arrays: dict[str, NDArray[Any]]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _png_bytes(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fsync_directory(directory: Path) -> None:
    """Flush a rename to disk; directories cannot be opened for fsync on Windows, where this is a no-op."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
