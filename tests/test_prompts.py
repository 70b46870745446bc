"""Keyword prompts: selection, weights, Compel marks, text embeddings and the ``anopilad prompt`` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from compel.prompt_parser import PromptParser
from PIL import Image

from napari_anopilad.cli import main
from napari_anopilad.method.bundle import load_bundle
from napari_anopilad.method.prompts import (
    PROMPT_PREFIX,
    build_keyword_prompt,
    cached_keyword_embeddings,
    escape_keyword,
    format_prompt,
    keyword_cache_key,
    keyword_marks,
    keyword_weights,
    top_keyword_indices,
)

NORMAL_TILE = "patches/camelyon17/tile_noncancer_x11126_y75845_L0.png"


def compel_fragments(prompt: str) -> list[tuple[str, float]]:
    """Parse a prompt with Compel's own parser into (text, weight) fragments."""
    (flattened,) = PromptParser().parse_conjunction(prompt).prompts
    return [(fragment.text, fragment.weight) for fragment in flattened.children]


def compel_keyword_weights(prompt: str, keywords: list[str]) -> list[float]:
    """Return the weight Compel gives each keyword, checking that the prompt reads prefix, keywords, "and"s.

    Compel merges neighbouring fragments of equal weight, so the check goes word by word.
    """
    words = [
        (word, weight)
        for text, weight in compel_fragments(prompt)
        for word in text.replace(" ,", ",").split()
    ]
    prefix = PROMPT_PREFIX.split()
    assert words[: len(prefix)] == [(word, 1.0) for word in prefix]
    position = len(prefix)
    weights = []
    for index, keyword in enumerate(keywords):
        span = words[position : position + len(keyword.split())]
        assert [word for word, _ in span] == keyword.split()
        assert len({weight for _, weight in span}) == 1
        weights.append(span[0][1])
        position += len(span)
        if index < len(keywords) - 1:
            assert words[position] == ("and", 1.0)
            position += 1
    assert position == len(words)
    return weights


@pytest.mark.parametrize(
    ("weight", "rank", "marks"),
    [
        # Ranks 1-2: "+" while the weight is nearer 1.1 than 1; halfway (1.05) goes to 1.
        (1.0, 0, ""),
        (1.05, 0, ""),
        (1.0501, 0, "+"),
        (1.1, 1, "+"),
        # 1.2 -> "+" and 1.2 / 1.1 = 1.0909 -> "+" and 0.9917 stops.
        (1.2, 0, "++"),
        # 1.25 -> 1.1364 -> 1.0331 stops after two marks.
        (1.25, 0, "++"),
        # 1.16 -> "+" and 1.16 / 1.1 = 1.0545 -> "+" and 0.9587 stops.
        (1.16, 1, "++"),
        # 1.155 / 1.1 = 1.05 exactly in decimal, but 1.0499999999999998 in binary: one mark.
        (1.155, 1, "+"),
        # Rank 3 never takes a mark.
        (1.5, 2, ""),
        (0.5, 2, ""),
        # Ranks 4-5: "-" while the weight is nearer 0.9 than 1; halfway (0.95) goes to 0.9.
        (1.0, 3, ""),
        (0.9501, 3, ""),
        (0.95, 3, "-"),
        (0.9, 4, "-"),
        # 0.875 -> "-" and 0.875 / 0.9 = 0.9722 stops.
        (0.875, 3, "-"),
        # 0.8 -> 0.8889 -> 0.9877: two marks.
        (0.8, 4, "--"),
        # 0.75 -> 0.8333 -> 0.9259 -> 1.0288: three marks.
        (0.75, 4, "---"),
    ],
)
def test_keyword_marks(weight: float, rank: int, marks: str) -> None:
    assert keyword_marks(weight, rank) == marks


def test_mark_loop_is_bounded() -> None:
    assert keyword_marks(-0.2, 4) == "-" * 20
    assert keyword_marks(1e9, 0) == "+" * 20


def test_weights_divide_by_median() -> None:
    weights = keyword_weights([0.5, 0.45, 0.4, 0.35, 0.3])

    np.testing.assert_allclose(weights, [1.25, 1.125, 1.0, 0.875, 0.75], rtol=1e-12)


def test_weights_need_positive_median() -> None:
    with pytest.raises(ValueError, match=r"median keyword similarity is -0\.1000"):
        keyword_weights([0.1, 0.0, -0.1, -0.2, -0.3])


def test_top_keywords_highest_first() -> None:
    similarities = [0.1, 0.5, 0.3, 0.5, 0.2, 0.4, 0.0]

    # The two 0.5 values keep bank order.
    assert top_keyword_indices(similarities, 5) == [1, 3, 5, 2, 4]


def test_top_keywords_need_enough_keywords() -> None:
    with pytest.raises(ValueError, match="at least 5"):
        top_keyword_indices([0.1, 0.2, 0.3], 5)


def test_prompt_string_with_marks() -> None:
    prompt = build_keyword_prompt([0.3, 0.45, 0.5, 0.0, 0.35, 0.4], list("fbaxec"), top_k=5)

    assert prompt.keywords == ["a", "b", "c", "e", "f"]
    assert prompt.similarities == [0.5, 0.45, 0.4, 0.35, 0.3]
    assert prompt.prompt == "a histopathological photograph of (a)++ and (b)+ and (c) and (e)- and (f)---"


def test_prompt_string_numeric() -> None:
    prompt = build_keyword_prompt([0.52, 0.44, 0.40, 0.38, 0.30], list("abcde"), top_k=5, style="numeric")

    assert (
        prompt.prompt
        == "a histopathological photograph of (a)1.30 and (b)1.10 and (c)1.00 and (d)0.95 and (e)0.75"
    )


def test_compel_reads_marks_as_weights() -> None:
    keywords = [
        "plasma cell-rich germinal center",
        "faintly granular cytoplasm, large pale nuclei",
        "B-cell-rich non-germinal center",
        "distinct group of non T, non B lymphocytes",
        "cells (CD20+) in rows",
    ]
    weights = [1.25, 1.125, 1.0, 0.875, 0.75]

    compel_weights = compel_keyword_weights(format_prompt(keywords, weights), keywords)

    np.testing.assert_allclose(compel_weights, [1.1**2, 1.1, 1.0, 0.9, 0.9**3], rtol=1e-9)


def test_compel_reads_numeric_weights() -> None:
    keywords = ["germinal center", "mantle zone"]
    compel_weights = compel_keyword_weights(format_prompt(keywords, [1.07, 0.93], style="numeric"), keywords)

    np.testing.assert_allclose(compel_weights, [1.07, 0.93], rtol=1e-9)


def test_escape_keyword_parentheses() -> None:
    assert escape_keyword("cells (CD20+) rich") == r"cells \(CD20+\) rich"


def test_keyword_embeddings_match_direct_computation(demo_bundle_dir: Path) -> None:
    from conch.open_clip_custom import get_tokenizer

    bundle = load_bundle(demo_bundle_dir)
    model = bundle.load_conch()
    embeddings = cached_keyword_embeddings(bundle, model)
    keyword = bundle.keywords[7]
    tokenizer = get_tokenizer()

    per_template = []
    for template in bundle.templates:
        ids = tokenizer(template.replace("{}", keyword), add_special_tokens=True)["input_ids"]
        tokens = torch.zeros(1, 128, dtype=torch.long)
        tokens[0, : len(ids)] = torch.tensor(ids)
        with torch.no_grad():
            text_embedding = model.encode_text(tokens, normalize=False)[0]
        per_template.append(text_embedding / text_embedding.norm())
    mean = torch.stack(per_template).mean(dim=0)
    expected = mean / mean.norm()

    assert embeddings.shape == (74, bundle.conch_config["embed_dim"])
    torch.testing.assert_close(embeddings[7], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(74), rtol=1e-6, atol=1e-6)


def test_keyword_embeddings_are_cached(demo_bundle_dir: Path) -> None:
    bundle = load_bundle(demo_bundle_dir)
    first = cached_keyword_embeddings(bundle)
    key = keyword_cache_key(bundle.part_hashes["conch"], bundle.keywords, bundle.templates)
    cache_file = bundle.cache_dir / f"keyword-embeddings-{key}.safetensors"
    modified = cache_file.stat().st_mtime_ns

    second = cached_keyword_embeddings(bundle)

    assert cache_file.stat().st_mtime_ns == modified
    assert torch.equal(first, second)
    assert keyword_cache_key(bundle.part_hashes["conch"], bundle.keywords[:-1], bundle.templates) != key
    assert keyword_cache_key("other weights", bundle.keywords, bundle.templates) != key


def test_clip_tokenizer_matches_open_clip(demo_bundle_dir: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(demo_bundle_dir / "sd15" / "tokenizer")
    text = (
        "a histopathological photograph of (plasma cell-rich germinal center)++ and B-cell-rich, pale nuclei"
    )

    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer(text).input_ids == [49406, *SimpleTokenizer().encode(text), 49407]


def test_compel_plain_prompt_matches_pipeline(demo_bundle_dir: Path) -> None:
    from napari_anopilad.method.prompts import build_compel, encode_empty_prompt, encode_prompts

    pipeline = load_bundle(demo_bundle_dir).load_pipeline()
    compel = build_compel(pipeline.tokenizer, pipeline.text_encoder)
    text = "a histopathological photograph of germinal center and mantle zone"

    from_compel = encode_prompts(compel, [text])
    from_pipeline, _ = pipeline.encode_prompt(text, "cpu", 1, do_classifier_free_guidance=False)
    empty_from_pipeline, _ = pipeline.encode_prompt("", "cpu", 1, do_classifier_free_guidance=False)

    assert from_compel.shape == (1, 77, 32)
    torch.testing.assert_close(from_compel, from_pipeline, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        encode_empty_prompt(pipeline.tokenizer, pipeline.text_encoder), empty_from_pipeline
    )


def test_compel_truncates_long_prompts(demo_bundle_dir: Path) -> None:
    from napari_anopilad.method.prompts import build_compel, encode_prompts

    pipeline = load_bundle(demo_bundle_dir).load_pipeline()
    compel = build_compel(pipeline.tokenizer, pipeline.text_encoder)
    keywords = load_bundle(demo_bundle_dir).keywords
    long_text = PROMPT_PREFIX + " and ".join(keywords[:12])
    weighted = format_prompt(keywords[:5], [1.3, 1.1, 1.0, 0.9, 0.7]) + " and " + " and ".join(keywords[5:14])

    assert len(pipeline.tokenizer(long_text).input_ids) > 77
    embeddings = encode_prompts(compel, [long_text, weighted, "germinal center"])
    # The pipeline truncates to 77 tokens too, so the unweighted long prompt must match it.
    from_pipeline, _ = pipeline.encode_prompt(long_text, "cpu", 1, do_classifier_free_guidance=False)

    assert embeddings.shape == (3, 77, 32)
    assert bool(torch.isfinite(embeddings).all())
    torch.testing.assert_close(embeddings[:1], from_pipeline, rtol=1e-5, atol=1e-5)


def direct_prompt(bundle_dir: Path, image_path: Path) -> tuple[list[str], np.ndarray]:
    """Recompute a patch's top keywords without the package's CONCH and prompt code."""
    from conch.open_clip_custom import CoCa, get_tokenizer
    from conch.open_clip_custom.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms

    spec = json.loads((bundle_dir / "bundle.json").read_text())
    config = json.loads((bundle_dir / spec["conch"]["config"]).read_text())
    config.pop("custom_text")
    model = CoCa(**config)
    model.load_state_dict(load_file(bundle_dir / spec["conch"]["checkpoint"]), strict=True)
    model.eval()
    keywords = (bundle_dir / spec["prompts"]["keywords"]).read_text().split("\n")
    keywords = [keyword for keyword in keywords if keyword.strip()]
    templates = [
        line for line in (bundle_dir / spec["prompts"]["templates"]).read_text().split("\n") if line.strip()
    ]

    preprocess = transforms.Compose(
        [
            transforms.Resize(448, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(448),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ]
    )
    with Image.open(image_path) as image:
        pixels = preprocess(image.convert("RGB"))[None]
    tokenizer = get_tokenizer()
    with torch.no_grad():
        image_embedding = model.encode_image(pixels, proj_contrast=True, normalize=True)[0].double()
        keyword_embeddings = []
        for keyword in keywords:
            texts = [template.replace("{}", keyword) for template in templates]
            encoded = tokenizer(
                texts, max_length=127, padding="max_length", truncation=True, return_tensors="pt"
            )
            tokens = torch.nn.functional.pad(encoded["input_ids"], (0, 1), value=tokenizer.pad_token_id)
            per_template = model.encode_text(tokens, normalize=True)
            mean = per_template.mean(dim=0)
            keyword_embeddings.append(mean / mean.norm())
    similarities = (torch.stack(keyword_embeddings).double() @ image_embedding).numpy()
    return keywords, similarities


def test_prompt_command_on_real_patch(
    demo_bundle_dir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_path = data_dir / NORMAL_TILE

    assert main(["prompt", str(image_path), "--bundle", str(demo_bundle_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    keywords, similarities = direct_prompt(demo_bundle_dir, image_path)
    order = np.argsort(-similarities, kind="stable")[:5]
    expected_similarities = similarities[order]
    assert set(result) == {"keywords", "similarities", "weights", "prompt", "demo"}
    assert result["demo"] is True
    assert result["keywords"] == [keywords[index] for index in order]
    np.testing.assert_allclose(result["similarities"], expected_similarities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["weights"], expected_similarities / expected_similarities[2], rtol=1e-5)

    # The marks leave a residual weight / (Compel's weight) that the rules bound: ranks 1-2 stop once the
    # residual is at most 1.05 (so it is above 1.05 / 1.1), ranks 4-5 once it is above 0.95.
    compel_weights = compel_keyword_weights(result["prompt"], result["keywords"])
    residuals = [
        weight / compel_weight
        for weight, compel_weight in zip(result["weights"], compel_weights, strict=True)
    ]
    assert compel_weights[2] == 1.0
    for rank in (0, 1):
        assert 1.05 / 1.1 < residuals[rank] <= 1.05
    for rank in (3, 4):
        assert 0.95 < residuals[rank] <= 0.95 / 0.9


def test_prompt_command_text_is_labelled_demo(
    demo_bundle_dir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prompt", str(data_dir / NORMAL_TILE), "--bundle", str(demo_bundle_dir)]) == 0
    output = capsys.readouterr().out.splitlines()

    assert output[0].startswith("DEMO BUNDLE")
    assert output[-1].startswith("prompt: a histopathological photograph of (")
    assert len(output) == 1 + 1 + 5 + 1


def test_prompt_command_missing_image(
    demo_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prompt", str(tmp_path / "absent.png"), "--bundle", str(demo_bundle_dir)]) == 2

    assert "absent.png not found" in capsys.readouterr().err


def _prompt_error(capsys: pytest.CaptureFixture[str], image: Path, bundle: Path) -> str:
    """Run ``anopilad prompt`` on an invalid input and return its one error line."""
    assert main(["prompt", str(image), "--bundle", str(bundle)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("anopilad prompt: error: ")
    assert captured.out == ""
    return lines[0]


def test_prompt_rejects_float_heatmap(
    demo_bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    heatmap = tmp_path / "heatmap.tif"
    tifffile.imwrite(heatmap, np.full((12, 9), np.nan, dtype=np.float32))

    line = _prompt_error(capsys, heatmap, demo_bundle_dir)

    assert f"image {heatmap} is float32 with shape (12, 9), not an 8-bit RGB or RGBA patch" in line
    assert "a whole slide needs `anopilad analyze`" in line


def test_prompt_rejects_whole_slide(
    demo_bundle_dir: Path, cmu_slide_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _prompt_error(capsys, cmu_slide_path, demo_bundle_dir)

    assert f"image {cmu_slide_path} is a whole-slide image or an image stack (aperio, 4 pages" in line
    assert "first image of shape (2967, 2220, 3)" in line
    assert "a whole slide needs `anopilad analyze`" in line


def test_prompt_rejects_grayscale_png(
    demo_bundle_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gray = tmp_path / "gray.png"
    with Image.open(data_dir / NORMAL_TILE) as image:
        image.convert("L").save(gray)

    line = _prompt_error(capsys, gray, demo_bundle_dir)

    assert f"image {gray} is uint8 with shape (224, 224) (PIL mode L), not an 8-bit RGB or RGBA patch" in line


def test_prompt_rejects_16_bit_tiff(
    demo_bundle_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "patch16.tif"
    with Image.open(data_dir / NORMAL_TILE) as image:
        rgb = np.asarray(image.convert("RGB"))
    tifffile.imwrite(path, rgb.astype(np.uint16) * 257, photometric="rgb")

    line = _prompt_error(capsys, path, demo_bundle_dir)

    assert f"image {path} is uint16 with shape (224, 224, 3), not an 8-bit RGB or RGBA patch" in line


def test_prompt_rejects_region_larger_than_patch(
    demo_bundle_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    region = tmp_path / "region.png"
    with Image.open(data_dir / NORMAL_TILE) as image:
        Image.fromarray(np.tile(np.asarray(image), (5, 5, 1))).save(region)

    line = _prompt_error(capsys, region, demo_bundle_dir)

    assert (
        f"image {region} is uint8 with shape (1120, 1120, 4) (PIL mode RGBA), larger than one patch" in line
    )
    assert "(at most 1024 px a side)" in line


def test_prompt_tiff_matches_png(
    demo_bundle_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiff = tmp_path / "patch.tif"
    with Image.open(data_dir / NORMAL_TILE) as image:
        tifffile.imwrite(tiff, np.asarray(image), photometric="rgb", extrasamples=["unassalpha"])

    assert main(["prompt", str(data_dir / NORMAL_TILE), "--bundle", str(demo_bundle_dir), "--json"]) == 0
    from_png = json.loads(capsys.readouterr().out)
    assert main(["prompt", str(tiff), "--bundle", str(demo_bundle_dir), "--json"]) == 0
    from_tiff = json.loads(capsys.readouterr().out)

    assert from_tiff == from_png


def test_prompt_rgba_composited_over_white(
    demo_bundle_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Image.open(data_dir / NORMAL_TILE) as image:
        rgb = np.asarray(image.convert("RGB"))
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).round().astype(np.uint8), (rgb.shape[0], 1))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    # Over white, written out with plain arithmetic: rgb * a + 255 * (1 - a), rounded.
    fraction = alpha[..., None] / 255.0
    over_white = np.rint(rgb * fraction + 255.0 * (1.0 - fraction)).astype(np.uint8)
    Image.fromarray(over_white, "RGB").save(tmp_path / "over-white.png")

    assert main(["prompt", str(tmp_path / "rgba.png"), "--bundle", str(demo_bundle_dir), "--json"]) == 0
    from_rgba = json.loads(capsys.readouterr().out)
    assert main(["prompt", str(tmp_path / "over-white.png"), "--bundle", str(demo_bundle_dir), "--json"]) == 0
    from_rgb = json.loads(capsys.readouterr().out)

    assert from_rgba == from_rgb


def test_prompt_non_square_patch_warns(
    demo_bundle_dir: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    crop = data_dir / "patches/camelyon17/patient_004_node_4_roi_x12597_y88778_341x382_L0.png"

    assert main(["prompt", str(crop), "--bundle", str(demo_bundle_dir), "--json"]) == 0

    assert len(json.loads(capsys.readouterr().out)["keywords"]) == 5
    assert "is 382 x 341 px (height x width): CONCH sees only its central 341 px square" in caplog.text


def test_prompt_bundle_without_lora(
    demo_bundle_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_dir, bundle, ignore=shutil.ignore_patterns(".cache"))
    (bundle / "lora" / "pytorch_lora_weights.safetensors").unlink()
    image = str(data_dir / NORMAL_TILE)

    assert main(["prompt", image, "--bundle", str(demo_bundle_dir), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["prompt", image, "--bundle", str(bundle), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    assert result == expected


def test_prompt_missing_bundle_folder(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _prompt_error(capsys, data_dir / NORMAL_TILE, tmp_path / "absent")

    assert f"bundle folder {tmp_path / 'absent'} not found" in line
