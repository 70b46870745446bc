"""Step 2: write each patch's CONCH keyword prompt into the manifest as its training caption.

The captions are built exactly as at inference: CONCH image embedding, raw cosine similarity to the
keyword bank, the five nearest keywords weighted by their similarity over the median, in Compel syntax.
Patches that already have a caption are skipped, and the manifest is rewritten after every batch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from napari_anopilad.training.manifest import MANIFEST_NAME, load_patches, read_manifest, write_table_atomic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="02_caption.py",
        description="Write the CONCH keyword prompt of each patch into the manifest (step 2).",
    )
    parser.add_argument("patches", type=Path, help="extraction folder with manifest.csv (step 1's output)")
    parser.add_argument(
        "--bundle", required=True, type=Path, help="bundle folder whose CONCH and keywords to use"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="patches per CONCH batch")
    parser.add_argument(
        "--style", choices=("marks", "numeric"), default=None, help="prompt style (bundle's by default)"
    )
    parser.add_argument("--overwrite", action="store_true", help="caption every patch again")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Caption the manifest's patches from command-line arguments; return the exit status."""
    import torch
    from tqdm.auto import tqdm

    from napari_anopilad.method.bundle import load_bundle
    from napari_anopilad.method.prompts import cached_keyword_embeddings, keyword_prompts_for_images

    args = build_parser().parse_args(argv)
    table = read_manifest(args.patches)
    if args.overwrite:
        table["caption"] = ""
    bundle = load_bundle(args.bundle, device=args.device)
    style = args.style or bundle.settings.prompt_style
    conch = bundle.load_conch(args.device)
    keyword_embeddings = cached_keyword_embeddings(bundle, conch, args.device)

    todo = table.index[table["caption"] == ""].tolist()
    with tqdm(total=len(table), initial=len(table) - len(todo), desc="captions", unit="patch") as progress:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            images = load_patches(args.patches, table.loc[batch, "path"])
            with torch.no_grad():
                prompts = keyword_prompts_for_images(
                    bundle,
                    images,
                    conch,
                    top_k=bundle.settings.top_k,
                    style=style,
                    device=args.device,
                    keyword_embeddings=keyword_embeddings,
                )
            table.loc[batch, "caption"] = [prompt.prompt for prompt in prompts]
            write_table_atomic(table, Path(args.patches) / MANIFEST_NAME)
            progress.update(len(batch))
    print(f"{len(table)} patches captioned in {Path(args.patches) / MANIFEST_NAME}")
    return 0
