"""The batched keyword prompt encoder against Compel: the same fragments, tokens and embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from compel import Compel
from compel.prompt_parser import PromptParser

from napari_anopilad.method.bundle import load_bundle
from napari_anopilad.method.prompt_encoding import KeywordPromptEncoder, fuse_fragments
from napari_anopilad.method.prompts import KeywordPrompt, build_keyword_prompt, format_prompt

# Keywords Compel's grammar reads in its own way: punctuation, escaped parentheses, quotes, a trailing "-".
AWKWARD_KEYWORDS = [
    "faintly granular cytoplasm, large pale nuclei",
    "lymphocytes (small, round)",
    'so-called "starry sky" pattern',
    "B-cell-rich",
    "ends with a hyphen-",
    "1.5 mm capsule",
    "+",
    "-",
    "cells -",
    "- cells",
    "CD4+ T cells",
]


@pytest.fixture(scope="module")
def pipeline(demo_bundle_dir: Path) -> Any:
    return load_bundle(demo_bundle_dir).load_pipeline()


@pytest.fixture(scope="module")
def keywords(demo_bundle_dir: Path) -> list[str]:
    return load_bundle(demo_bundle_dir).keywords


def compel_fragments(prompt: str) -> tuple[tuple[str, float], ...]:
    (flattened,) = PromptParser().parse_conjunction(prompt).prompts
    return tuple((fragment.text, float(fragment.weight)) for fragment in flattened.children)


def spread_prompts(keywords: list[str], count: int, seed: int, style: str = "marks") -> list[KeywordPrompt]:
    """Keyword prompts from similarities spread enough that the weights take several marks."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        similarities = rng.uniform(0.05, 0.2, len(keywords))
        similarities[rng.choice(len(keywords), 5, replace=False)] = rng.uniform(0.22, 0.6, 5)
        prompts.append(build_keyword_prompt(similarities, keywords, 5, style))
    return prompts


def compel_embeddings(pipeline: Any, prompts: list[KeywordPrompt]) -> torch.Tensor:
    compel = Compel(
        tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, truncate_long_prompts=True
    )
    return compel([prompt.prompt for prompt in prompts])


def test_fuse_joins_equal_weights_only() -> None:
    fused = fuse_fragments([("a", 1.0), ("b", 1.0), ("c", 1.1), ("d", 1.0), ("e", 0.9), ("f", 0.9)])

    assert fused == (("a b", 1.0), ("c", 1.1), ("d", 1.0), ("e f", 0.9))


@pytest.mark.parametrize("style", ["marks", "numeric"])
def test_fragments_equal_compel_parse(pipeline: Any, keywords: list[str], style: str) -> None:
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder, style=style)
    prompts = spread_prompts(keywords, 40, seed=3, style=style)

    marks = {mark for prompt in prompts for mark in ("++", "+", "-", "--") if f"){mark}" in prompt.prompt}

    if style == "marks":
        assert marks == {"++", "+", "-", "--"}
    for prompt in prompts:
        assert encoder.fragments(prompt) == compel_fragments(prompt.prompt), prompt.prompt


def test_awkward_keyword_fragments_match_compel(pipeline: Any) -> None:
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
    weights = [1.25, 1.1, 1.0, 0.9, 0.8]
    for start in range(len(AWKWARD_KEYWORDS)):
        chosen = (AWKWARD_KEYWORDS * 2)[start : start + 5]
        prompt = KeywordPrompt(chosen, weights, weights, format_prompt(chosen, weights))

        assert encoder.fragments(prompt) == compel_fragments(prompt.prompt), prompt.prompt


def test_plain_keywords_skip_the_parser(pipeline: Any) -> None:
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
    plain = ["germinal center", "B-cell-rich zone", "CD4 T cells", "mantle zone", "sinus histiocytes"]
    weights = [1.3, 1.1, 1.0, 0.9, 0.7]
    with_comma = [*plain[:4], "cords, sinuses"]

    fragments = encoder.fragments(KeywordPrompt(plain, weights, weights, format_prompt(plain, weights)))
    parsed_after_plain = dict(encoder._parsed_texts)
    encoder.fragments(KeywordPrompt(with_comma, weights, weights, format_prompt(with_comma, weights)))

    assert parsed_after_plain == {}
    assert fragments == compel_fragments(format_prompt(plain, weights))
    assert "(cords, sinuses)---" in encoder._parsed_texts


def test_embeddings_equal_compel(pipeline: Any, keywords: list[str]) -> None:
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
    prompts = spread_prompts(keywords, 12, seed=5)

    embeddings = encoder.encode(prompts)

    assert embeddings.shape == (12, 77, 32)
    torch.testing.assert_close(embeddings, compel_embeddings(pipeline, prompts), rtol=1e-5, atol=1e-5)


def test_numeric_style_embeddings_equal_compel(pipeline: Any, keywords: list[str]) -> None:
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder, style="numeric")
    prompts = spread_prompts(keywords, 6, seed=8, style="numeric")
    # A negative fifth weight (negative similarity, positive median), which Compel reads as a "-" mark
    # followed by the number as text.
    weights = [1.2, 1.0, 1.0, 0.5, -0.03]
    prompts.append(
        KeywordPrompt(keywords[:5], weights, weights, format_prompt(keywords[:5], weights, "numeric"))
    )

    embeddings = encoder.encode(prompts)

    torch.testing.assert_close(embeddings, compel_embeddings(pipeline, prompts), rtol=1e-5, atol=1e-5)


def test_truncated_prompts_equal_compel(pipeline: Any) -> None:
    """Prompts past 75 tokens: a down-weighted keyword cut in two, and one wholly beyond the cut."""
    long_words = " ".join(f"word{index}" for index in range(9))
    longer_words = " ".join(f"word{index}" for index in range(11))
    chosen = [
        longer_words + " alpha",
        longer_words + " beta",
        longer_words + " gamma",
        "delta cells",
        "epsilon",
    ]
    weights = [1.3, 1.1, 1.0, 0.85, 0.75]
    beyond = KeywordPrompt(chosen, weights, weights, format_prompt(chosen, weights))
    chosen_cut = [long_words, long_words, "gamma", long_words + " delta", long_words + " epsilon"]
    cut = KeywordPrompt(chosen_cut, weights, weights, format_prompt(chosen_cut, weights))
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder)

    cut_ranges = encoder.encoded_tokens(encoder.fragments(cut)).masked_ranges
    beyond_ranges = encoder.encoded_tokens(encoder.fragments(beyond)).masked_ranges

    assert len(pipeline.tokenizer(beyond.prompt).input_ids) > 77
    assert len(pipeline.tokenizer(cut.prompt).input_ids) > 77
    assert cut_ranges[-1][1] == 76
    assert beyond_ranges == ()
    torch.testing.assert_close(
        encoder.encode([beyond, cut]), compel_embeddings(pipeline, [beyond, cut]), rtol=1e-5, atol=1e-5
    )


def test_awkward_keyword_embeddings_equal_compel(pipeline: Any) -> None:
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
    weights = [1.3, 1.0, 1.0, 0.88, 0.7]
    prompts = []
    for start in range(len(AWKWARD_KEYWORDS)):
        chosen = (AWKWARD_KEYWORDS * 2)[start : start + 5]
        prompts.append(KeywordPrompt(chosen, weights, weights, format_prompt(chosen, weights)))

    torch.testing.assert_close(
        encoder.encode(prompts), compel_embeddings(pipeline, prompts), rtol=1e-5, atol=1e-5
    )


def test_cache_returns_same_embeddings(pipeline: Any, keywords: list[str]) -> None:
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder, cache_size=3)
    prompts = spread_prompts(keywords, 4, seed=11)

    first = encoder.encode([prompts[0], prompts[1], prompts[0]])
    hits_after_first = encoder.cache_hits
    again = encoder.encode([prompts[1], prompts[0]])
    encoder.encode(prompts[2:4])
    evicted = encoder.encode([prompts[1]])

    assert encoder.cache_misses == 5
    assert hits_after_first == 1
    assert torch.equal(first[2], first[0])
    assert torch.equal(again[0], first[1])
    assert torch.equal(again[1], first[0])
    assert len(encoder._embeddings) == 3
    torch.testing.assert_close(evicted[0], first[1], rtol=1e-5, atol=1e-5)


def test_empty_batch(pipeline: Any) -> None:
    encoder = KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder)

    assert encoder.encode([]).shape == (0, 77, 32)


def test_rejects_bad_style_and_length(pipeline: Any) -> None:
    with pytest.raises(ValueError, match="prompt style 'bold' is invalid"):
        KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder, style="bold")
    pipeline.tokenizer.model_max_length = 128
    try:
        with pytest.raises(ValueError, match="model_max_length is 128"):
            KeywordPromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
    finally:
        pipeline.tokenizer.model_max_length = 77
