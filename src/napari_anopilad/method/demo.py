"""A tiny demo bundle: the real model classes with random weights, saved in their real on-disk layouts.

Its scores mean nothing; it exists so that tests and the demo run the real loading and scoring code on a CPU
in seconds. Everything it produces is marked ``demo``.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_anopilad.method.bundle import BUNDLE_FILENAME, FORMAT_VERSION, LORA_TARGET_MODULES, Calibration
from napari_anopilad.method.settings import SCORES, InferenceSettings

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Camelyon17 non-tumour tiles (CC0) in the repository's test data; used for the demo calibration when present.
REPOSITORY_NORMAL_PATCHES = Path(__file__).resolve().parents[3] / "tests" / "data" / "patches" / "camelyon17"
DEMO_SEED = 20250923
TEXT_WIDTH = 32
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
LORA_RANK = 4
LORA_ALPHA = 4

# SD1.5's scheduler_config.json (PNDM with PLMS steps only, "leading" spacing with offset 1).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# The CONCH ViT-B/16 config (conch_ViT-B-16.json) with every width, depth and query count cut down. The input
# stays 448 px with 16 px patches so CONCH's preprocessing runs unchanged; the vision width must divide by
# the ViT's head count, the contrastive and caption widths by the attention pooler's head count.
DEMO_CONCH_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "embed_dim_caption": 16,
    "vision_cfg": {
        "image_size": 448,
        "patch_size": 16,
        "layers": 1,
        "width": 16,
        "num_heads": 2,
        "mlp_ratio": 2,
        "attentional_pool_caption": True,
        "attentional_pool_contrast": True,
        "attn_pooler_heads": 2,
        "n_queries_contrast": 1,
        "n_queries_caption": 4,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 128,
        "vocab_size": 32007,
        "width": 16,
        "heads": 2,
        "layers": 1,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {"context_length": 128, "vocab_size": 32007, "width": 16, "heads": 2, "layers": 1},
    "custom_text": True,
}

# The demo's inference settings: the published defaults except a 20-step grid, where start 674 takes 14 UNet
# steps instead of 68, to keep the demo fast on a CPU.
DEMO_SETTINGS = InferenceSettings(num_inference_steps=20)


def make_demo_bundle(folder: str | Path, calibration_images: np.ndarray | None = None) -> Path:
    """Build the demo bundle in ``folder`` (created; must be empty or absent) and return the folder.

    Parameters
    ----------
    folder
        Target folder.
    calibration_images
        ``(n, 256, 256, 3)`` uint8 normal patches to measure the calibration statistics on (n >= 2). By default
        the Camelyon17 non-tumour tiles of the repository's test data, or tiles of the packaged
        CMU-1-Small-Region slide when the package is installed without the repository.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"demo bundle: {folder} is a file, not a folder: give a new or empty folder")
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"demo bundle: {folder} is not empty; give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(DEMO_SEED)

    text_encoder = _save_base_model(folder / "sd15")
    _save_lora(folder / "lora", text_encoder.config.hidden_size, folder / "sd15" / "unet")
    _save_conch(folder / "conch")
    _save_lpips_backbone(folder / "lpips")
    prompts = folder / "prompts"
    prompts.mkdir()
    shutil.copyfile(DATA_DIR / "normal_lymph_node_keywords.txt", prompts / "normal_lymph_node_keywords.txt")
    shutil.copyfile(DATA_DIR / "keyword_templates.txt", prompts / "keyword_templates.txt")

    spec = {
        "format_version": FORMAT_VERSION,
        "name": "AnoPILaD demo (tiny random models; scores mean nothing)",
        "demo": True,
        "base_model": {"kind": "diffusers", "path": "sd15"},
        "lora": {
            "path": "lora/pytorch_lora_weights.safetensors",
            "rank": LORA_RANK,
            "alpha": LORA_ALPHA,
            "target_modules": list(LORA_TARGET_MODULES),
        },
        "conch": {"checkpoint": "conch/conch.safetensors", "config": "conch/config.json"},
        "lpips": {"net": "alex", "backbone": "lpips/alex_features.safetensors"},
        "prompts": {
            "keywords": "prompts/normal_lymph_node_keywords.txt",
            "templates": "prompts/keyword_templates.txt",
        },
        "settings": DEMO_SETTINGS.to_dict(),
    }
    _write_spec(folder, spec)

    images = calibration_images if calibration_images is not None else demo_normal_patches()
    spec["calibration"] = measure_calibration(folder, images).to_dict()
    _write_spec(folder, spec)
    save_demo_triage_reference(folder, images)
    logger.info("demo bundle written to %s", folder)
    return folder


def measure_calibration(folder: Path, images_uint8: np.ndarray) -> Calibration:
    """Score normal patches with the bundle in ``folder`` and return the mean and population std of each score."""
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.scorer import AnoPILaDScorer

    if len(images_uint8) < 2:
        raise ValueError(f"calibration needs at least 2 normal patches, got {len(images_uint8)}")
    bundle = load_bundle(folder)
    scorer = AnoPILaDScorer(bundle)
    keys = [("calibration", index, 0) for index in range(len(images_uint8))]
    scores = scorer.score(images_uint8, keys)
    mean = {name: float(np.mean(scores.values(name))) for name in SCORES}
    std = {name: float(np.std(scores.values(name), ddof=0)) for name in SCORES}
    return Calibration(mean=mean, std=std, count=len(images_uint8), settings=bundle.settings)


def save_demo_triage_reference(folder: Path, images_uint8: np.ndarray) -> Path:
    """Build the triage reference of the bundle in ``folder`` from normal patches and save it into ``folder/triage/``.

    Each patch is used four times, rotated by 0, 90, 180 and 270 degrees. The rotations by 0 and 180 degrees go
    into the memory bank and the other two calibrate, so three normal tiles give both sets the two or more
    patches that the reference needs. Rotated copies of the same tiles make a poor calibration set, which is
    acceptable only because the demo's scores mean nothing. Returns the reference's tensors file.
    """
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.conch_model import encode_images
    from napari_anopilad.method.prompts import (
        cached_keyword_embeddings,
        keyword_cache_key,
        keyword_similarities,
    )
    from napari_anopilad.method.triage import build_triage_reference, save_triage_reference

    images = np.asarray(images_uint8)
    if len(images) < 1:
        raise ValueError("the demo triage reference needs at least 1 normal patch, got 0")
    train_images = np.concatenate([images, np.rot90(images, 2, axes=(1, 2))])
    validation_images = np.concatenate([np.rot90(images, 1, axes=(1, 2)), np.rot90(images, 3, axes=(1, 2))])

    bundle = load_bundle(folder)
    conch = bundle.load_conch("cpu")
    keyword_embeddings = cached_keyword_embeddings(bundle, conch, torch.device("cpu"))
    train_embeddings = encode_images(conch, np.ascontiguousarray(train_images))
    validation_embeddings = encode_images(conch, np.ascontiguousarray(validation_images))
    conch_hash = bundle.part_hashes["conch"]
    reference = build_triage_reference(
        train_embeddings,
        keyword_similarities(train_embeddings, keyword_embeddings.cpu()).numpy(),
        validation_embeddings,
        keyword_similarities(validation_embeddings, keyword_embeddings.cpu()).numpy(),
        conch_hash=conch_hash,
        keyword_key=keyword_cache_key(conch_hash, bundle.keywords, bundle.templates),
        bank_size=len(train_images),
        seed=DEMO_SEED,
        demo=True,
        sources={
            "description": "demo normal tiles; rotations by 0 and 180 degrees in the bank, 90 and 270 for calibration",
            "train_count": len(train_images),
            "validation_count": len(validation_images),
        },
    )
    return save_triage_reference(reference, folder)


def demo_normal_patches() -> np.ndarray:
    """Return real normal H&E patches ``(n, 256, 256, 3)`` for the demo calibration.

    The Camelyon17 tiles are 224 px at 0.25 um/px; they are resized to 256 px with bicubic interpolation,
    which is fine for a demo whose scores mean nothing.
    """
    from PIL import Image

    tiles = sorted(REPOSITORY_NORMAL_PATCHES.glob("tile_noncancer_*.png"))
    if len(tiles) >= 2:
        images = []
        for path in tiles:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB").resize((256, 256), Image.Resampling.BICUBIC)))
        return np.stack(images)

    import tifffile

    # Three 256 px tiles from the tissue in the middle of the packaged CC0 slide.
    slide = tifffile.imread(DATA_DIR / "CMU-1-Small-Region.svs", key=0)
    y_level0, x_level0 = slide.shape[0] // 2, slide.shape[1] // 2
    return np.stack(
        [
            slide[y_level0 : y_level0 + 256, x_level0 + 256 * i : x_level0 + 256 * (i + 1), :3]
            for i in range(3)
        ]
    )


def build_clip_tokenizer(folder: Path) -> Any:
    """Write SD1.5's CLIP BPE vocabulary as vocab.json and merges.txt and return the tokenizer loaded from them.

    The vocabulary is built from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` as CLIP builds it: the 256 byte
    symbols, the same with the end-of-word mark, the first 48,894 merges, then the two special tokens (49,408).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merge_count = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = lines[1 : 1 + merge_count]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"the CLIP vocabulary has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=CLIP_CONTEXT_LENGTH,
    )
    return tokenizer


def _save_base_model(folder: Path) -> Any:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(folder / "tokenizer-source")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_CONTEXT_LENGTH,
            projection_dim=TEXT_WIDTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    # Cross-attention only at the 8x8 level: attention over 64 tokens instead of 1,024 keeps the UNet cheap on a CPU.
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    # Four blocks downsample three times: 256 px patches give 4x32x32 latents, as in SD1.5.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=256,
        scaling_factor=0.18215,
    )
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
    pipeline.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer-source")
    return text_encoder


def _save_lora(folder: Path, text_width: int, unet_folder: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        init_lora_weights="gaussian",
        target_modules=list(LORA_TARGET_MODULES),
    )
    unet.add_adapter(config)
    # Gaussian init leaves B at zero (the adapter starts as the identity); small random B makes it change the UNet.
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    state_dict = get_peft_model_state_dict(unet)
    metadata = {"r": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": list(LORA_TARGET_MODULES)}
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state_dict, safe_serialization=True, unet_lora_adapter_metadata=metadata
    )


def _save_conch(folder: Path) -> None:
    from safetensors.torch import save_file

    from napari_anopilad.method.conch_model import build_conch

    folder.mkdir(parents=True)
    model = build_conch(DEMO_CONCH_CONFIG)
    with torch.no_grad():
        # CoCa leaves the caption decoder's projection as torch.empty (its init method is never called).
        torch.nn.init.normal_(
            model.text_decoder.text_projection, std=DEMO_CONCH_CONFIG["multimodal_cfg"]["width"] ** -0.5
        )
    state_dict = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state_dict, str(folder / "conch.safetensors"))
    (folder / "config.json").write_text(json.dumps(DEMO_CONCH_CONFIG, indent=2))


def _save_lpips_backbone(folder: Path) -> None:
    from safetensors.torch import save_file

    from napari_anopilad.method.perceptual import build_backbone_features

    folder.mkdir(parents=True)
    features = build_backbone_features("alex")
    save_file(
        {key: value.contiguous() for key, value in features.state_dict().items()},
        str(folder / "alex_features.safetensors"),
    )


def _write_spec(folder: Path, spec: dict[str, Any]) -> None:
    (folder / BUNDLE_FILENAME).write_text(json.dumps(spec, indent=2) + "\n")
