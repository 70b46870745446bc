"""``anopilad prompt IMAGE --bundle DIR``: the weighted keyword prompt that AnoPILaD builds for one patch."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from napari_anopilad.method.settings import PROMPT_STYLES

logger = logging.getLogger(__name__)

DEMO_LABEL = "DEMO BUNDLE: tiny random models; these keywords and weights mean nothing"

# AnoPILaD's patches are 256 px at 0.5 um/px, or 512 px when cut at 0.25 um/px (40x). The limit leaves a
# margin above that and rejects regions and slides, which CONCH would shrink to its input size (448 px in
# conch_ViT-B-16.json) as if they were one patch.
MAX_PATCH_SIDE = 1024
PATCH_FIX = (
    "give one tissue patch as an 8-bit RGB or RGBA PNG, JPEG or TIFF file (256 px at 0.5 um/px, as "
    "`anopilad analyze` cuts them); a whole slide needs `anopilad analyze`"
)
# The first four bytes of a classic TIFF and of a BigTIFF file, little- and big-endian.
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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
    parser.add_argument(
        "image",
        metavar="IMAGE",
        help=f"one patch image: 8-bit RGB or RGBA PNG, JPEG or TIFF, at most {MAX_PATCH_SIDE} px a side",
    )
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
    """Read one patch image as ``(height, width, 3)`` uint8 RGB, an alpha channel composited over white.

    Raises
    ------
    FileNotFoundError
        When ``path`` is not a file.
    ValueError
        When the file is not an image, is not 8-bit RGB or RGBA, holds several images (a whole-slide
        image, an image stack), or is larger than :data:`MAX_PATCH_SIDE` px a side. The message names
        the file, what it contains and what to give instead.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    with path.open("rb") as handle:
        is_tiff = handle.read(4) in TIFF_SIGNATURES
    image = _read_tiff_patch(path) if is_tiff else _read_pil_patch(path)
    if image.shape[2] == 4:
        from napari_anopilad.slide.reader import composite_over_white

        # As the slide reader treats RGBA tiles, so a patch cut from a slide gets the pixels it had there.
        image = composite_over_white(image)
    height, width = image.shape[:2]
    if height != width:
        logger.warning(
            "image %s is %d x %d px (height x width): CONCH sees only its central %d px square",
            path,
            height,
            width,
            min(height, width),
        )
    return image


def _read_tiff_patch(path: Path) -> np.ndarray:
    import tifffile

    from napari_anopilad.slide.formats import detect_format

    try:
        with tifffile.TiffFile(path) as tif:
            # A slide has pyramid levels and associated images; a patch is one single-level page.
            if len(tif.pages) > 1 or len(tif.series[0].levels) > 1:
                shape = tuple(tif.series[0].shape)
                raise ValueError(
                    f"image {path} is a whole-slide image or an image stack ({detect_format(tif)}, "
                    f"{len(tif.pages)} pages, first image of shape {shape}), not one patch: {PATCH_FIX}"
                )
            page = tif.pages.first
            if page.dtype is None:
                raise ValueError(f"image {path} has a sample format that tifffile cannot decode: {PATCH_FIX}")
            _check_patch(path, np.dtype(page.dtype), tuple(page.shape))
            # tifffile decodes YCbCr JPEG tiles to RGB; other four-sample pages (CMYK) are not RGB.
            if page.photometric not in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
                raise ValueError(
                    f"image {path} has the photometric interpretation {tifffile.PHOTOMETRIC(page.photometric).name}, "
                    f"not RGB: {PATCH_FIX}"
                )
            pixels = page.asarray()
    except (tifffile.TiffFileError, OSError) as error:
        raise ValueError(f"image {path} could not be read ({error}); use a PNG, JPEG or TIFF file") from error
    return np.ascontiguousarray(pixels[..., :4])


def _read_pil_patch(path: Path) -> np.ndarray:
    from PIL import Image, ImageMode, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            n_frames = getattr(image, "n_frames", 1)
            if n_frames > 1:
                raise ValueError(
                    f"image {path} contains {n_frames} images ({image.format}), not one patch: {PATCH_FIX}"
                )
            mode = ImageMode.getmode(image.mode)
            channels = () if len(mode.bands) == 1 else (len(mode.bands),)
            shape = (image.height, image.width, *channels)
            _check_patch(path, np.dtype(mode.typestr), shape, f"PIL mode {image.mode}")
            if image.mode not in ("RGB", "RGBA"):
                raise ValueError(
                    f"image {path} is {image.mode} with shape {shape}, not an RGB or RGBA patch: {PATCH_FIX}"
                )
            return np.asarray(image)
    except Image.DecompressionBombError as error:
        raise ValueError(f"image {path} is larger than one patch ({error}): {PATCH_FIX}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {path} could not be read ({error}); use a PNG, JPEG or TIFF file") from error


def _check_patch(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...], mode: str | None = None) -> None:
    """Raise ValueError unless ``dtype`` and ``shape`` are those of an 8-bit RGB(A) patch that is not too large."""
    described = f"{dtype} with shape {shape}" + (f" ({mode})" if mode else "")
    if dtype != np.uint8 or len(shape) != 3 or shape[2] not in (3, 4):
        raise ValueError(f"image {path} is {described}, not an 8-bit RGB or RGBA patch: {PATCH_FIX}")
    if max(shape[:2]) > MAX_PATCH_SIDE:
        raise ValueError(
            f"image {path} is {described}, larger than one patch (at most {MAX_PATCH_SIDE} px a side): "
            f"{PATCH_FIX}"
        )


def prompt_for_image(
    image_path: Path,
    bundle_dir: Path,
    prompt_style: str | None = None,
    device: str = "cpu",
    allow_download: bool = False,
) -> dict[str, Any]:
    """Return the JSON object that ``anopilad prompt --json`` prints."""
    from napari_anopilad.engine.device import choose_device
    from napari_anopilad.method.bundle import load_prompt_parts
    from napari_anopilad.method.prompts import keyword_prompts_for_images

    image = read_image(image_path)
    torch_device = str(choose_device(device))
    if not bundle_dir.is_dir():
        raise FileNotFoundError(
            f"bundle folder {bundle_dir} not found: give a model bundle folder "
            "(anopilad make-demo-bundle DIR makes a demo one)"
        )
    # Only CONCH and the keyword bank make a prompt, so the diffusion parts need not be present.
    bundle = load_prompt_parts(bundle_dir, allow_download=allow_download, device=torch_device)
    settings = bundle.settings.with_overrides(prompt_style=prompt_style)
    model = bundle.load_conch(torch_device)
    (prompt,) = keyword_prompts_for_images(
        bundle, image[np.newaxis], model, settings.top_k, settings.prompt_style, torch_device
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
