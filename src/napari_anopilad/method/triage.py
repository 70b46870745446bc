"""Triage: fast anomaly scores from CONCH image embeddings alone, and the order they give to the diffusion.

A patch's CONCH embedding costs a small fraction of an AnoPILaD reconstruction, and it is itself an anomaly
signal. Two triage scores per patch, each calibrated to z-scores on normal validation patches:

- ``knn_distance``: mean cosine distance ``1 - cos`` from the patch's embedding to its ``k`` nearest members
  of the normal memory bank (:mod:`napari_anopilad.method.triage_bank`).
- ``keyword_distance``: Mahalanobis distance of the patch's keyword-similarity vector from the normal
  centroid under a Ledoit-Wolf covariance (:mod:`napari_anopilad.method.triage_stats`).

The reference that both need lives in the bundle (:mod:`napari_anopilad.method.triage_store`).
:func:`order_cells_by_triage` turns triage z-scores into the order and budget of patches for AnoPILaD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from napari_anopilad.method.prompts import cached_keyword_embeddings, keyword_similarities
from napari_anopilad.method.triage_bank import knn_cosine_distances
from napari_anopilad.method.triage_store import (
    CALIBRATED_K,
    DEFAULT_BANK_SIZE,
    DEFAULT_K,
    TriageReference,
    TriageReferenceError,
    build_triage_reference,
    check_triage_reference,
    load_triage_reference,
    read_triage_reference,
    save_triage_reference,
)

if TYPE_CHECKING:
    from napari_anopilad.method.bundle import Bundle

__all__ = [
    "CALIBRATED_K",
    "DEFAULT_BANK_SIZE",
    "DEFAULT_K",
    "TRIAGE_SCORES",
    "TriageReference",
    "TriageReferenceError",
    "TriageScorer",
    "TriageScores",
    "build_triage_reference",
    "check_triage_reference",
    "load_triage_reference",
    "order_cells_by_triage",
    "read_triage_reference",
    "save_triage_reference",
    "triage_order",
]

TRIAGE_SCORES = ("knn_distance", "keyword_distance")
DEFAULT_BATCH_SIZE = 64


@dataclass
class TriageScores:
    """Triage scores of a batch of patches, one entry per patch in input order.

    Attributes
    ----------
    knn_distance, keyword_distance
        ``(n,)`` float64 raw distances.
    knn_z, keyword_z
        ``(n,)`` float64 z-scores against the reference's normal validation statistics.
    keyword_similarities
        ``(n, n_keywords)`` float64 raw cosine similarities to the keyword bank, the same values from which
        AnoPILaD picks its prompt keywords.
    k
        Number of neighbours of ``knn_distance``.
    demo
        Computed with a demo bundle or demo reference: the values mean nothing.
    """

    knn_distance: NDArray[np.float64]
    keyword_distance: NDArray[np.float64]
    knn_z: NDArray[np.float64]
    keyword_z: NDArray[np.float64]
    keyword_similarities: NDArray[np.float64]
    k: int
    demo: bool

    def __len__(self) -> int:
        return len(self.knn_distance)

    def values(self, score: str) -> NDArray[np.float64]:
        """Return the raw distances of ``score`` (``"knn_distance"`` or ``"keyword_distance"``)."""
        _check_score(score)
        return np.asarray(getattr(self, score))

    def z(self, score: str) -> NDArray[np.float64]:
        """Return the z-scores of ``score`` (``"knn_distance"`` or ``"keyword_distance"``)."""
        _check_score(score)
        return self.knn_z if score == "knn_distance" else self.keyword_z


class TriageScorer:
    """Scores patches by the distance of their CONCH embeddings from the bundle's normal reference.

    Parameters
    ----------
    bundle
        A loaded bundle with a triage reference in ``triage/``.
    device
        Torch device for CONCH and the kNN search.
    k
        Neighbours of the kNN distance; the reference's default when None. Must be one that the reference
        was calibrated for (see ``reference.knn_calibration``).
    batch_size
        Patches per CONCH forward pass.
    reference
        A reference to use instead of reading the bundle's; it is checked against the bundle all the same.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        k: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        reference: TriageReference | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} is invalid: use 1 or more")
        self.bundle = bundle
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.reference = reference if reference is not None else load_triage_reference(bundle)
        if reference is not None:
            check_triage_reference(reference, bundle)
        self.k = self.reference.k if k is None else k
        self.knn_statistics = self.reference.knn_statistics(self.k)

        self.conch = bundle.load_conch(str(self.device))
        self.keyword_embeddings = cached_keyword_embeddings(bundle, self.conch, self.device)
        if self.keyword_embeddings.shape[1] != self.reference.embed_dim:
            raise TriageReferenceError(
                f"triage reference: its memory bank is {self.reference.embed_dim} wide but the bundle's CONCH "
                f"embeds in {self.keyword_embeddings.shape[1]} dimensions; rebuild the reference with this bundle"
            )
        self.memory_bank = self.reference.memory_bank.to(self.device)

    @property
    def demo(self) -> bool:
        """Whether the bundle or the reference is a demo, so that the scores mean nothing."""
        return bool(self.bundle.demo or self.reference.demo)

    def score(self, images_uint8: np.ndarray) -> TriageScores:
        """Embed the patches with CONCH in batches and return their triage distances and z-scores.

        Parameters
        ----------
        images_uint8
            ``(n, height, width, 3)`` RGB patches, normally 256 px from the patch grid. CONCH's preprocessing
            resizes them to its input size, so other square sizes work too.
        """
        # Imported here because the conch package takes seconds to import and the rest of this module does not need it.
        from napari_anopilad.method.conch_model import encode_images

        images = _check_images(images_uint8)
        blocks = [
            encode_images(self.conch, images[start : start + self.batch_size], self.device)
            for start in range(0, len(images), self.batch_size)
        ]
        width = self.reference.embed_dim
        embeddings = torch.cat(blocks) if blocks else torch.zeros((0, width), dtype=torch.float32)
        return self.score_embeddings(embeddings)

    def score_embeddings(self, embeddings: torch.Tensor) -> TriageScores:
        """Return triage distances and z-scores of L2-normalised CONCH image embeddings ``(n, embed_dim)``.

        For callers that already have the embeddings (AnoPILaD computes them for its keyword prompts).
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.reference.embed_dim:
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)}: expected (n, {self.reference.embed_dim})"
            )
        similarities = keyword_similarities(embeddings.cpu(), self.keyword_embeddings.cpu()).numpy()
        if len(embeddings):
            queries = embeddings.to(self.device, torch.float32)
            knn = torch.as_tensor(self._knn(queries)).double().cpu().numpy()
        else:
            knn = np.zeros(0, dtype=np.float64)
        keyword = self.reference.keyword_distances(similarities)
        return TriageScores(
            knn_distance=knn,
            keyword_distance=keyword,
            knn_z=self.knn_statistics.zscores(knn),
            keyword_z=self.reference.keyword_calibration.zscores(keyword),
            keyword_similarities=similarities,
            k=self.k,
            demo=self.demo,
        )

    def _knn(self, queries: torch.Tensor) -> torch.Tensor:
        return knn_cosine_distances(queries, self.memory_bank, self.k)


def triage_order(
    cells: ArrayLike, z: ArrayLike, budget_fraction: float = 0.1, include_neighbours: bool = True
) -> NDArray[np.int64]:
    """Return the indices into ``cells`` of the diffusion budget, highest triage z-score first.

    The budget is the ``ceil(budget_fraction * n)`` cells with the highest z-scores, plus, with
    ``include_neighbours``, every cell of ``cells`` among their 8 neighbours on the patch grid. All budget
    cells are ordered by their own z-score, highest first, and equal z-scores keep row-major grid order. Cells
    with a NaN z-score (not scored) come last and are never in the top fraction.

    Parameters
    ----------
    cells
        ``(n, 2)`` integer ``(row, col)`` patch grid indices, each at most once (the tissue cells).
    z
        ``(n,)`` triage z-scores of those cells.
    budget_fraction
        Fraction of the cells in the top set, in [0, 1].
    include_neighbours
        Add the 8-neighbours of the top cells that are among ``cells``.
    """
    grid_cells = _check_cells(cells)
    values = np.asarray(z, dtype=np.float64)
    if values.shape != (len(grid_cells),):
        raise ValueError(
            f"got {values.shape} z-scores for {len(grid_cells)} cells: give one z-score per cell"
        )
    if not (math.isfinite(budget_fraction) and 0.0 <= budget_fraction <= 1.0):
        raise ValueError(f"budget fraction {budget_fraction!r} is invalid: use a number from 0 to 1")

    order = _descending_order(grid_cells, values)
    scored = int(np.count_nonzero(np.isfinite(values)))
    # Rounded before the ceiling so that, e.g., 0.3 of 10 cells is 3 and not 4 (0.3 * 10 = 3.0000000000000004).
    top_count = min(math.ceil(round(budget_fraction * len(grid_cells), 9)), scored)
    in_budget = np.zeros(len(grid_cells), dtype=bool)
    in_budget[order[:top_count]] = True

    if include_neighbours and top_count:
        index_of = {(int(row), int(col)): index for index, (row, col) in enumerate(grid_cells)}
        for row, col in grid_cells[order[:top_count]]:
            for row_step in (-1, 0, 1):
                for col_step in (-1, 0, 1):
                    neighbour = index_of.get((int(row) + row_step, int(col) + col_step))
                    if neighbour is not None:
                        in_budget[neighbour] = True

    return order[in_budget[order]]


def order_cells_by_triage(
    cells: ArrayLike, z: ArrayLike, budget_fraction: float = 0.1, include_neighbours: bool = True
) -> NDArray[np.int64]:
    """Return the ``(m, 2)`` ``(row, col)`` cells of the diffusion budget, highest triage z-score first.

    See :func:`triage_order` for the budget and the order.
    """
    grid_cells = _check_cells(cells)
    return grid_cells[triage_order(grid_cells, z, budget_fraction, include_neighbours)]


def _descending_order(grid_cells: NDArray[np.int64], values: NDArray[np.float64]) -> NDArray[np.int64]:
    # np.lexsort sorts by the last key first: NaN last, then z descending, then row, then col.
    missing = ~np.isfinite(values)
    keys = (grid_cells[:, 1], grid_cells[:, 0], -np.where(missing, 0.0, values), missing)
    return np.lexsort(keys).astype(np.int64)


def _check_cells(cells: ArrayLike) -> NDArray[np.int64]:
    array = np.asarray(cells)
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if array.ndim != 2 or array.shape[1] != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"cells have shape {array.shape} and dtype {array.dtype}: expected integer (n, 2) (row, col)"
        )
    grid_cells = array.astype(np.int64)
    if len(np.unique(grid_cells, axis=0)) != len(grid_cells):
        raise ValueError("cells contain a (row, col) more than once: give each patch grid cell once")
    return grid_cells


def _check_score(score: str) -> None:
    if score not in TRIAGE_SCORES:
        raise ValueError(f"triage score {score!r} is invalid: use one of {', '.join(TRIAGE_SCORES)}")


def _check_images(images_uint8: np.ndarray) -> np.ndarray:
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"patches have shape {images.shape} and dtype {images.dtype}: use uint8 RGB of shape (n, 256, 256, 3)"
        )
    return np.ascontiguousarray(images)
