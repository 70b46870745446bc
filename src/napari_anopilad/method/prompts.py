"""Keyword prompts: pick the normal-tissue keywords nearest a patch in CONCH space and weight them.

Per patch: cosine similarity (raw, no logit scale) between the CONCH image embedding and each keyword's text
embedding; the ``top_k`` highest keywords; weights = similarity / median of the ``top_k``; a Compel prompt
``a histopathological photograph of (kw1)++ and (kw2)+ and (kw3) and (kw4)- and (kw5)--``. In Compel each ``+``
multiplies a fragment's weight by 1.1 and each ``-`` by 0.9, so the marks round the weights to powers of those.

The selection, weight and formatting functions use only the standard library and numpy.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from compel import Compel
    from conch.open_clip_custom import CoCa
    from transformers import CLIPTextModel, CLIPTokenizer

    from napari_anopilad.method.bundle import Bundle, PromptParts

logger = logging.getLogger(__name__)

PROMPT_PREFIX = "a histopathological photograph of "
KEYWORD_SEPARATOR = " and "
UPWEIGHT_STEP = 1.1
DOWNWEIGHT_STEP = 0.9
# A weight exactly halfway between 1 and a step: for upweighting the tie goes to 1 (no mark),
# for downweighting it goes to 0.9 (a mark).
UPWEIGHT_MIDPOINT = (1.0 + UPWEIGHT_STEP) / 2
DOWNWEIGHT_MIDPOINT = (1.0 + DOWNWEIGHT_STEP) / 2
# Bounds the mark loop: a weight of 0 or below would otherwise take ``-`` marks forever.
# 20 marks are 1.1**20 = 6.7 and 0.9**20 = 0.12, far outside what cosine similarities of one image produce.
MAX_MARKS = 20
# Compel reads parentheses as weight groups, so they are escaped inside keywords.
COMPEL_ESCAPES = {"(": r"\(", ")": r"\)"}


@dataclass(frozen=True)
class KeywordPrompt:
    """The keywords chosen for one patch, best first, with their similarities, weights and prompt string."""

    keywords: list[str]
    similarities: list[float]
    weights: list[float]
    prompt: str


def top_keyword_indices(similarities: Sequence[float], top_k: int = 5) -> list[int]:
    """Return the indices of the ``top_k`` highest similarities, highest first; equal values keep bank order."""
    values = np.asarray(similarities, dtype=np.float64)
    if values.ndim != 1 or len(values) < top_k:
        raise ValueError(
            f"similarities has shape {values.shape}: need one value per keyword, at least {top_k}"
        )
    order = np.argsort(-values, kind="stable")
    return [int(index) for index in order[:top_k]]


def keyword_weights(top_similarities: Sequence[float]) -> list[float]:
    """Divide each of the selected similarities (highest first) by their median.

    Raises
    ------
    ValueError
        When the median is not positive: the weights would flip sign, so the CONCH model does not fit the bank.
    """
    values = np.asarray(top_similarities, dtype=np.float64)
    median = float(np.median(values))
    if not median > 0:
        raise ValueError(
            f"the median keyword similarity is {median:.4f}, but weights need a positive median: "
            "the CONCH checkpoint does not match the keyword bank"
        )
    return [float(value / median) for value in values]


def keyword_marks(weight: float, rank: int, top_k: int = 5) -> str:
    """Return the Compel marks for the keyword at ``rank`` (0 is the best) with ``weight``.

    Ranks before the middle rank take ``+`` while the weight is nearer 1.1 than 1 (a tie goes to 1), dividing
    the weight by 1.1 after each mark. The middle rank of an odd ``top_k`` takes none. Later ranks take ``-``
    while the weight is nearer 0.9 than 1 (a tie goes to 0.9), dividing by 0.9 after each mark.
    """
    middle = top_k // 2
    marks = ""
    if rank < middle:
        while weight > UPWEIGHT_MIDPOINT and len(marks) < MAX_MARKS:
            marks += "+"
            weight /= UPWEIGHT_STEP
    elif rank > middle or (top_k % 2 == 0 and rank == middle):
        while weight <= DOWNWEIGHT_MIDPOINT and len(marks) < MAX_MARKS:
            marks += "-"
            weight /= DOWNWEIGHT_STEP
    return marks


def escape_keyword(keyword: str) -> str:
    """Escape the characters that Compel would read as syntax (parentheses)."""
    return "".join(COMPEL_ESCAPES.get(character, character) for character in keyword)


def format_keyword(keyword: str, weight: float, rank: int, top_k: int, style: str = "marks") -> str:
    """Return one keyword's weighted group in Compel syntax: ``(keyword)++`` or ``(keyword)1.07``."""
    group = f"({escape_keyword(keyword)})"
    if style == "marks":
        return group + keyword_marks(weight, rank, top_k)
    if style == "numeric":
        return f"{group}{weight:.2f}"
    raise ValueError(f"prompt style {style!r} is invalid: use 'marks' or 'numeric'")


def format_prompt(keywords: Sequence[str], weights: Sequence[float], style: str = "marks") -> str:
    """Build the Compel prompt string from keywords (best first) and their weights.

    ``style="marks"`` writes ``(keyword)++``; ``style="numeric"`` writes ``(keyword)1.07`` with two decimals.
    """
    if len(keywords) != len(weights):
        raise ValueError(f"got {len(keywords)} keywords but {len(weights)} weights")
    groups = [
        format_keyword(keyword, weight, rank, len(keywords), style)
        for rank, (keyword, weight) in enumerate(zip(keywords, weights, strict=True))
    ]
    return PROMPT_PREFIX + KEYWORD_SEPARATOR.join(groups)


def build_keyword_prompt(
    similarities: Sequence[float], keywords: Sequence[str], top_k: int = 5, style: str = "marks"
) -> KeywordPrompt:
    """Select the ``top_k`` keywords for one patch from its similarities to the whole bank and format the prompt."""
    if len(similarities) != len(keywords):
        raise ValueError(f"got {len(similarities)} similarities for {len(keywords)} keywords")
    indices = top_keyword_indices(similarities, top_k)
    chosen = [keywords[index] for index in indices]
    top_similarities = [float(similarities[index]) for index in indices]
    weights = keyword_weights(top_similarities)
    return KeywordPrompt(
        keywords=chosen,
        similarities=top_similarities,
        weights=weights,
        prompt=format_prompt(chosen, weights, style),
    )


def fill_template(template: str, keyword: str) -> str:
    """Put the keyword where the template has ``{}``; other braces in the keyword stay as they are."""
    return template.replace("{}", keyword, 1)


def keyword_text_embeddings(
    model: CoCa,
    keywords: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Embed each keyword with CONCH, averaged over the caption templates.

    Each template's embedding is L2-normalised, the mean over templates is taken and L2-normalised again.

    Returns
    -------
    torch.Tensor
        ``(len(keywords), embed_dim)`` float32 on the CPU.
    """
    import torch

    from napari_anopilad.method.conch_model import encode_texts

    texts = [fill_template(template, keyword) for keyword in keywords for template in templates]
    chunks = [
        encode_texts(model, texts[start : start + batch_size], device)
        for start in range(0, len(texts), batch_size)
    ]
    per_template = torch.cat(chunks).reshape(len(keywords), len(templates), -1)
    per_template = torch.nn.functional.normalize(per_template, dim=-1)
    return torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)


def keyword_cache_key(conch_hash: str, keywords: Sequence[str], templates: Sequence[str]) -> str:
    """Return the cache key of keyword embeddings: the CONCH weights' hash and the exact keyword and template texts."""
    text = json.dumps({"conch": conch_hash, "keywords": list(keywords), "templates": list(templates)})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cached_keyword_embeddings(
    bundle: Bundle | PromptParts, model: CoCa | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Return the bundle's keyword embeddings, computing them once and storing them in the bundle's cache."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    key = keyword_cache_key(bundle.part_hashes["conch"], bundle.keywords, bundle.templates)
    path = bundle.cache_dir / f"keyword-embeddings-{key}.safetensors"
    if path.is_file():
        try:
            embeddings = load_file(str(path))["embeddings"]
            if embeddings.shape[0] == len(bundle.keywords):
                return embeddings
        except (SafetensorError, OSError, KeyError) as error:
            logger.warning("keyword embedding cache %s is unreadable (%s); computing it again", path, error)

    if model is None:
        model = bundle.load_conch(device)
    embeddings = keyword_text_embeddings(model, bundle.keywords, bundle.templates, device)
    temporary = path.with_suffix(".tmp")
    try:
        save_file({"embeddings": embeddings.contiguous()}, str(temporary))
        temporary.replace(path)
    except OSError as error:
        logger.warning("keyword embeddings not cached in %s: %s", path, error)
    return embeddings


def keyword_similarities(image_embeddings: torch.Tensor, keyword_embeddings: torch.Tensor) -> torch.Tensor:
    """Return raw cosine similarities ``(n_images, n_keywords)`` of L2-normalised embeddings, in float64."""
    return image_embeddings.double() @ keyword_embeddings.double().T


def keyword_prompts_for_images(
    bundle: Bundle | PromptParts,
    images_uint8: np.ndarray,
    model: CoCa,
    top_k: int = 5,
    style: str = "marks",
    device: str | torch.device = "cpu",
    keyword_embeddings: torch.Tensor | None = None,
) -> list[KeywordPrompt]:
    """Choose the keywords and build the prompt of each image: CONCH embedding, similarities, top ``top_k``.

    Parameters
    ----------
    bundle
        A loaded bundle, or only its prompt parts (:func:`napari_anopilad.method.bundle.load_prompt_parts`).
    images_uint8
        ``(n, height, width, 3)`` RGB images; CONCH's preprocessing resizes and crops them.
    model
        The bundle's CONCH model (:meth:`Bundle.load_conch`).
    keyword_embeddings
        The bundle's keyword embeddings; read from the cache (or computed) when None.
    """
    from napari_anopilad.method.conch_model import encode_images

    if keyword_embeddings is None:
        keyword_embeddings = cached_keyword_embeddings(bundle, model, device)
    image_embeddings = encode_images(model, images_uint8, device)
    similarities = keyword_similarities(image_embeddings, keyword_embeddings).numpy()
    return [build_keyword_prompt(row, bundle.keywords, top_k, style) for row in similarities]


def build_compel(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> Compel:
    """Create Compel over the pipeline's CLIP tokenizer and text encoder.

    Long prompts are truncated to the tokenizer's ``model_max_length`` (77 for SD1.5), as the pipeline would.
    """
    from compel import Compel

    if tokenizer.model_max_length != 77:
        raise ValueError(
            f"the tokenizer's model_max_length is {tokenizer.model_max_length}; Stable Diffusion 1.5 and Compel need 77"
        )
    return Compel(tokenizer=tokenizer, text_encoder=text_encoder, truncate_long_prompts=True)


def encode_prompts(compel: Compel, prompts: Sequence[str]) -> torch.Tensor:
    """Return Compel embeddings ``(n, 77, width)`` of the prompts, in one call for the batch."""
    import torch

    with torch.no_grad():
        embeddings = compel(list(prompts))
    return embeddings


def encode_empty_prompt(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> torch.Tensor:
    """Return the embedding ``(1, 77, width)`` of the empty prompt, tokenized as diffusers' pipelines do.

    This is the unconditional input of classifier-free guidance and the prompt of the unprompted mode.
    """
    import torch

    tokens = tokenizer(
        [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(text_encoder.device))[0]
