"""What every comparison method shares: its bundle on disk, its settings and its scorer interface.

A comparison bundle is a folder with ``bundle.json`` (``"method"`` names the scorer class) and the
model weights as safetensors files. Its scorer has the interface that the engine, the napari dock,
the cohort runner and the evaluation scripts use for AnoPILaD: ``score(images_uint8, noise_keys)``
returns per-patch values for each of ``score_names``, and ``calibration`` holds the mean and std of
each score on normal validation patches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.heatmap import within_slide_stats, zscores
from napari_anopilad.method.json_values import (
    check_bool,
    check_format_version,
    check_integer,
    check_string,
    read_score_statistics,
)
from napari_anopilad.method.weights import hash_file, read_state_dict

logger = logging.getLogger(__name__)

BUNDLE_FILENAME = "bundle.json"
FORMAT_VERSION = 1
PATCH_SIZE = 256
# Module of napari_anopilad.method.baselines that registers each method's scorer when imported.
METHOD_MODULES: dict[str, str] = {
    "ae": "autoencoders",
    "memae": "autoencoders",
    "anoddpm": "anoddpm",
    "vae-density": "vae_density",
    "f-anogan": "fanogan",
}
_SCORERS: dict[str, type[BaselineScorer]] = {}


@dataclass(frozen=True)
class BaselineSettings:
    """Settings of a comparison method's scoring, keyed into result stores like AnoPILaD's settings.

    Attributes
    ----------
    method
        The method name (a key of ``METHOD_MODULES``).
    score
        Which of the method's scores the z-scores, heatmap and slide scores use.
    seed
        Seed of any randomness in scoring (noise of a partial diffusion, importance samples).
    options
        Method-specific scoring options (for example ``start_timestep`` of AnoDDPM), JSON values only.
    """

    method: str
    score: str
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    # The store and the dock read these of every scorer's settings; comparison methods have no prompt.
    top_k: ClassVar[int] = 0
    unprompted: ClassVar[bool] = True
    precision: ClassVar[str] = "float32"

    def __post_init__(self) -> None:
        check_string("method", self.method)
        check_string("score", self.score)
        object.__setattr__(self, "seed", check_integer("seed", self.seed))
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options {self.options!r} is invalid: use an object of option names and values")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "score": self.score, "seed": self.seed, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BaselineSettings:
        """Build settings from a JSON object; raise ValueError naming a missing, unknown or invalid setting."""
        if not isinstance(values, Mapping):
            raise ValueError(
                f"the settings {values!r} are invalid: use an object of setting names and values"
            )
        known = {"method", "score", "seed", "options"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown comparison-method settings {unknown}: known settings are {sorted(known)}"
            )
        try:
            options = values.get("options") or {}
            return cls(
                method=values["method"],
                score=values["score"],
                seed=values.get("seed", 0),
                options=dict(options) if isinstance(options, Mapping) else options,
            )
        except KeyError as error:
            raise ValueError(f"comparison-method settings need {error.args[0]!r}") from error

    def with_overrides(self, **overrides: Any) -> BaselineSettings:
        """Return a copy with ``score``, ``seed`` or options replaced; ``None`` values keep the current value.

        Keywords other than ``score`` and ``seed`` replace entries of ``options``; a keyword that is
        neither raises ValueError naming it, so an AnoPILaD-only setting is never silently ignored.
        """
        score = overrides.pop("score", None)
        seed = overrides.pop("seed", None)
        options = dict(self.options)
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "precision" and value == "float32" and key not in options:
                # The comparison methods run in float32, so asking for it changes nothing.
                continue
            if key not in options:
                choices = f"its options are {', '.join(sorted(options))}" if options else "it has no options"
                raise ValueError(f"setting {key!r} does not apply to the {self.method} method: {choices}")
            options[key] = value
        return BaselineSettings(
            method=self.method,
            score=self.score if score is None else score,
            seed=self.seed if seed is None else seed,
            options=options,
        )

    def score_key(self) -> str:
        """Return a short hash of everything that changes the scores."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BaselineCalibration:
    """Mean and population std of each score on normal validation patches, with the settings used."""

    mean: dict[str, float]
    std: dict[str, float]
    count: int
    settings: BaselineSettings

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "settings": self.settings.to_dict(),
            "scores": {name: {"mean": self.mean[name], "std": self.std[name]} for name in self.mean},
        }

    @classmethod
    def from_dict(
        cls, values: Any, score_names: Sequence[str], source: str | os.PathLike[str] | None = None
    ) -> BaselineCalibration:
        """Parse and check calibration statistics; raise BundleError naming the invalid value.

        ``source`` is the file that contains the statistics, named in every message.
        """
        label = "calibration" if source is None else f"calibration in {source}"
        if not isinstance(values, Mapping):
            raise BundleError(
                f"{label}: {values!r} is invalid: use an object with 'count', 'settings' and 'scores', "
                "as the method's training script writes it"
            )
        missing = [key for key in ("count", "settings", "scores") if key not in values]
        if missing:
            raise BundleError(
                f"{label}: {', '.join(map(repr, missing))} missing: recalibrate with the method's training "
                "script, or set the calibration entry to null"
            )
        try:
            settings = BaselineSettings.from_dict(values["settings"])
        except ValueError as error:
            raise BundleError(f"{label}: the settings are invalid ({error})") from error
        try:
            count = check_integer("count", values["count"])
            mean, std = read_score_statistics(values["scores"], score_names)
        except ValueError as error:
            raise BundleError(f"{label}: {error}") from error
        if count < 2:
            raise BundleError(f"{label}: count {count} is too small to estimate a std; use 2 or more patches")
        return cls(mean=mean, std=std, count=count, settings=settings)

    def differences(self, settings: BaselineSettings) -> list[str]:
        """Return ``name: calibrated -> requested`` for each setting that changes the scores and differs."""
        differences = []
        if self.settings.method != settings.method:
            differences.append(f"method: {self.settings.method!r} -> {settings.method!r}")
        if self.settings.seed != settings.seed:
            differences.append(f"seed: {self.settings.seed!r} -> {settings.seed!r}")
        for key in sorted(set(self.settings.options) | set(settings.options)):
            before, after = self.settings.options.get(key), settings.options.get(key)
            if before != after:
                differences.append(f"{key}: {before!r} -> {after!r}")
        return differences


@dataclass
class BaselineBundle:
    """A checked comparison-method bundle; the weights load on request with :meth:`state_dict`.

    Attributes
    ----------
    folder
        The bundle folder.
    method
        The method name; picks the scorer class.
    model
        The architecture configuration, as the method's scorer reads it.
    weights
        Name of each weight part (``"model"``, ``"background"``, ...) to its safetensors file.
    settings
        The default scoring settings.
    calibration
        Statistics measured under ``settings``, or None; ``calibration_note`` says why when None.
    identity
        Hash of the weight files, the architecture and the settings: part of result store names.
    """

    folder: Path
    method: str
    name: str
    demo: bool
    model: dict[str, Any]
    weights: dict[str, Path]
    settings: BaselineSettings
    calibration: BaselineCalibration | None
    calibration_note: str | None
    identity: str
    training: dict[str, Any]

    def calibration_for(self, settings: BaselineSettings) -> BaselineCalibration | None:
        """Return the calibration if it was measured under ``settings`` (the score choice aside), else None."""
        if self.calibration is None or self.calibration.differences(settings):
            return None
        return self.calibration

    def state_dict(self, part: str = "model") -> dict[str, torch.Tensor]:
        """Read one weight part; only safetensors (or tensors-only pickles) are accepted."""
        if part not in self.weights:
            raise BundleError(
                f"{self.method} weights: the bundle {self.folder} has no part {part!r}; "
                f"it has {sorted(self.weights)}"
            )
        return read_state_dict(self.weights[part], f"{self.method} weights ({part})")


def bundle_method(folder: str | os.PathLike[str]) -> str:
    """Return the ``"method"`` of the bundle in ``folder``: ``"anopilad"`` when ``bundle.json`` names none."""
    spec_path = Path(folder) / BUNDLE_FILENAME
    if not spec_path.is_file():
        raise BundleError(f"bundle: {spec_path} not found; create one with `anopilad make-demo-bundle DIR`")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"bundle: {spec_path} is not valid JSON ({error})") from error
    if not isinstance(spec, dict):
        raise BundleError(f"bundle: {spec_path} must contain a JSON object, not {type(spec).__name__}")
    method = spec.get("method", "anopilad")
    if not isinstance(method, str):
        raise BundleError(f"bundle: {spec_path} has the method {method!r}; it must be a string")
    return method


def save_baseline_bundle(
    folder: str | os.PathLike[str],
    method: str,
    model: Mapping[str, Any],
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    settings: BaselineSettings,
    *,
    name: str | None = None,
    calibration: BaselineCalibration | None = None,
    demo: bool = False,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write a comparison bundle: ``bundle.json`` plus one ``<part>.safetensors`` per state dict.

    Files are written to temporary names and renamed, so a killed run never leaves a half-written
    bundle that loads. Returns the folder.
    """
    from safetensors.torch import save_file

    if method not in METHOD_MODULES:
        raise ValueError(f"method {method!r} is unknown: use one of {', '.join(METHOD_MODULES)}")
    if settings.method != method:
        raise ValueError(f"the settings are for {settings.method!r}, not for the bundle's method {method!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for part, state in state_dicts.items():
        path = folder / f"{part}.safetensors"
        temporary = path.with_name(f".tmp-{path.name}")
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
        save_file(tensors, str(temporary), metadata={"method": method, "part": part})
        os.replace(temporary, path)
        weights[part] = path.name
    spec = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "name": name or f"{method} comparison model",
        "demo": demo,
        "model": dict(model),
        "weights": weights,
        "settings": settings.to_dict(),
        "calibration": None if calibration is None else calibration.to_dict(),
        "training": dict(training or {}),
    }
    spec_path = folder / BUNDLE_FILENAME
    temporary = spec_path.with_name(f".tmp-{spec_path.name}")
    temporary.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(temporary, spec_path)
    return folder


def load_baseline_bundle(
    folder: str | os.PathLike[str], *, require_calibration: bool = False
) -> BaselineBundle:
    """Read and check a comparison bundle; raise BundleError naming the part that is wrong and what to do."""
    folder = Path(folder)
    spec_path = folder / BUNDLE_FILENAME
    method = bundle_method(folder)
    scorer_class = scorer_class_for(method)
    spec = json.loads(spec_path.read_text())
    try:
        check_format_version(spec.get("format_version"), FORMAT_VERSION)
        name = check_string("name", spec.get("name", method))
    except ValueError as error:
        raise BundleError(f"bundle in {spec_path}: {error}") from error
    model = spec.get("model")
    if not isinstance(model, dict):
        raise BundleError(f"bundle: {spec_path} needs a 'model' object with the {method} architecture")
    weight_names = spec.get("weights")
    if not isinstance(weight_names, dict) or not weight_names:
        raise BundleError(f"bundle: {spec_path} needs a 'weights' object naming each weight file")
    weights: dict[str, Path] = {}
    for part, relative in weight_names.items():
        path = folder / str(relative)
        if not path.is_file():
            raise BundleError(
                f"{method} weights: {path} ({part}) not found; retrain or copy the bundle whole"
            )
        weights[part] = path
    missing = sorted(set(scorer_class.weight_parts) - set(weights))
    if missing:
        raise BundleError(f"{method} weights: {spec_path} names no file for {missing}")
    try:
        settings = BaselineSettings.from_dict(spec.get("settings") or {})
    except ValueError as error:
        raise BundleError(f"settings in {spec_path}: {error}") from error
    if settings.method != method:
        raise BundleError(f"settings: {spec_path} has settings for {settings.method!r}, not {method!r}")
    if settings.score not in scorer_class.score_names:
        raise BundleError(
            f"settings: score {settings.score!r} is not a {method} score; use one of {', '.join(scorer_class.score_names)}"
        )

    calibration: BaselineCalibration | None = None
    note: str | None = None
    if spec.get("calibration") is None:
        note = (
            "calibration: the bundle has no calibration statistics; z-scores are computed within each slide"
        )
    else:
        calibration = BaselineCalibration.from_dict(spec["calibration"], scorer_class.score_names, spec_path)
        differences = calibration.differences(settings)
        if differences:
            note = (
                f"calibration: measured under other settings than the bundle's ({'; '.join(differences)}); "
                "z-scores are computed within each slide. Recalibrate under the bundle's settings"
            )
            calibration = None
    if calibration is None and require_calibration:
        raise BundleError(note or "calibration: missing")
    try:
        demo = check_bool("demo", spec.get("demo", False))
    except ValueError as error:
        raise BundleError(f"bundle in {spec_path}: {error}") from error

    record = {
        "method": method,
        "model": model,
        "settings": settings.to_dict(),
        "weights": {part: hash_file(path) for part, path in sorted(weights.items())},
    }
    identity = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return BaselineBundle(
        folder=folder,
        method=method,
        name=name,
        demo=demo,
        model=model,
        weights=weights,
        settings=settings,
        calibration=calibration,
        calibration_note=note,
        identity=identity,
        training=dict(spec.get("training") or {}),
    )


@dataclass
class BaselineScores:
    """Scores of a batch of patches by a comparison method, one entry per patch in input order.

    The prompt fields are empty (comparison methods have no keyword prompt); they exist so the
    engine stores and shows every method's results the same way.
    """

    scores: dict[str, np.ndarray]
    reconstructions: np.ndarray | None
    demo: bool

    def __len__(self) -> int:
        return len(next(iter(self.scores.values())))

    def values(self, score: str) -> np.ndarray:
        """Return the per-patch values of ``score``."""
        if score not in self.scores:
            raise ValueError(f"score {score!r} is invalid: use one of {', '.join(self.scores)}")
        return np.asarray(self.scores[score])

    def score_values(self) -> dict[str, np.ndarray]:
        """Return every score by name."""
        return dict(self.scores)

    @property
    def keywords(self) -> list[list[str]]:
        return [[] for _ in range(len(self))]

    @property
    def similarities(self) -> list[list[float]]:
        return [[] for _ in range(len(self))]

    @property
    def weights(self) -> list[list[float]]:
        return [[] for _ in range(len(self))]

    @property
    def prompt(self) -> list[str]:
        return ["" for _ in range(len(self))]


class BaselineScorer:
    """Base class of the comparison methods' scorers.

    A subclass sets ``method``, ``score_names``, ``weight_parts`` and ``input_size``, builds its
    networks from ``bundle.model`` in :meth:`build`, and computes the scores of a batch in
    :meth:`score_pixels`. Patches are 256 px; a method trained on 64 px crops sees each patch as its
    4 x 4 tiling of 64 px crops and a patch's score is the mean over its crops (:meth:`score_pixels`
    receives the crops and :meth:`score` averages them back).

    Parameters
    ----------
    bundle
        A loaded comparison bundle of this method.
    device
        Torch device of every network.
    settings
        Scoring settings; the bundle's when None.
    """

    method: ClassVar[str] = ""
    score_names: ClassVar[tuple[str, ...]] = ()
    weight_parts: ClassVar[tuple[str, ...]] = ("model",)
    input_size: ClassVar[int] = PATCH_SIZE
    # Whether score_pixels can return reconstructions (autoencoders and diffusion models can).
    reconstructs: ClassVar[bool] = False

    def __init__(
        self,
        bundle: BaselineBundle,
        device: str | torch.device = "cpu",
        settings: BaselineSettings | None = None,
    ) -> None:
        if bundle.method != self.method:
            raise ValueError(f"the bundle {bundle.folder} is a {bundle.method} bundle, not {self.method}")
        self.bundle = bundle
        self.device = torch.device(device)
        self.settings = settings or bundle.settings
        if self.settings.method != self.method:
            raise ValueError(f"the settings are for {self.settings.method!r}, not {self.method!r}")
        if self.settings.score not in self.score_names:
            raise ValueError(
                f"score {self.settings.score!r} is invalid for {self.method}: use one of {', '.join(self.score_names)}"
            )
        self.calibration = bundle.calibration_for(self.settings)
        self.build()

    def build(self) -> None:
        """Build the networks from ``self.bundle.model`` and load their weights onto ``self.device``."""
        raise NotImplementedError

    def score_pixels(
        self, pixels: torch.Tensor, noise_seeds: Sequence[int], return_reconstructions: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Score a batch of network inputs.

        Parameters
        ----------
        pixels
            ``(m, 3, input_size, input_size)`` float32 in [-1, 1] on ``self.device``.
        noise_seeds
            One seed per input, derived from the patch's noise key and the settings' seed, for any
            randomness the method needs; an input's scores then do not depend on its batch.
        return_reconstructions
            Also return ``(m, 3, input_size, input_size)`` reconstructions in [-1, 1].

        Returns
        -------
        A dict of ``(m,)`` tensors, one per name in ``score_names``, and the reconstructions or None.
        """
        raise NotImplementedError

    @torch.no_grad()
    def score(
        self,
        images_uint8: np.ndarray,
        noise_keys: Sequence[tuple[str, int, int]] | None = None,
        return_reconstructions: bool = False,
    ) -> BaselineScores:
        """Score ``(n, 256, 256, 3)`` uint8 RGB patches; ``noise_keys`` are ``(slide_identity, row, col)``."""
        images = np.asarray(images_uint8)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (PATCH_SIZE, PATCH_SIZE, 3):
            raise ValueError(
                f"patches have shape {images.shape} and dtype {images.dtype}: "
                f"use uint8 RGB of shape (n, {PATCH_SIZE}, {PATCH_SIZE}, 3)"
            )
        n = images.shape[0]
        if noise_keys is None:
            noise_keys = [("", index, 0) for index in range(n)]
        if len(noise_keys) != n:
            raise ValueError(f"got {len(noise_keys)} noise keys for {n} patches: give one per patch")
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        pixels = pixels / 127.5 - 1.0
        crops, per_patch = to_crops(pixels, self.input_size)
        seeds = [noise_seed(key, self.settings.seed, crop) for key in noise_keys for crop in range(per_patch)]
        values, reconstructed = self.score_pixels(crops, seeds, return_reconstructions and self.reconstructs)
        missing = sorted(set(self.score_names) - set(values))
        if missing:
            raise RuntimeError(f"the {self.method} scorer returned no values for {missing}")
        scores = {
            name: values[name].detach().double().reshape(n, per_patch).mean(dim=1).cpu().numpy()
            for name in self.score_names
        }
        reconstructions = None
        if reconstructed is not None:
            patches = from_crops(reconstructed.float(), n, self.input_size)
            uint8 = ((patches.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
            reconstructions = uint8.permute(0, 2, 3, 1).cpu().numpy()
        return BaselineScores(scores=scores, reconstructions=reconstructions, demo=self.bundle.demo)

    def z_scores(self, values: Sequence[float] | np.ndarray, score: str | None = None) -> Any:
        """Convert scores to z-scores with the bundle's calibration, or within the given values without one."""
        from napari_anopilad.method.scorer import ZScores

        score = score or self.settings.score
        if score not in self.score_names:
            raise ValueError(f"score {score!r} is invalid: use one of {', '.join(self.score_names)}")
        if self.calibration is not None:
            mean, std = self.calibration.mean[score], self.calibration.std[score]
            return ZScores(zscores(values, mean, std), mean, std, "calibration", None)
        mean, std = within_slide_stats(values)
        return ZScores(zscores(values, mean, std), mean, std, "within-slide", self.bundle.calibration_note)


def to_crops(pixels: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """Split ``(n, c, H, W)`` patches into non-overlapping ``size`` px crops, row by row within each patch.

    Returns the ``(n * k, c, size, size)`` crops and ``k``, the crops per patch. ``H`` and ``W`` must be
    multiples of ``size``.
    """
    n, channels, height, width = pixels.shape
    if height % size or width % size:
        raise ValueError(f"patches of {height} x {width} px do not split into {size} px crops")
    rows, cols = height // size, width // size
    crops = pixels.reshape(n, channels, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5)
    return crops.reshape(n * rows * cols, channels, size, size), rows * cols


def from_crops(crops: torch.Tensor, n: int, size: int, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Reassemble the crops of :func:`to_crops` into ``(n, c, patch_size, patch_size)`` patches."""
    per_side = patch_size // size
    channels = crops.shape[1]
    tiles = crops.reshape(n, per_side, per_side, channels, size, size).permute(0, 3, 1, 4, 2, 5)
    return tiles.reshape(n, channels, patch_size, patch_size)


def noise_seed(key: tuple[str, int, int], seed: int, crop: int = 0) -> int:
    """Return a 63-bit seed from a patch's ``(slide_identity, row, col)``, the settings' seed and a crop index."""
    text = f"{key[0]}|{int(key[1])}|{int(key[2])}|{int(seed)}|{int(crop)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def register_scorer(cls: type[BaselineScorer]) -> type[BaselineScorer]:
    """Class decorator: make ``cls`` the scorer of bundles whose method is ``cls.method``."""
    if cls.method not in METHOD_MODULES:
        raise ValueError(f"method {cls.method!r} is not listed in METHOD_MODULES")
    _SCORERS[cls.method] = cls
    return cls


def scorer_class_for(method: str) -> type[BaselineScorer]:
    """Return the scorer class of a comparison method, importing its module on first use."""
    if method not in METHOD_MODULES:
        raise BundleError(
            f"bundle: method {method!r} is unknown; use 'anopilad' or one of {', '.join(METHOD_MODULES)}"
        )
    if method not in _SCORERS:
        import importlib

        importlib.import_module(f"napari_anopilad.method.baselines.{METHOD_MODULES[method]}")
    if method not in _SCORERS:
        raise BundleError(f"bundle: the {method} scorer is not available in this version of napari-anopilad")
    return _SCORERS[method]
