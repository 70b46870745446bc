"""The triage normal reference: build it from normal embeddings, save it into a bundle and load it with checks.

On disk, inside the bundle folder:

- ``triage/reference.safetensors``: ``memory_bank`` ``(m, embed_dim)`` float32, ``keyword_centroid``
  ``(n_keywords,)``, ``keyword_covariance`` and ``keyword_precision`` ``(n_keywords, n_keywords)`` float64.
- ``triage/reference.json``: sizes, the bank method, the default ``k``, the calibration statistics, the hash
  of the CONCH weights and of the keyword texts it was built with, and the SHA-256 of the tensors file.

A reference built with other CONCH weights or another keyword bank measures distances in another space, so
loading it against such a bundle raises :class:`TriageReferenceError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from napari_anopilad.method.triage_bank import (
    BANK_METHODS,
    build_memory_bank,
    check_embeddings,
    knn_cosine_distances,
)
from napari_anopilad.method.triage_stats import (
    KeywordStatistics,
    ScoreStatistics,
    fit_keyword_statistics,
    mahalanobis_distances,
)

if TYPE_CHECKING:
    from napari_anopilad.method.bundle import Bundle

REFERENCE_FOLDER = "triage"
TENSORS_FILENAME = "reference.safetensors"
SIDECAR_FILENAME = "reference.json"
FORMAT_VERSION = 1
KEYWORD_DISTANCE_KIND = "mahalanobis-ledoit-wolf"
# 10,000 rows of a 512-wide CONCH embedding are 20 MB of float32, and the kNN search over them costs far
# less than the CONCH forward pass that produces a query embedding.
DEFAULT_BANK_SIZE = 10_000
# k = 1: the distance to the nearest normal bank member. A coreset keeps one member per region of normal
# embedding space, so the 2nd and 3rd neighbours of a normal patch are usually members of other regions and
# would add their distance to a normal patch's score. The covering radius bounds exactly the k = 1 distance
# of training patches.
DEFAULT_K = 1
# kNN calibration is stored for each of these k (those up to the bank size) and for the chosen k, so a
# scorer can switch between them without rebuilding.
CALIBRATED_K = (1, 3, 5, 10)


class TriageReferenceError(ValueError):
    """An error for a triage reference that is missing, damaged, or built for another bundle."""


@dataclass(frozen=True)
class TriageReference:
    """Normal reference of the triage scores, with calibration statistics for each score.

    Attributes
    ----------
    memory_bank
        ``(m, embed_dim)`` float32 L2-normalised CONCH image embeddings (or k-means centres) on the CPU.
    keyword_statistics
        Centroid and shrunk covariance of the normal keyword-similarity vectors.
    knn_calibration
        Statistics of the kNN distance on normal validation patches, per ``k``.
    keyword_calibration
        Statistics of the keyword distance on normal validation patches.
    k
        Default number of neighbours of the kNN distance.
    conch_hash, keyword_key
        Hash of the CONCH weights and cache key of the keyword embeddings it was built with
        (``Bundle.part_hashes["conch"]`` and :func:`napari_anopilad.method.prompts.keyword_cache_key`).
    bank_method, requested_bank_size, covering_radius, train_count, seed
        How the memory bank was made from ``train_count`` normal training embeddings.
    demo
        Built with a demo bundle, whose scores mean nothing.
    sources
        Free-form description of the data it was built from (counts, file names).
    """

    memory_bank: torch.Tensor
    keyword_statistics: KeywordStatistics
    knn_calibration: dict[int, ScoreStatistics]
    keyword_calibration: ScoreStatistics
    k: int
    conch_hash: str
    keyword_key: str
    bank_method: str
    requested_bank_size: int
    covering_radius: float
    train_count: int
    seed: int
    demo: bool
    sources: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        """Width of the CONCH image embedding."""
        return int(self.memory_bank.shape[1])

    @property
    def keyword_count(self) -> int:
        """Number of keywords in the similarity vectors."""
        return len(self.keyword_statistics.centroid)

    @property
    def identity(self) -> str:
        """Hash of the bank, the keyword statistics, the calibration and the CONCH and keyword identities."""
        digest = hashlib.sha256()
        digest.update(self.memory_bank.float().contiguous().numpy().tobytes())
        digest.update(np.ascontiguousarray(self.keyword_statistics.centroid, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(self.keyword_statistics.precision, dtype=np.float64).tobytes())
        summary = _sidecar(self, tensors_sha256="")
        summary.pop("sources")
        digest.update(json.dumps(summary, sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def knn_statistics(self, k: int) -> ScoreStatistics:
        """Return the kNN calibration for ``k``; raise TriageReferenceError when it was not measured."""
        if k not in self.knn_calibration:
            raise TriageReferenceError(
                f"the triage reference has no kNN calibration for k = {k}, only for k in "
                f"{sorted(self.knn_calibration)}; use one of those or rebuild the reference with --k {k}"
            )
        return self.knn_calibration[k]

    def knn_distances(self, embeddings: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Return the mean cosine distance of each embedding to its ``k`` nearest bank members."""
        return knn_cosine_distances(
            embeddings, self.memory_bank.to(embeddings.device), self.k if k is None else k
        )

    def keyword_distances(self, similarities: np.ndarray) -> np.ndarray:
        """Return the Mahalanobis distance of each keyword-similarity vector from the normal centroid."""
        statistics = self.keyword_statistics
        return mahalanobis_distances(similarities, statistics.centroid, statistics.precision)


def build_triage_reference(
    train_embeddings: torch.Tensor,
    train_similarities: np.ndarray,
    validation_embeddings: torch.Tensor,
    validation_similarities: np.ndarray,
    *,
    conch_hash: str,
    keyword_key: str,
    bank_size: int = DEFAULT_BANK_SIZE,
    bank_method: str = "coreset",
    k: int = DEFAULT_K,
    seed: int = 0,
    demo: bool = False,
    sources: dict[str, Any] | None = None,
) -> TriageReference:
    """Build the memory bank and keyword statistics from normal training patches and calibrate on validation.

    Parameters
    ----------
    train_embeddings, validation_embeddings
        ``(n, embed_dim)`` L2-normalised CONCH image embeddings of normal patches. Validation patches should
        come from other slides than training patches, or the kNN calibration is too optimistic.
    train_similarities, validation_similarities
        ``(n, n_keywords)`` raw cosine similarities of the same patches to the keyword text embeddings.
    conch_hash, keyword_key
        Identity of the CONCH weights and keyword embeddings, checked when the reference is loaded.
    bank_size, bank_method, seed
        Maximum bank rows, ``"coreset"`` or ``"kmeans"``, and the seed of either.
    k
        Default number of neighbours; its calibration is stored along with ``CALIBRATED_K``.
    """
    if bank_method not in BANK_METHODS:
        raise ValueError(f"bank method {bank_method!r} is invalid: use one of {', '.join(BANK_METHODS)}")
    check_embeddings(train_embeddings, "normal training embeddings")
    check_embeddings(validation_embeddings, "normal validation embeddings")
    _check_pairs(train_embeddings, train_similarities, "training")
    _check_pairs(validation_embeddings, validation_similarities, "validation")
    if len(train_embeddings) < 2:
        raise ValueError(
            f"the reference needs at least 2 normal training patches for the keyword covariance, got "
            f"{len(train_embeddings)}: mark more normal patches with split 'train'"
        )
    if len(validation_embeddings) < 2:
        raise ValueError(
            f"calibration needs at least 2 normal validation patches, got {len(validation_embeddings)}: "
            "mark more normal patches with split 'validation'"
        )

    bank = build_memory_bank(train_embeddings, bank_size, bank_method, seed)
    if not 1 <= k <= len(bank.embeddings):
        raise ValueError(
            f"k = {k} is invalid for a memory bank of {len(bank.embeddings)} rows: use 1 to {len(bank.embeddings)}"
        )
    keyword_statistics = fit_keyword_statistics(train_similarities)

    validation = validation_embeddings.to(bank.embeddings.device, torch.float32)
    k_values = sorted({value for value in (*CALIBRATED_K, k) if value <= len(bank.embeddings)})
    knn_calibration = {
        value: ScoreStatistics.from_values(
            knn_cosine_distances(validation, bank.embeddings, value).double().numpy(),
            f"the kNN distance (k = {value})",
        )
        for value in k_values
    }
    keyword_distances = mahalanobis_distances(
        validation_similarities, keyword_statistics.centroid, keyword_statistics.precision
    )
    keyword_calibration = ScoreStatistics.from_values(keyword_distances, "the keyword distance")

    return TriageReference(
        memory_bank=bank.embeddings,
        keyword_statistics=keyword_statistics,
        knn_calibration=knn_calibration,
        keyword_calibration=keyword_calibration,
        k=k,
        conch_hash=conch_hash,
        keyword_key=keyword_key,
        bank_method=bank.method,
        requested_bank_size=bank_size,
        covering_radius=bank.covering_radius,
        train_count=len(train_embeddings),
        seed=seed,
        demo=demo,
        sources=dict(sources or {}),
    )


def reference_folder(bundle_folder: str | os.PathLike[str]) -> Path:
    """Return the folder of the triage reference inside a bundle folder."""
    return Path(bundle_folder) / REFERENCE_FOLDER


def save_triage_reference(reference: TriageReference, bundle_folder: str | os.PathLike[str]) -> Path:
    """Write the reference into ``bundle_folder/triage/`` and return the tensors file's path.

    Both files are written to temporary names first and then renamed, the sidecar last, so a reader never
    sees a sidecar that describes other tensors (a half-written pair fails the SHA-256 check instead).
    """
    from safetensors.torch import save_file

    folder = reference_folder(bundle_folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors_path = folder / TENSORS_FILENAME
    sidecar_path = folder / SIDECAR_FILENAME
    statistics = reference.keyword_statistics
    tensors = {
        "memory_bank": reference.memory_bank.float().contiguous(),
        "keyword_centroid": torch.from_numpy(np.ascontiguousarray(statistics.centroid, dtype=np.float64)),
        "keyword_covariance": torch.from_numpy(np.ascontiguousarray(statistics.covariance, dtype=np.float64)),
        "keyword_precision": torch.from_numpy(np.ascontiguousarray(statistics.precision, dtype=np.float64)),
    }

    temporary_tensors = tensors_path.with_name(TENSORS_FILENAME + ".tmp")
    save_file(tensors, str(temporary_tensors))
    sidecar = _sidecar(reference, _sha256(temporary_tensors))
    temporary_sidecar = sidecar_path.with_name(SIDECAR_FILENAME + ".tmp")
    temporary_sidecar.write_text(json.dumps(sidecar, indent=2) + "\n")
    temporary_tensors.replace(tensors_path)
    temporary_sidecar.replace(sidecar_path)
    return tensors_path


def read_triage_reference(bundle_folder: str | os.PathLike[str]) -> TriageReference:
    """Read and check the reference files in ``bundle_folder/triage/`` without comparing them to a bundle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = reference_folder(bundle_folder)
    tensors_path = folder / TENSORS_FILENAME
    sidecar_path = folder / SIDECAR_FILENAME
    if not tensors_path.is_file() or not sidecar_path.is_file():
        raise TriageReferenceError(
            f"triage reference: {tensors_path} and {sidecar_path.name} not found; build them with "
            "`python training/build_triage_reference.py --bundle BUNDLE --manifest EXTRACTED/manifest.csv`"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as error:
        raise TriageReferenceError(
            f"triage reference: {sidecar_path} is not valid JSON ({error}); rebuild it"
        ) from error
    if not isinstance(sidecar, dict) or sidecar.get("format_version") != FORMAT_VERSION:
        version = sidecar.get("format_version") if isinstance(sidecar, dict) else None
        raise TriageReferenceError(
            f"triage reference: {sidecar_path} has format_version {version!r}; this version reads {FORMAT_VERSION}"
        )
    digest = _sha256(tensors_path)
    if sidecar.get("tensors_sha256") != digest:
        raise TriageReferenceError(
            f"triage reference: {tensors_path} does not match the SHA-256 recorded in {sidecar_path.name}; "
            "the pair is incomplete or was mixed with another build, so rebuild it"
        )
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as error:
        raise TriageReferenceError(
            f"triage reference: {tensors_path} is not a valid safetensors file ({error})"
        ) from error
    try:
        return _from_files(tensors, sidecar)
    except (KeyError, TypeError, ValueError) as error:
        raise TriageReferenceError(
            f"triage reference: {sidecar_path} or its tensors are invalid ({error}); rebuild it"
        ) from error


def load_triage_reference(bundle: Bundle) -> TriageReference:
    """Read the bundle's triage reference and check that it was built with the bundle's CONCH and keywords."""
    reference = read_triage_reference(bundle.folder)
    check_triage_reference(reference, bundle, where=str(reference_folder(bundle.folder) / SIDECAR_FILENAME))
    return reference


def check_triage_reference(reference: TriageReference, bundle: Bundle, where: str = "the reference") -> None:
    """Raise TriageReferenceError unless ``reference`` was built with the bundle's CONCH weights and keywords."""
    from napari_anopilad.method.prompts import keyword_cache_key

    conch_hash = bundle.part_hashes["conch"]
    if reference.conch_hash != conch_hash:
        raise TriageReferenceError(
            f"triage reference: {where} was built with CONCH weights {reference.conch_hash}, but the bundle's "
            f"CONCH weights are {conch_hash}; distances in another embedding space mean nothing, so rebuild the "
            "reference with this bundle"
        )
    keyword_key = keyword_cache_key(conch_hash, bundle.keywords, bundle.templates)
    if reference.keyword_key != keyword_key or reference.keyword_count != len(bundle.keywords):
        raise TriageReferenceError(
            f"triage reference: {where} was built with another keyword bank or caption templates "
            f"({reference.keyword_count} keywords, key {reference.keyword_key}; the bundle has "
            f"{len(bundle.keywords)}, key {keyword_key}); rebuild the reference with this bundle"
        )


def _check_pairs(embeddings: torch.Tensor, similarities: np.ndarray, split: str) -> None:
    if np.ndim(similarities) != 2 or len(similarities) != len(embeddings):
        raise ValueError(
            f"{split}: got {len(embeddings)} embeddings but keyword similarities of shape {np.shape(similarities)}; "
            "give one similarity vector per embedding"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(reference: TriageReference, tensors_sha256: str) -> dict[str, Any]:
    def statistics(values: ScoreStatistics) -> dict[str, Any]:
        return {"mean": values.mean, "std": values.std, "count": values.count}

    return {
        "format_version": FORMAT_VERSION,
        "demo": reference.demo,
        "conch_hash": reference.conch_hash,
        "keyword_key": reference.keyword_key,
        "embed_dim": reference.embed_dim,
        "keyword_count": reference.keyword_count,
        "memory_bank": {
            "method": reference.bank_method,
            "size": len(reference.memory_bank),
            "requested_size": reference.requested_bank_size,
            "train_count": reference.train_count,
            "seed": reference.seed,
            "covering_radius": reference.covering_radius,
        },
        "k": reference.k,
        "keyword_distance": {
            "kind": KEYWORD_DISTANCE_KIND,
            "shrinkage": reference.keyword_statistics.shrinkage,
        },
        "calibration": {
            "knn_distance": {
                str(k): statistics(values) for k, values in sorted(reference.knn_calibration.items())
            },
            "keyword_distance": statistics(reference.keyword_calibration),
        },
        "sources": reference.sources,
        "tensors_sha256": tensors_sha256,
    }


def _from_files(tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> TriageReference:
    bank = tensors["memory_bank"].float()
    centroid = tensors["keyword_centroid"].double().numpy()
    covariance = tensors["keyword_covariance"].double().numpy()
    precision = tensors["keyword_precision"].double().numpy()
    keyword_count = int(sidecar["keyword_count"])
    if (
        bank.ndim != 2
        or bank.shape[1] != int(sidecar["embed_dim"])
        or len(bank) != int(sidecar["memory_bank"]["size"])
    ):
        raise ValueError(
            f"memory_bank has shape {tuple(bank.shape)}, which disagrees with the sidecar's sizes"
        )
    square = (keyword_count, keyword_count)
    if centroid.shape != (keyword_count,) or covariance.shape != square or precision.shape != square:
        raise ValueError(f"the keyword tensors do not have the sidecar's {keyword_count} keywords")
    if sidecar["keyword_distance"]["kind"] != KEYWORD_DISTANCE_KIND:
        raise ValueError(f"keyword distance kind {sidecar['keyword_distance']['kind']!r} is unknown")

    def statistics(values: dict[str, Any], name: str) -> ScoreStatistics:
        parsed = ScoreStatistics(float(values["mean"]), float(values["std"]), int(values["count"]))
        parsed.check(name)
        return parsed

    calibration = sidecar["calibration"]
    knn_calibration = {
        int(k): statistics(values, f"the kNN distance (k = {k})")
        for k, values in calibration["knn_distance"].items()
    }
    k = int(sidecar["k"])
    if k not in knn_calibration or not 1 <= k <= len(bank):
        raise ValueError(f"the default k = {k} has no calibration or exceeds the bank size {len(bank)}")
    radius = float(sidecar["memory_bank"]["covering_radius"])
    if not math.isfinite(radius):
        raise ValueError(f"covering radius {radius} is not finite")
    return TriageReference(
        memory_bank=bank,
        keyword_statistics=KeywordStatistics(
            centroid=centroid,
            covariance=covariance,
            precision=precision,
            shrinkage=float(sidecar["keyword_distance"]["shrinkage"]),
        ),
        knn_calibration=knn_calibration,
        keyword_calibration=statistics(calibration["keyword_distance"], "the keyword distance"),
        k=k,
        conch_hash=str(sidecar["conch_hash"]),
        keyword_key=str(sidecar["keyword_key"]),
        bank_method=str(sidecar["memory_bank"]["method"]),
        requested_bank_size=int(sidecar["memory_bank"]["requested_size"]),
        covering_radius=radius,
        train_count=int(sidecar["memory_bank"]["train_count"]),
        seed=int(sidecar["memory_bank"]["seed"]),
        demo=bool(sidecar.get("demo", False)),
        sources=dict(sidecar.get("sources", {})),
    )
