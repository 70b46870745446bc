"""Loading of the Stable Diffusion 1.5 pipeline of a bundle, with the UNet LoRA fused into its weights."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

if TYPE_CHECKING:
    from napari_anopilad.method.bundle import Bundle

logger = logging.getLogger(__name__)

ADAPTER_NAME = "anopilad"


def load_pipeline(bundle: Bundle, device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """Load the bundle's SD1.5 pipeline in float32 on ``device`` with its LoRA fused into the UNet.

    Fusing adds ``alpha / rank * B @ A`` to each adapted weight once, so inference runs the plain UNet.
    """
    base = bundle.base_model
    assert base.path is not None
    common = {
        "dtype": torch.float32,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
        "local_files_only": True,
    }
    # diffusers warns that the safety checker is off; it is off on purpose for tissue patches.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        if base.kind == "single_file":
            # NOTE: this path is not covered by tests: it needs a real single-file SD1.5 checkpoint.
            pipeline = StableDiffusionPipeline.from_single_file(
                str(base.path), config=str(base.config), **common
            )
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(str(base.path), **common)
        pipeline.load_lora_weights(
            str(bundle.lora.path.parent), weight_name=bundle.lora.path.name, adapter_name=ADAPTER_NAME
        )
        pipeline.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[ADAPTER_NAME])
        pipeline.unload_lora_weights()
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    pipeline.set_progress_bar_config(disable=True)
    logger.debug("loaded the base model %s with the LoRA %s", base.path, bundle.lora.path)
    return pipeline.to(device)
