"""``anopilad prompt IMAGE --bundle DIR``: the weighted keyword prompt that AnoPILaD builds for one patch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_anopilad.method.settings import PROMPT_STYLES

DEMO_LABEL = "DEMO BUNDLE: tiny random models; these keywords and weights mean nothing"


def add_parser(subparsers: Any) -> None:
    """Add the ``prompt`` subcommand to the ``anopilad`` parser."""
    parser = subparsers.add_parser(
        "prompt",
        help="show the keywords, weights and prompt that guide a patch's reconstruction",
        description=(
            "Embed an image patch with the bundle's CONCH model, pick the keywords of the bundle's keyword "
            "bank nearest to it (raw cosine similarity), weight them by the median similarity and print the "
            "Compel prompt string."
        ),
    )
    parser.add_argument("image", metavar="IMAGE", help="patch image (PNG, JPEG, TIFF), RGB or RGBA")
    parser.add_argument(
        "--bundle", required=True, metavar="DIR", help="model bundle folder (with bundle.json)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default=None,
        help="'marks' writes (keyword)++, 'numeric' writes (keyword)1.07; default: the bundle's setting",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device for CONCH, e.g. cpu or cuda:0 (default: cpu)"
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="download hub models named by the bundle that are not local (CONCH needs a Hugging Face token)",
    )
    parser.set_defaults(run=run)


def read_image(path: Path) -> np.ndarray:
    """Read an image file as ``(height, width, 3)`` uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {path} could not be read ({error}); use a PNG, JPEG or TIFF file") from error


def prompt_for_image(
    image_path: Path,
    bundle_dir: Path,
    prompt_style: str | None = None,
    device: str = "cpu",
    allow_download: bool = False,
) -> dict[str, Any]:
    """Return the JSON object that ``anopilad prompt --json`` prints."""
    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.prompts import keyword_prompts_for_images

    image = read_image(image_path)
    bundle = load_bundle(bundle_dir, allow_download=allow_download, device=device)
    settings = bundle.settings.with_overrides(prompt_style=prompt_style)
    model = bundle.load_conch(device)
    (prompt,) = keyword_prompts_for_images(
        bundle, image[np.newaxis], model, settings.top_k, settings.prompt_style, device
    )
    return {
        "keywords": prompt.keywords,
        "similarities": prompt.similarities,
        "weights": prompt.weights,
        "prompt": prompt.prompt,
        "demo": bundle.demo,
    }


def run(args: argparse.Namespace) -> int:
    result = prompt_for_image(
        Path(args.image), Path(args.bundle), args.prompt_style, args.device, args.allow_download
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["demo"]:
        print(DEMO_LABEL)
    width = max(len(keyword) for keyword in result["keywords"])
    print(f"rank  {'keyword':<{width}}  similarity  weight")
    for rank, (keyword, similarity, weight) in enumerate(
        zip(result["keywords"], result["similarities"], result["weights"], strict=True), start=1
    ):
        print(f"{rank:>4}  {keyword:<{width}}  {similarity:>10.4f}  {weight:>6.3f}")
    print(f"prompt: {result['prompt']}")
    return 0
