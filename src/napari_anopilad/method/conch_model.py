"""CONCH (a CoCa vision-language model for pathology): strict loading, image preprocessing, tokenization.

The ``conch`` package's own loader calls ``load_state_dict(strict=False)`` and drops the result, so a
checkpoint with missing keys would load silently with random weights. Here every key and shape is compared.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

with warnings.catch_warnings():
    # conch imports timm.models.layers, which timm 1.x marks deprecated on every import.
    warnings.simplefilter("ignore", FutureWarning)
    from conch.open_clip_custom import CoCa, get_tokenizer
    from conch.open_clip_custom.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from conch.open_clip_custom.transform import image_transform

from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.weights import compare_state_dict, read_state_dict, read_tensor_shapes

PART = "CONCH checkpoint"
# CONCH's text context is 128 tokens; the last position is taken by the appended class token.
TEXT_CONTEXT_LENGTH = 128


def read_conch_config(path: Path) -> dict[str, Any]:
    """Read a CoCa model config (the layout of ``conch_ViT-B-16.json``)."""
    if not path.is_file():
        raise BundleError(f"CONCH config: file {path} not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"CONCH config: {path} is not valid JSON ({error})") from error
    required = ("embed_dim", "embed_dim_caption", "vision_cfg", "text_cfg", "multimodal_cfg")
    missing = [key for key in required if key not in config]
    if missing:
        raise BundleError(f"CONCH config: {path} lacks {missing}; start from conch's conch_ViT-B-16.json")
    return config


def build_conch(config: dict[str, Any], device: str | torch.device = "cpu") -> CoCa:
    """Build an uninitialised CoCa from a config dict; ``device="meta"`` builds it without memory."""
    arguments = copy.deepcopy(config)
    arguments.pop("custom_text", None)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return CoCa(**arguments)


def expected_conch_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Return the parameter name to shape map that a checkpoint for ``config`` must have."""
    model = build_conch(config, device="meta")
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_conch_checkpoint(config: dict[str, Any], checkpoint_path: Path) -> None:
    """Raise a ValueError unless the checkpoint has exactly the keys and shapes of the config's model."""
    actual = read_tensor_shapes(checkpoint_path, PART)
    if actual and all(key.startswith("module.") for key in actual):
        actual = {key.removeprefix("module."): shape for key, shape in actual.items()}
    compare_state_dict(expected_conch_shapes(config), actual, PART, checkpoint_path)


def load_conch(config: dict[str, Any], checkpoint_path: Path, device: str | torch.device = "cpu") -> CoCa:
    """Build CoCa from ``config``, load the checkpoint strictly and return it in eval mode on ``device``."""
    state_dict = read_state_dict(checkpoint_path, PART)
    expected = expected_conch_shapes(config)
    compare_state_dict(
        expected, {key: tuple(value.shape) for key, value in state_dict.items()}, PART, checkpoint_path
    )
    model = build_conch(config, device="cpu")
    model.load_state_dict(state_dict, strict=True)
    model.visual.image_mean = OPENAI_DATASET_MEAN
    model.visual.image_std = OPENAI_DATASET_STD
    return model.to(device).eval()


def conch_image_size(model: CoCa) -> int:
    """Return the square input size of the vision tower in pixels (448 for CONCH ViT-B/16)."""
    return int(model.visual.image_size[0])


def preprocess_images(images_uint8: np.ndarray, image_size: int) -> torch.Tensor:
    """Apply CONCH's own preprocessing: bicubic resize to ``image_size``, centre crop, CLIP mean and std.

    Parameters
    ----------
    images_uint8
        ``(n, height, width, 3)`` RGB patches.
    image_size
        Side of the model input in pixels.

    Returns
    -------
    torch.Tensor
        ``(n, 3, image_size, image_size)`` float32.
    """
    transform = image_transform(image_size, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    tensors = [transform(Image.fromarray(np.ascontiguousarray(image))) for image in images_uint8]
    return torch.stack(tensors)


@torch.no_grad()
def encode_images(model: CoCa, images_uint8: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """Return L2-normalised contrastive image embeddings ``(n, embed_dim)`` on the CPU, in float32."""
    pixels = preprocess_images(images_uint8, conch_image_size(model)).to(device)
    embeddings = model.encode_image(pixels, proj_contrast=True, normalize=True)
    return embeddings.float().cpu()


def tokenize_texts(texts: list[str]) -> torch.Tensor:
    """Tokenize with CONCH's byte-level BPE tokenizer into ``(n, 128)`` token ids, as ``conch`` does.

    ``conch.open_clip_custom.tokenize`` calls ``batch_encode_plus``, which transformers 5 removed. This is the
    same encoding through the tokenizer's ``__call__``: 127 tokens with start and end marks, padded, and one
    more pad that ``encode_text`` drops to make room for the class token.
    """
    tokenizer = get_tokenizer()
    encoded = tokenizer(
        texts,
        max_length=TEXT_CONTEXT_LENGTH - 1,
        add_special_tokens=True,
        return_token_type_ids=False,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return F.pad(encoded["input_ids"], (0, 1), value=tokenizer.pad_token_id)


@torch.no_grad()
def encode_texts(model: CoCa, texts: list[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """Return L2-normalised text embeddings ``(n, embed_dim)`` on the CPU, with CONCH's own tokenizer."""
    tokens = tokenize_texts(texts).to(device)
    embeddings = model.encode_text(tokens, normalize=True)
    return embeddings.float().cpu()
