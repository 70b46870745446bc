"""A bundle with the full-size architectures and random weights, for timing the whole scorer on a GPU.

Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder, a rank-4 LoRA, CONCH ViT-B/16 and LPIPS
with a VGG16 backbone, built from their published configurations and saved in the bundle layout that
:func:`napari_anopilad.method.bundle.load_bundle` reads. Nothing is downloaded. The bundle is marked as a
demo because its scores mean nothing; only its timing and memory use are meaningful.

``tiny=True`` builds the same layout with small widths (the demo bundle's CONCH and the throughput
benchmark's reduced UNet), so the code path can be tested on a CPU in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from napari_anopilad.method.bundle import BUNDLE_FILENAME, FORMAT_VERSION, LORA_TARGET_MODULES
from napari_anopilad.method.demo import (
    DATA_DIR,
    DEMO_CONCH_CONFIG,
    LORA_ALPHA,
    LORA_RANK,
    SD15_SCHEDULER_CONFIG,
    _save_lora,
    build_clip_tokenizer,
)
from napari_anopilad.method.settings import InferenceSettings
from throughput import REDUCED_UNET_CONFIG, SD15_UNET_CONFIG

# Stable Diffusion 1.5's vae/config.json.
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}

# Stable Diffusion 1.5's text_encoder/config.json (CLIP ViT-L/14's text tower).
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    # The token ids of the tokenizer built by build_clip_tokenizer (SD1.5's own config keeps older ids).
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    **SD15_TEXT_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}


def conch_vit_b16_config() -> dict[str, Any]:
    """Return CONCH ViT-B/16's configuration as the ``conch`` package ships it (conch_ViT-B-16.json)."""
    import conch.open_clip_custom

    path = Path(conch.open_clip_custom.__file__).parent / "model_configs" / "conch_ViT-B-16.json"
    config: dict[str, Any] = json.loads(path.read_text())
    # The vision tower's width, depth and heads are the ViT-B/16 defaults of the package's CLIPVisionCfg.
    return config


def make_benchmark_bundle(folder: str | Path, tiny: bool = False, device: str = "cpu") -> Path:
    """Build the random-weight bundle in ``folder`` (created; must be empty or absent) and return the folder.

    The weights are initialised on ``device``, because a GPU initialises SD1.5's 860 million UNet
    parameters in a fraction of a CPU's time. They are saved from the CPU either way.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from napari_anopilad.method.conch_model import build_conch
    from napari_anopilad.method.perceptual import build_backbone_features

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"benchmark bundle: {folder} is not empty; give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    text_config = TINY_TEXT_CONFIG if tiny else SD15_TEXT_CONFIG
    unet_config = {**(REDUCED_UNET_CONFIG if tiny else SD15_UNET_CONFIG)}
    unet_config["cross_attention_dim"] = text_config["hidden_size"]
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD15_VAE_CONFIG))
    tokenizer = build_clip_tokenizer(folder / "tokenizer-source")
    pipeline: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to("cpu").save_pretrained(folder / "sd15", safe_serialization=True)
    shutil.rmtree(folder / "tokenizer-source")
    del pipeline, unet, vae, text_encoder

    _save_lora(folder / "lora", text_config["hidden_size"], folder / "sd15" / "unet")

    conch_config = DEMO_CONCH_CONFIG if tiny else conch_vit_b16_config()
    conch = build_conch(conch_config)
    with torch.no_grad():
        # CoCa leaves the caption decoder's projection uninitialised (torch.empty).
        torch.nn.init.normal_(
            conch.text_decoder.text_projection, std=conch_config["multimodal_cfg"]["width"] ** -0.5
        )
    (folder / "conch").mkdir()
    save_file(
        {key: value.detach().contiguous() for key, value in conch.state_dict().items()},
        str(folder / "conch" / "conch.safetensors"),
    )
    (folder / "conch" / "config.json").write_text(json.dumps(conch_config, indent=2))

    lpips_net = "alex" if tiny else "vgg"
    (folder / "lpips").mkdir()
    features = build_backbone_features(lpips_net)
    save_file(
        {key: value.contiguous() for key, value in features.state_dict().items()},
        str(folder / "lpips" / f"{lpips_net}_features.safetensors"),
    )

    (folder / "prompts").mkdir()
    for name in ("normal_lymph_node_keywords.txt", "keyword_templates.txt"):
        shutil.copyfile(DATA_DIR / name, folder / "prompts" / name)

    spec = {
        "format_version": FORMAT_VERSION,
        "name": f"benchmark bundle ({'tiny' if tiny else 'SD1.5 and CONCH ViT-B/16'} architecture, random weights)",
        "demo": True,
        "base_model": {"kind": "diffusers", "path": "sd15"},
        "lora": {
            "path": "lora/pytorch_lora_weights.safetensors",
            "rank": LORA_RANK,
            "alpha": LORA_ALPHA,
            "target_modules": list(LORA_TARGET_MODULES),
        },
        "conch": {"checkpoint": "conch/conch.safetensors", "config": "conch/config.json"},
        "lpips": {"net": lpips_net, "backbone": f"lpips/{lpips_net}_features.safetensors"},
        "prompts": {
            "keywords": "prompts/normal_lymph_node_keywords.txt",
            "templates": "prompts/keyword_templates.txt",
        },
        "settings": InferenceSettings().to_dict(),
    }
    (folder / BUNDLE_FILENAME).write_text(json.dumps(spec, indent=2) + "\n")
    return folder
