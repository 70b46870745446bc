"""The model bundle: one folder with every part that makes a result reproducible, checked when loaded.

The format of ``bundle.json`` is described in ``docs/bundle-format.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.json_values import (
    check_bool,
    check_format_version,
    check_integer,
    check_number,
    check_string,
    read_score_statistics,
)
from napari_anopilad.method.settings import SCORES, InferenceSettings

if TYPE_CHECKING:
    import lpips
    import torch
    from conch.open_clip_custom import CoCa
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

BUNDLE_FILENAME = "bundle.json"
FORMAT_VERSION = 1
BASE_MODEL_KINDS = ("diffusers", "single_file", "hub")
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
CACHE_FOLDER = ".cache"
# Settings that do not change the score values, so calibration measured under another value still applies.
SETTINGS_NOT_AFFECTING_CALIBRATION = ("score",)

_Value = TypeVar("_Value")


@dataclass(frozen=True)
class Calibration:
    """Mean and population std of each score on held-out normal patches, with the settings used."""

    mean: dict[str, float]
    std: dict[str, float]
    count: int
    settings: InferenceSettings

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "settings": self.settings.to_dict(),
            "scores": {name: {"mean": self.mean[name], "std": self.std[name]} for name in self.mean},
        }

    @classmethod
    def from_dict(cls, values: Any, source: str | os.PathLike[str] | None = None) -> Calibration:
        """Parse and check calibration statistics; raise BundleError naming the invalid value.

        ``source`` is the file that contains the statistics, named in every message.
        """
        label = "calibration" if source is None else f"calibration in {source}"
        if not isinstance(values, dict):
            raise BundleError(
                f"{label}: {values!r} is invalid: use an object with 'count', 'settings' and 'scores', "
                "as training/06_calibrate.py writes it"
            )
        missing = [key for key in ("count", "settings", "scores") if key not in values]
        if missing:
            raise BundleError(
                f"{label}: {', '.join(map(repr, missing))} missing: rerun training/06_calibrate.py, "
                "or remove the calibration entry"
            )
        try:
            settings = InferenceSettings.from_dict(values["settings"])
        except (TypeError, ValueError) as error:
            raise BundleError(f"{label}: the settings are invalid ({error})") from error
        try:
            count = check_integer("count", values["count"])
            mean, std = read_score_statistics(values["scores"], SCORES)
        except ValueError as error:
            raise BundleError(f"{label}: {error}") from error
        if count < 2:
            raise BundleError(f"{label}: count {count} is too small to estimate a std; use 2 or more patches")
        return cls(mean=mean, std=std, count=count, settings=settings)

    def differences(self, settings: InferenceSettings) -> list[str]:
        """Return ``name: calibrated -> requested`` for each setting that changes the scores and differs."""
        return [
            f"{field.name}: {getattr(self.settings, field.name)!r} -> {getattr(settings, field.name)!r}"
            for field in fields(InferenceSettings)
            if field.name not in SETTINGS_NOT_AFFECTING_CALIBRATION
            and getattr(self.settings, field.name) != getattr(settings, field.name)
        ]


@dataclass(frozen=True)
class BaseModelSpec:
    """Source of the Stable Diffusion 1.5 base: a diffusers folder, a single-file checkpoint, or the hub."""

    kind: str
    path: Path | None
    config: Path | None
    hub_id: str | None


@dataclass(frozen=True)
class LoraSpec:
    """The UNet LoRA weights file and the adapter shape that the bundle declares."""

    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


@dataclass
class Bundle:
    """A checked model bundle. Models are loaded on request with the ``load_*`` methods.

    Attributes
    ----------
    identity
        Hash of the weight files' hashes, the keyword and template texts and the inference settings.
    part_hashes
        Hash of each part's weight files (``base_model``, ``lora``, ``conch``, ``lpips``).
    calibration
        Statistics that match ``settings``, or None. ``calibration_note`` gives the reason when it is None.
    """

    folder: Path
    demo: bool
    base_model: BaseModelSpec
    lora: LoraSpec
    conch_checkpoint: Path
    conch_config: dict[str, Any]
    lpips_net: str
    lpips_backbone: Path
    keywords: list[str]
    templates: list[str]
    settings: InferenceSettings
    calibration: Calibration | None
    calibration_note: str | None
    identity: str
    part_hashes: dict[str, str]
    device: str = "cpu"
    allow_download: bool = False

    @property
    def cache_dir(self) -> Path:
        """Folder for derived files (keyword embeddings, file hashes): inside the bundle when writable."""
        return _cache_dir(self.folder)

    def calibration_for(self, settings: InferenceSettings) -> Calibration | None:
        """Return the calibration if it was measured under ``settings`` (the score choice aside), else None."""
        if self.calibration is None or self.calibration.differences(settings):
            return None
        return self.calibration

    def scheduler_config(self) -> dict[str, Any] | None:
        """Read the base model's ``scheduler/scheduler_config.json``; None when the file is missing or invalid."""
        folder = self.base_model.config if self.base_model.kind == "single_file" else self.base_model.path
        if folder is None:
            return None
        path = folder / "scheduler" / "scheduler_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return config if isinstance(config, dict) else None

    def start_timestep_on_grid(self, settings: InferenceSettings) -> int | None:
        """Return the grid timestep that the diffusion starts from under ``settings``.

        The start timestep is rounded to the nearest step of the ``num_inference_steps`` grid, as in
        :func:`~napari_anopilad.method.diffusion.denoise`. None when the scheduler configuration is unreadable.
        """
        from napari_anopilad.method.diffusion import grid_start_timestep

        config = self.scheduler_config()
        if config is None:
            return None
        return grid_start_timestep(config, settings.num_inference_steps, settings.start_timestep)

    def load_pipeline(self, device: str | torch.device | None = None) -> StableDiffusionPipeline:
        """Load the SD1.5 pipeline in float32 with the LoRA fused into the UNet."""
        from napari_anopilad.method.pipeline import load_pipeline

        return load_pipeline(self, device or self.device)

    def load_conch(self, device: str | torch.device | None = None) -> CoCa:
        """Load CONCH with a strict key check, in eval mode."""
        from napari_anopilad.method.conch_model import load_conch

        return load_conch(self.conch_config, self.conch_checkpoint, device or self.device)

    def load_lpips(self, device: str | torch.device | None = None) -> lpips.LPIPS:
        """Load LPIPS (float32) with the bundle's backbone weights."""
        from napari_anopilad.method.perceptual import load_lpips

        return load_lpips(self.lpips_net, self.lpips_backbone, device or self.device)

    def keyword_embeddings(self) -> torch.Tensor:
        """Return the keyword text embeddings ``(n_keywords, embed_dim)``, cached on disk."""
        from napari_anopilad.method.prompts import cached_keyword_embeddings

        return cached_keyword_embeddings(self)


@dataclass
class PromptParts:
    """The parts of a bundle that keyword prompts need: CONCH, the keyword bank, the templates and settings.

    :func:`load_prompt_parts` checks only these, so a bundle whose diffusion or LPIPS parts are missing
    still gives prompts. ``part_hashes`` has the ``conch`` entry only, equal to :class:`Bundle`'s, so both
    share the cached keyword embeddings.
    """

    folder: Path
    demo: bool
    conch_checkpoint: Path
    conch_config: dict[str, Any]
    keywords: list[str]
    templates: list[str]
    settings: InferenceSettings
    part_hashes: dict[str, str]
    device: str = "cpu"

    @property
    def cache_dir(self) -> Path:
        """Folder for derived files (keyword embeddings, file hashes): inside the bundle when writable."""
        return _cache_dir(self.folder)

    def load_conch(self, device: str | torch.device | None = None) -> CoCa:
        """Load CONCH with a strict key check, in eval mode."""
        from napari_anopilad.method.conch_model import load_conch

        return load_conch(self.conch_config, self.conch_checkpoint, device or self.device)


def load_bundle(
    folder: str | os.PathLike[str],
    allow_download: bool = False,
    device: str = "cpu",
    *,
    require_calibration: bool = False,
    token: str | None = None,
) -> Bundle:
    """Read ``bundle.json`` from ``folder`` and check every part it names.

    Parameters
    ----------
    folder
        The bundle folder.
    allow_download
        Download a base model or CONCH checkpoint named by hub id when it is not local. Off by default.
    device
        Default device for the ``load_*`` methods.
    require_calibration
        Raise instead of warning when the calibration statistics are missing or were measured under
        other settings than the bundle's.
    token
        Hugging Face token for the gated CONCH repository (else ``HF_TOKEN`` or the stored login).

    Raises
    ------
    BundleError
        A ValueError whose message names the missing or mismatched part and what to do.
    """
    folder = Path(folder)
    spec, spec_path = _read_spec(folder)
    settings = _read_settings(spec, spec_path)
    base_model = _read_base_model(folder, _section(spec, "base_model"), allow_download, token)
    lora = _read_lora(folder, _section(spec, "lora"))
    _check_lora(lora, base_model)
    conch_checkpoint, conch_config = _read_conch(folder, _section(spec, "conch"), allow_download, token)
    lpips_net, lpips_backbone = _read_lpips(folder, _section(spec, "lpips"))
    keywords, templates = _read_prompts(folder, _section(spec, "prompts"))
    calibration, calibration_note = _read_calibration(
        spec.get("calibration"), settings, require_calibration, spec_path
    )
    demo = _checked(check_bool, "demo", spec.get("demo", False), "bundle", folder)

    weight_files = {
        "base_model": _base_model_files(base_model),
        "lora": [lora.path],
        "conch": [conch_checkpoint],
        "lpips": [lpips_backbone, _lpips_linear_layers(lpips_net)],
    }
    identity, part_hashes = _bundle_identity(
        folder, weight_files, conch_config, keywords, templates, settings
    )
    return Bundle(
        folder=folder,
        demo=demo,
        base_model=base_model,
        lora=lora,
        conch_checkpoint=conch_checkpoint,
        conch_config=conch_config,
        lpips_net=lpips_net,
        lpips_backbone=lpips_backbone,
        keywords=keywords,
        templates=templates,
        settings=settings,
        calibration=calibration,
        calibration_note=calibration_note,
        identity=identity,
        part_hashes=part_hashes,
        device=device,
        allow_download=allow_download,
    )


def read_bundle_settings(folder: str | os.PathLike[str]) -> InferenceSettings:
    """Read and check only the inference settings in ``bundle.json``; no weight file is read or hashed.

    Raises BundleError as :func:`load_bundle` does for a missing or invalid ``bundle.json``.
    """
    spec, spec_path = _read_spec(Path(folder))
    return _read_settings(spec, spec_path)


def load_prompt_parts(
    folder: str | os.PathLike[str],
    allow_download: bool = False,
    device: str = "cpu",
    *,
    token: str | None = None,
) -> PromptParts:
    """Read ``bundle.json`` from ``folder`` and check only the parts that keyword prompts need.

    The settings, the CONCH config and checkpoint, the keyword bank, the caption templates and ``demo``
    are checked as :func:`load_bundle` checks them. The base model, LoRA, LPIPS and calibration entries
    are neither read nor required, so use :func:`load_bundle` wherever the diffusion runs.

    Raises
    ------
    BundleError
        For a missing or invalid part among those above, or a comparison method's bundle, which has no
        CONCH model or keyword bank.
    """
    folder = Path(folder)
    spec, spec_path = _read_spec(folder)
    method = spec.get("method", "anopilad")
    if method != "anopilad":
        raise BundleError(
            f"bundle: {spec_path} is a bundle of the comparison method {method!r}, which has no CONCH model "
            "or keyword bank: give an AnoPILaD bundle"
        )
    settings = _read_settings(spec, spec_path)
    conch_checkpoint, conch_config = _read_conch(folder, _section(spec, "conch"), allow_download, token)
    keywords, templates = _read_prompts(folder, _section(spec, "prompts"))
    demo = _checked(check_bool, "demo", spec.get("demo", False), "bundle", folder)
    return PromptParts(
        folder=folder,
        demo=demo,
        conch_checkpoint=conch_checkpoint,
        conch_config=conch_config,
        keywords=keywords,
        templates=templates,
        settings=settings,
        part_hashes=_part_hashes(folder, {"conch": [conch_checkpoint]})[1],
        device=device,
    )


def read_keywords(path: Path) -> list[str]:
    """Read the keyword bank: one keyword a line, blank lines ignored, no duplicates."""
    if not path.is_file():
        raise BundleError(f"keyword bank: file {path} not found")
    keywords = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not keywords:
        raise BundleError(f"keyword bank: {path} is empty; write one keyword a line")
    duplicates = sorted({keyword for keyword in keywords if keywords.count(keyword) > 1})
    if duplicates:
        raise BundleError(f"keyword bank: {path} repeats {duplicates}; keep each keyword once")
    return keywords


def read_templates(path: Path) -> list[str]:
    """Read the caption templates: one a line, each with exactly one ``{}`` where the keyword goes."""
    if not path.is_file():
        raise BundleError(f"caption templates: file {path} not found")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not templates:
        raise BundleError(
            f"caption templates: {path} is empty; write one template a line with {{}} for the keyword"
        )
    invalid = [template for template in templates if template.count("{}") != 1]
    if invalid:
        raise BundleError(f"caption templates: {path} has templates without exactly one {{}}: {invalid[:3]}")
    return templates


def _read_spec(folder: Path) -> tuple[dict[str, Any], Path]:
    """Return the parsed ``bundle.json`` of ``folder`` and its path, after checking its format version."""
    spec_path = folder / BUNDLE_FILENAME
    if not spec_path.is_file():
        raise BundleError(f"bundle: {spec_path} not found; create one with `anopilad make-demo-bundle DIR`")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"bundle: {spec_path} is not valid JSON ({error})") from error
    if not isinstance(spec, dict):
        raise BundleError(f"bundle: {spec_path} must contain a JSON object, not {type(spec).__name__}")
    try:
        check_format_version(spec.get("format_version"), FORMAT_VERSION)
    except ValueError as error:
        raise BundleError(f"bundle in {spec_path}: {error}") from error
    if "name" in spec:
        _checked(check_string, "name", spec["name"], "bundle", folder)
    return spec, spec_path


def _section(spec: dict[str, Any], name: str) -> dict[str, Any]:
    section = spec.get(name)
    if not isinstance(section, dict):
        raise BundleError(f"{name}: bundle.json has no {name!r} section; see docs/bundle-format.md")
    return section


def _checked(check: Callable[[str, Any], _Value], field: str, value: Any, part: str, folder: Path) -> _Value:
    """Run a json_values check on one field of bundle.json; raise BundleError naming the part and the file."""
    try:
        return check(field, value)
    except ValueError as error:
        raise BundleError(f"{part} in {folder / BUNDLE_FILENAME}: {error}") from error


def _resolve(folder: Path, relative: Any, part: str, field: str) -> Path:
    """Return the file that ``field`` of bundle.json names, relative to the bundle folder; it must exist."""
    if relative is None or relative == "":
        raise BundleError(
            f"{part}: {folder / BUNDLE_FILENAME} names no file for it: set {field} to a path relative to "
            "the bundle folder"
        )
    if not isinstance(relative, str):
        raise BundleError(
            f"{part} in {folder / BUNDLE_FILENAME}: {field} {relative!r} is invalid: "
            "use a file path relative to the bundle folder, as a string"
        )
    path = folder / relative
    if not path.exists():
        raise BundleError(f"{part}: file {path} not found; restore it or fix its path in bundle.json")
    return path


def _read_settings(spec: dict[str, Any], spec_path: Path) -> InferenceSettings:
    try:
        return InferenceSettings.from_dict(spec.get("settings", {}))
    except (TypeError, ValueError) as error:
        raise BundleError(f"inference settings in {spec_path}: {error}") from error


def _read_base_model(
    folder: Path, section: dict[str, Any], allow_download: bool, token: str | None
) -> BaseModelSpec:
    kind = section.get("kind")
    if kind not in BASE_MODEL_KINDS:
        raise BundleError(f"base model: kind {kind!r} is invalid: use one of {', '.join(BASE_MODEL_KINDS)}")
    if kind == "hub":
        hub_id = section.get("hub_id")
        if hub_id is not None:
            _checked(check_string, "base_model.hub_id", hub_id, "base model", folder)
        if not hub_id:
            raise BundleError(
                "base model: kind 'hub' needs a 'hub_id' such as stable-diffusion-v1-5/stable-diffusion-v1-5"
            )
        if not allow_download:
            raise BundleError(
                f"base model: the bundle names the hub model {hub_id!r}; allow downloads "
                "(allow_download=True, or --allow-download) or point 'path' at a local diffusers folder"
            )
        from napari_anopilad.method.hub import download_base_model

        path = download_base_model(hub_id, token=token)
        _check_diffusers_folder(path)
        return BaseModelSpec(kind="diffusers", path=path, config=None, hub_id=hub_id)

    path = _resolve(folder, section.get("path"), "base model", "base_model.path")
    if kind == "diffusers":
        _check_diffusers_folder(path)
        return BaseModelSpec(kind=kind, path=path, config=None, hub_id=None)
    if not path.is_file():
        raise BundleError(f"base model: single-file checkpoint {path} is not a file")
    config = _resolve(folder, section.get("config"), "base model config", "base_model.config")
    _check_diffusers_folder(config, weights_required=False)
    return BaseModelSpec(kind=kind, path=path, config=config, hub_id=None)


def _check_diffusers_folder(path: Path, weights_required: bool = True) -> None:
    if not (path / "model_index.json").is_file():
        raise BundleError(f"base model: {path} has no model_index.json; use a folder saved by diffusers")
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / component).is_dir():
            raise BundleError(
                f"base model: {path} lacks the {component}/ folder of a Stable Diffusion pipeline"
            )
    if weights_required:
        for component in ("unet", "vae", "text_encoder"):
            if not any((path / component).glob("*.safetensors")) and not any(
                (path / component).glob("*.bin")
            ):
                raise BundleError(f"base model: {path / component} has no weights file")


def _read_lora(folder: Path, section: dict[str, Any]) -> LoraSpec:
    path = _resolve(folder, section.get("path"), "LoRA weights", "lora.path")
    if path.suffix != ".safetensors":
        raise BundleError(
            f"LoRA weights: {path} must be a .safetensors file as diffusers' save_lora_weights writes"
        )
    rank = _checked(check_integer, "lora.rank", section.get("rank", 4), "LoRA weights", folder)
    alpha = _checked(check_number, "lora.alpha", section.get("alpha", rank), "LoRA weights", folder)
    if rank < 1 or alpha <= 0:
        raise BundleError(
            f"LoRA weights in {folder / BUNDLE_FILENAME}: lora.rank {rank} and lora.alpha {alpha} are invalid: "
            "use the positive rank and alpha that the adapter was trained with"
        )
    targets = section.get("target_modules", list(LORA_TARGET_MODULES))
    if not isinstance(targets, list) or not targets or not all(isinstance(name, str) for name in targets):
        raise BundleError(
            f"LoRA weights in {folder / BUNDLE_FILENAME}: lora.target_modules {targets!r} is invalid: "
            f"use a list of module names such as {list(LORA_TARGET_MODULES)}"
        )
    return LoraSpec(path=path, rank=rank, alpha=alpha, target_modules=tuple(targets))


def _check_lora(lora: LoraSpec, base_model: BaseModelSpec) -> None:
    from napari_anopilad.method.lora import check_lora_weights

    unet_config = None
    if base_model.kind == "diffusers" and base_model.path is not None:
        unet_config = base_model.path / "unet" / "config.json"
    elif base_model.config is not None:
        unet_config = base_model.config / "unet" / "config.json"
    check_lora_weights(lora, unet_config if unet_config is not None and unet_config.is_file() else None)


def _read_conch(
    folder: Path, section: dict[str, Any], allow_download: bool, token: str | None
) -> tuple[Path, dict[str, Any]]:
    from napari_anopilad.method.conch_model import check_conch_checkpoint, read_conch_config

    config = read_conch_config(_resolve(folder, section.get("config"), "CONCH config", "conch.config"))
    for field in ("checkpoint", "hub_id", "hub_filename"):
        if section.get(field) is not None:
            _checked(check_string, f"conch.{field}", section[field], "CONCH checkpoint", folder)
    checkpoint_name = section.get("checkpoint")
    checkpoint = folder / checkpoint_name if checkpoint_name else None
    if checkpoint is None or not checkpoint.exists():
        hub_id = section.get("hub_id")
        if not hub_id:
            raise BundleError(
                f"CONCH checkpoint: file {checkpoint} not found; restore it or fix its path in bundle.json"
            )
        if not allow_download:
            raise BundleError(
                f"CONCH checkpoint: not found locally and the bundle names the gated hub repository {hub_id!r}; "
                "allow downloads (allow_download=True, or --allow-download) with a token that has access"
            )
        from napari_anopilad.method.hub import download_conch_checkpoint

        checkpoint = download_conch_checkpoint(
            hub_id, section.get("hub_filename", "pytorch_model.bin"), token=token
        )
    check_conch_checkpoint(config, checkpoint)
    return checkpoint, config


def _read_lpips(folder: Path, section: dict[str, Any]) -> tuple[str, Path]:
    from napari_anopilad.method.perceptual import LPIPS_NETS, check_lpips_backbone

    net = section.get("net", "vgg")
    if net not in LPIPS_NETS:
        raise BundleError(f"LPIPS backbone: net {net!r} is invalid: use one of {', '.join(LPIPS_NETS)}")
    backbone = _resolve(folder, section.get("backbone"), "LPIPS backbone", "lpips.backbone")
    check_lpips_backbone(net, backbone)
    return net, backbone


def _read_prompts(folder: Path, section: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Return the keyword bank and the caption templates that the ``prompts`` section names."""
    keyword_file = _resolve(folder, section.get("keywords"), "keyword bank", "prompts.keywords")
    template_file = _resolve(folder, section.get("templates"), "caption templates", "prompts.templates")
    return read_keywords(keyword_file), read_templates(template_file)


def _read_calibration(
    values: Any, settings: InferenceSettings, require_calibration: bool, spec_path: Path
) -> tuple[Calibration | None, str | None]:
    if values is None:
        note = (
            "calibration: the bundle has no calibration statistics; z-scores are computed within each slide"
        )
        if require_calibration:
            raise BundleError(note)
        return None, note
    calibration = Calibration.from_dict(values, spec_path)
    differences = calibration.differences(settings)
    if not differences:
        return calibration, None
    note = (
        f"calibration: measured under other settings than the bundle's ({'; '.join(differences)}); "
        "it is not used and z-scores are computed within each slide. Recalibrate under the bundle's settings"
    )
    if require_calibration:
        raise BundleError(note)
    logger.warning(note)
    warnings.warn(note, UserWarning, stacklevel=3)
    return None, note


def _base_model_files(base_model: BaseModelSpec) -> list[Path]:
    if base_model.kind == "single_file":
        assert base_model.path is not None and base_model.config is not None
        return [base_model.path, *_files_under(base_model.config)]
    assert base_model.path is not None
    return _files_under(base_model.path)


def _files_under(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _lpips_linear_layers(net: str) -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def _bundle_identity(
    folder: Path,
    weight_files: dict[str, list[Path]],
    conch_config: dict[str, Any],
    keywords: list[str],
    templates: list[str],
    settings: InferenceSettings,
) -> tuple[str, dict[str, str]]:
    record, part_hashes = _part_hashes(folder, weight_files)
    record_text = json.dumps(
        {
            "weights": record,
            "conch_config": conch_config,
            "keywords": keywords,
            "templates": templates,
            "settings": settings.to_dict(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(record_text.encode()).hexdigest()[:16], part_hashes


def _part_hashes(
    folder: Path, weight_files: dict[str, list[Path]]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Return each part's file hashes and each part's combined hash, reusing the hashes cached in ``folder``."""
    hashes = _FileHashCache(_cache_dir(folder) / "file-hashes.json")
    record = {part: [hashes.get(path) for path in paths] for part, paths in sorted(weight_files.items())}
    hashes.save()
    part_hashes = {
        part: hashlib.sha256("".join(file_hashes).encode()).hexdigest()[:16]
        for part, file_hashes in record.items()
    }
    return record, part_hashes


def _cache_dir(folder: Path) -> Path:
    cache = folder / CACHE_FOLDER
    try:
        cache.mkdir(exist_ok=True)
        probe = cache / ".write-test"
        probe.touch()
        probe.unlink()
        return cache
    except OSError:
        # A read-only bundle (a shared drive): keep derived files in the user's cache instead.
        digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "napari-anopilad" / digest
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


class _FileHashCache:
    """SHA-256 of files, reused while a file's size and modification time are unchanged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.entries = {}
        self.changed = False

    def get(self, file: Path) -> str:
        from napari_anopilad.method.weights import hash_file

        stat = file.stat()
        key = str(file.resolve())
        entry = self.entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return str(entry["sha256"])
        digest = hash_file(file)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        except OSError as error:
            logger.debug("file hashes not cached in %s: %s", self.path, error)
