"""The memory bank of normal CONCH image embeddings and the cosine kNN distance to it.

All embeddings here are L2-normalised, so the cosine similarity is a dot product and the cosine distance
``1 - cos`` is half the squared Euclidean distance. The bank is reduced to a bounded size by one of:

- ``"coreset"`` (default): greedy k-center selection (Gonzalez 1985). Each step adds the embedding farthest
  from the bank so far. Every normal embedding then lies within the covering radius of a bank member. The
  cosine distance is not a metric, but it is a monotone function of the chordal (Euclidean) distance
  ``sqrt(2 (1 - cos))``, so the selection is the same as under that metric. The chordal covering radius is
  therefore at most twice the smallest possible for a bank of that size, and the cosine one at most four times.
- ``"kmeans"``: spherical k-means (cosine assignment, centres re-normalised), seeded with k-means++.

Both are deterministic for a given seed on a given device type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BANK_METHODS = ("coreset", "kmeans")
# Queries per block of the kNN search, which bounds the (queries x bank) distance matrix in memory.
DISTANCE_CHUNK = 4096


@dataclass(frozen=True)
class MemoryBank:
    """A reduced set of normal embeddings.

    Attributes
    ----------
    embeddings
        ``(size, embed_dim)`` float32, L2-normalised.
    method
        ``"coreset"``, ``"kmeans"``, or ``"all"`` when the normal embeddings already fit the requested size.
    covering_radius
        Largest cosine distance from a normal training embedding to its nearest bank member.
    source_indices
        For ``"coreset"`` and ``"all"``, the rows of the training embeddings kept; None for ``"kmeans"``.
    """

    embeddings: torch.Tensor
    method: str
    covering_radius: float
    source_indices: torch.Tensor | None


def check_embeddings(embeddings: torch.Tensor, name: str, tolerance: float = 1e-3) -> torch.Tensor:
    """Raise a ValueError unless ``embeddings`` is a finite ``(n, d)`` matrix of unit-length rows."""
    if embeddings.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(embeddings.shape)}: expected (n, embed_dim)")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{name} contains NaN or infinity")
    norms = embeddings.double().norm(dim=1)
    if len(norms) and (norms - 1).abs().max() > tolerance:
        raise ValueError(
            f"{name} are not L2-normalised (row norms {float(norms.min()):.4f} to {float(norms.max()):.4f}); "
            "use CONCH's encode_image with normalize=True"
        )
    return embeddings


def cosine_distances(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Return ``1 - cos`` between every query and every reference row, clamped at 0 against rounding."""
    return (1.0 - queries @ references.T).clamp_min(0.0)


def greedy_coreset(
    embeddings: torch.Tensor, size: int, seed: int = 0, start: int | None = None
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Select a bank of ``size`` rows by greedy k-center selection with the cosine distance.

    The first row is drawn with ``seed`` unless ``start`` names it. Each next row is the one farthest from
    the rows chosen so far (the first such row when several are equally far). Selection stops early when
    every remaining row coincides with a chosen one (within 16 machine epsilons of the dtype).

    Parameters
    ----------
    embeddings
        ``(n, embed_dim)`` L2-normalised rows, on the device that does the work.
    size
        Number of rows to select, at least 1.
    seed
        Seed of the first row.
    start
        Index of the first row instead of a seeded draw.

    Returns
    -------
    indices
        ``(m,)`` int64 CPU tensor of the chosen rows in selection order, ``m <= size``.
    covering_radius
        Largest cosine distance from any row to its nearest chosen row.
    selection_radii
        ``(m,)`` float64 CPU tensor: the distance of each chosen row from the rows chosen before it (the first
        entry is infinite). It never increases, and each entry is the covering radius of the rows before it.
    """
    count = len(embeddings)
    if count == 0:
        raise ValueError("the coreset needs at least one embedding")
    if size < 1:
        raise ValueError(f"bank size {size} is invalid: use 1 or more")

    if start is None:
        first = int(torch.randint(count, (1,), generator=torch.Generator().manual_seed(seed)))
    elif 0 <= start < count:
        first = start
    else:
        raise ValueError(f"start row {start} is invalid for {count} embeddings")
    indices = [first]
    radii = [float("inf")]
    nearest = cosine_distances(embeddings, embeddings[first : first + 1])[:, 0]
    nearest[first] = 0.0

    while len(indices) < min(size, count):
        farthest = int(torch.argmax(nearest))
        radius = float(nearest[farthest])
        if radius <= _duplicate_tolerance(embeddings.dtype):
            break
        indices.append(farthest)
        radii.append(radius)
        nearest = torch.minimum(
            nearest, cosine_distances(embeddings, embeddings[farthest : farthest + 1])[:, 0]
        )
        nearest[farthest] = 0.0

    covering_radius = float(nearest.max())
    return torch.tensor(indices, dtype=torch.int64), covering_radius, torch.tensor(radii, dtype=torch.float64)


def spherical_kmeans(
    embeddings: torch.Tensor, size: int, seed: int = 0, max_iterations: int = 100
) -> torch.Tensor:
    """Cluster L2-normalised rows into ``size`` unit-length centres by spherical k-means.

    Initialisation is k-means++ with the cosine distance as the sampling weight; each iteration assigns every
    row to its most similar centre and sets the centre to the normalised mean of its rows. A centre left
    without rows moves to the row farthest from its own centre. Iteration stops when no assignment changes.

    Returns
    -------
    torch.Tensor
        ``(size, embed_dim)`` centres on the device of ``embeddings``.
    """
    count = len(embeddings)
    if size < 1 or size > count:
        raise ValueError(f"k-means with {size} centres needs 1 to {count} embeddings, got {count}")

    centres = _kmeans_plus_plus(embeddings, size, seed)
    assignment = torch.full((count,), -1, dtype=torch.int64, device=embeddings.device)
    for _ in range(max_iterations):
        similarity, new_assignment = _nearest_centres(embeddings, centres)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment

        sums = torch.zeros_like(centres).index_add_(0, assignment, embeddings)
        members = torch.bincount(assignment, minlength=size)
        empty = torch.nonzero(members == 0).flatten()
        if len(empty):
            # Refill empty clusters with the rows that their centres represent worst, worst first.
            worst = torch.argsort(similarity, stable=True)[: len(empty)]
            sums[empty] = embeddings[worst]
        centres = torch.nn.functional.normalize(sums, dim=1)
    return centres


def build_memory_bank(
    embeddings: torch.Tensor, size: int, method: str = "coreset", seed: int = 0
) -> MemoryBank:
    """Reduce normal embeddings to a bank of at most ``size`` rows with ``method`` (see the module docstring).

    When there are no more embeddings than ``size``, the bank is all of them and ``method`` is ``"all"``.
    """
    if method not in BANK_METHODS:
        raise ValueError(f"bank method {method!r} is invalid: use one of {', '.join(BANK_METHODS)}")
    check_embeddings(embeddings, "normal training embeddings")
    if len(embeddings) == 0:
        raise ValueError("the memory bank needs at least one normal training embedding")
    if size < 1:
        raise ValueError(f"bank size {size} is invalid: use 1 or more")

    if len(embeddings) <= size:
        bank = embeddings.float().cpu()
        return MemoryBank(bank, "all", 0.0, torch.arange(len(embeddings)))
    if method == "coreset":
        indices, radius, _ = greedy_coreset(embeddings, size, seed)
        return MemoryBank(embeddings[indices.to(embeddings.device)].float().cpu(), method, radius, indices)

    centres = spherical_kmeans(embeddings, size, seed)
    radius = float(knn_cosine_distances(embeddings, centres, k=1).max())
    return MemoryBank(centres.float().cpu(), method, radius, None)


def knn_cosine_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Return, per query, the mean of its ``k`` smallest cosine distances ``1 - cos`` to the bank rows.

    Equal distances are counted once each, so ties do not change the result. Work is split into blocks of
    queries so that memory stays bounded for large inputs.

    Returns
    -------
    torch.Tensor
        ``(n_queries,)`` in the dtype of the inputs, on their device.
    """
    if not 1 <= k <= len(bank):
        raise ValueError(f"k = {k} is invalid for a memory bank of {len(bank)} rows: use 1 to {len(bank)}")
    if queries.shape[-1] != bank.shape[-1]:
        raise ValueError(
            f"queries have {queries.shape[-1]} dimensions but the memory bank has {bank.shape[-1]}: "
            "the bank was built with another CONCH model"
        )
    bank = bank.to(device=queries.device, dtype=queries.dtype)
    blocks = []
    for start in range(0, len(queries), DISTANCE_CHUNK):
        distances = cosine_distances(queries[start : start + DISTANCE_CHUNK], bank)
        blocks.append(torch.topk(distances, k, dim=1, largest=False).values.mean(dim=1))
    if not blocks:
        return torch.zeros(0, dtype=queries.dtype, device=queries.device)
    return torch.cat(blocks)


def _duplicate_tolerance(dtype: torch.dtype) -> float:
    # The distance of a row to an identical row is 1 - |x|^2, which rounds to a few machine epsilons.
    return 16 * torch.finfo(dtype).eps


def _nearest_centres(embeddings: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    similarities, assignments = [], []
    for start in range(0, len(embeddings), DISTANCE_CHUNK):
        best = (embeddings[start : start + DISTANCE_CHUNK] @ centres.T).max(dim=1)
        similarities.append(best.values)
        assignments.append(best.indices)
    return torch.cat(similarities), torch.cat(assignments)


def _kmeans_plus_plus(embeddings: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    # The uniform draws come from numpy on the CPU, so the same seed picks the same rows on any device
    # as long as the distances agree.
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(embeddings)))]
    nearest = cosine_distances(embeddings, embeddings[chosen[0] : chosen[0] + 1])[:, 0]
    for _ in range(size - 1):
        cumulative = torch.cumsum(nearest.double(), dim=0)
        total = float(cumulative[-1])
        if total <= 0.0:
            # Every row coincides with a chosen centre: take the first rows not chosen yet.
            chosen_set = set(chosen)
            remaining = [index for index in range(len(embeddings)) if index not in chosen_set]
            chosen.extend(remaining[: size - len(chosen)])
            break
        target = torch.tensor([rng.random() * total], dtype=torch.float64, device=cumulative.device)
        index = min(int(torch.searchsorted(cumulative, target, right=True)), len(embeddings) - 1)
        chosen.append(index)
        nearest = torch.minimum(nearest, cosine_distances(embeddings, embeddings[index : index + 1])[:, 0])
    return embeddings[torch.tensor(chosen, device=embeddings.device)].clone()
