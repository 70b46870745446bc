"""Checks of the UNet LoRA weights file against the adapter shape the bundle declares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.weights import read_safetensors_metadata, read_tensor_shapes

if TYPE_CHECKING:
    from napari_anopilad.method.bundle import LoraSpec

PART = "LoRA weights"
# Key suffixes of the down (A) and up (B) matrices: peft's names, and the older diffusers names.
DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight")
UP_SUFFIXES = (".lora_B.weight", ".lora.up.weight")
# diffusers stores the peft LoraConfig as JSON under this safetensors metadata key, each field prefixed "unet.".
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def check_lora_weights(lora: LoraSpec, unet_config_path: Path | None) -> None:
    """Raise a ValueError unless the file is a UNet LoRA with the declared rank, alpha and target modules.

    When ``unet_config_path`` is given, every adapted layer must also exist in that UNet with matching
    input and output sizes.
    """
    shapes = read_tensor_shapes(lora.path, PART)
    if not shapes:
        raise BundleError(f"{PART}: {lora.path} contains no tensors")
    foreign = sorted(key for key in shapes if not key.startswith("unet."))
    if foreign:
        raise BundleError(
            f"{PART}: {lora.path} has keys outside the UNet ({foreign[:3]}); AnoPILaD adapts the UNet only, "
            "so save the adapter with save_lora_weights(unet_lora_layers=...)"
        )

    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name = key.removeprefix("unet.")
        for suffix, role in [(suffix, "down") for suffix in DOWN_SUFFIXES] + [
            (suffix, "up") for suffix in UP_SUFFIXES
        ]:
            if name.endswith(suffix):
                modules.setdefault(name.removesuffix(suffix), {})[role] = shape
                break
        else:
            if not name.endswith(".alpha"):
                raise BundleError(
                    f"{PART}: {lora.path} has the key {key!r} that is neither a LoRA matrix nor an alpha"
                )

    ranks = sorted({parts["down"][0] for parts in modules.values() if "down" in parts})
    incomplete = sorted(name for name, parts in modules.items() if set(parts) != {"down", "up"})
    if incomplete:
        raise BundleError(f"{PART}: {lora.path} lacks the down or up matrix of {incomplete[:3]}")
    if ranks != [lora.rank]:
        raise BundleError(
            f"{PART}: {lora.path} has rank {ranks[0] if len(ranks) == 1 else ranks} but the bundle declares "
            f"rank {lora.rank}; use the adapter trained with rank {lora.rank} or fix 'rank' in bundle.json"
        )

    targets = sorted({_target_of(name) for name in modules})
    if targets != sorted(lora.target_modules):
        raise BundleError(
            f"{PART}: {lora.path} adapts {targets} but the bundle declares {sorted(lora.target_modules)}; "
            "use the adapter trained on those modules"
        )

    alpha = _stored_alpha(lora.path)
    if alpha is not None and alpha != lora.alpha:
        raise BundleError(
            f"{PART}: {lora.path} stores alpha {alpha} but the bundle declares alpha {lora.alpha}"
        )
    if alpha is None and lora.alpha != lora.rank:
        # Without stored metadata diffusers loads the adapter with alpha equal to the rank.
        raise BundleError(
            f"{PART}: {lora.path} stores no alpha, so diffusers would use alpha = rank = {lora.rank}, but the "
            f"bundle declares alpha {lora.alpha}; save it with unet_lora_adapter_metadata"
        )

    if unet_config_path is not None:
        _check_against_unet(modules, unet_config_path, lora.path)


def _target_of(module_name: str) -> str:
    return "to_out.0" if module_name.endswith("to_out.0") else module_name.rsplit(".", 1)[-1]


def _stored_alpha(path: Path) -> float | None:
    metadata = read_safetensors_metadata(path)
    if ADAPTER_METADATA_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[ADAPTER_METADATA_KEY])
    except json.JSONDecodeError:
        return None
    value = config.get("unet.lora_alpha")
    return float(value) if value is not None else None


def _check_against_unet(
    modules: dict[str, dict[str, tuple[int, ...]]], unet_config_path: Path, path: Path
) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads(unet_config_path.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    linear_shapes = {
        name: tuple(module.weight.shape)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    for name, parts in sorted(modules.items()):
        if name not in linear_shapes:
            raise BundleError(f"{PART}: {path} adapts {name!r}, which is not a linear layer of the base UNet")
        out_features, in_features = linear_shapes[name]
        if parts["down"][1] != in_features or parts["up"][0] != out_features:
            raise BundleError(
                f"{PART}: {path} adapts {name!r} with sizes {parts['down'][1]} -> {parts['up'][0]} but the base "
                f"UNet layer is {in_features} -> {out_features}; the adapter belongs to another base model"
            )
