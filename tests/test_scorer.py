"""AnoPILaD patch scores with the demo bundle: batch invariance, settings, unprompted mode, z-scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_anopilad.method.bundle import load_bundle
from napari_anopilad.method.scorer import AnoPILaDScorer, PatchScores

# Batched convolutions and matrix products may sum in another order than single ones, so a patch's scores
# alone and in a batch agree to float32 rounding, not bit for bit.
BATCH_RTOL = 1e-4
BATCH_ATOL = 1e-6


@pytest.fixture(scope="module")
def slide_patches(cmu_slide_path: Path) -> np.ndarray:
    """Eight real 256 px H&E patches cut from the tissue of the CMU-1-Small-Region slide."""
    level0 = tifffile.imread(cmu_slide_path, key=0)
    y_level0 = level0.shape[0] // 2 - 256
    x_level0 = level0.shape[1] // 2 - 512
    patches = [
        level0[
            y_level0 + 256 * row : y_level0 + 256 * (row + 1),
            x_level0 + 256 * col : x_level0 + 256 * (col + 1),
        ]
        for row in range(2)
        for col in range(4)
    ]
    return np.ascontiguousarray(np.stack(patches)[..., :3])


@pytest.fixture(scope="module")
def noise_keys() -> list[tuple[str, int, int]]:
    return [("cmu-1-small-region", row, col) for row in range(2) for col in range(4)]


@pytest.fixture(scope="module")
def scorer(demo_bundle_dir: Path) -> AnoPILaDScorer:
    return AnoPILaDScorer(load_bundle(demo_bundle_dir))


@pytest.fixture(scope="module")
def batch_scores(scorer: AnoPILaDScorer, slide_patches: np.ndarray, noise_keys: list) -> tuple:
    """Scores of the eight patches in one shuffled batch, with the shuffle order."""
    order = np.random.default_rng(7).permutation(len(slide_patches))
    scores = scorer.score(
        slide_patches[order], [noise_keys[index] for index in order], return_reconstructions=True
    )
    return order, scores


def test_scores_have_one_entry_per_patch(batch_scores: tuple) -> None:
    _, scores = batch_scores

    assert len(scores) == 8
    assert scores.demo is True
    assert scores.lpips.shape == (8,)
    assert scores.mse_latent.shape == (8,)
    assert bool(np.isfinite(scores.lpips).all())
    assert bool((scores.lpips > 0).all())
    assert bool((scores.mse_latent > 0).all())
    assert all(len(keywords) == 5 for keywords in scores.keywords)
    assert all(prompt.startswith("a histopathological photograph of (") for prompt in scores.prompt)
    assert scores.reconstructions is not None
    assert scores.reconstructions.shape == (8, 256, 256, 3)
    assert scores.reconstructions.dtype == np.uint8


def test_patch_scores_alone_equal_batch(
    scorer: AnoPILaDScorer, slide_patches: np.ndarray, noise_keys: list, batch_scores: tuple
) -> None:
    order, scores = batch_scores
    for patch in (2, 5):
        position = int(np.flatnonzero(order == patch)[0])

        alone = scorer.score(slide_patches[patch : patch + 1], [noise_keys[patch]])

        assert alone.keywords[0] == scores.keywords[position]
        assert alone.prompt[0] == scores.prompt[position]
        np.testing.assert_allclose(alone.similarities[0], scores.similarities[position], rtol=1e-6)
        np.testing.assert_allclose(alone.lpips[0], scores.lpips[position], rtol=BATCH_RTOL, atol=BATCH_ATOL)
        np.testing.assert_allclose(
            alone.mse_latent[0], scores.mse_latent[position], rtol=BATCH_RTOL, atol=BATCH_ATOL
        )


def test_lpips_matches_reconstruction(
    scorer: AnoPILaDScorer, slide_patches: np.ndarray, batch_scores: tuple
) -> None:
    order, scores = batch_scores
    images = torch.from_numpy(slide_patches[order]).permute(0, 3, 1, 2).float() / 127.5 - 1
    reconstructions = torch.from_numpy(scores.reconstructions).permute(0, 3, 1, 2).float() / 127.5 - 1

    with torch.no_grad():
        from_uint8 = scorer.lpips(images, reconstructions).reshape(-1).numpy()
        identical = scorer.lpips(images, images).reshape(-1).numpy()

    # The returned reconstructions are rounded to uint8, so LPIPS on them differs by the rounding only.
    np.testing.assert_allclose(from_uint8, scores.lpips, rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(identical, 0.0, atol=1e-6)


def test_noise_key_changes_scores(scorer: AnoPILaDScorer, slide_patches: np.ndarray) -> None:
    first = scorer.score(slide_patches[:1], [("slide-a", 0, 0)])
    moved = scorer.score(slide_patches[:1], [("slide-a", 0, 1)])
    repeated = scorer.score(slide_patches[:1], [("slide-a", 0, 0)])

    assert moved.lpips[0] != first.lpips[0]
    assert repeated.lpips[0] == first.lpips[0]
    assert repeated.mse_latent[0] == first.mse_latent[0]


@pytest.fixture(scope="module")
def reference_scores(scorer: AnoPILaDScorer, slide_patches: np.ndarray) -> PatchScores:
    """Scores of two patches under the bundle's settings."""
    return scorer.score(slide_patches[:2], [("slide-a", 0, 0), ("slide-a", 0, 1)])


@pytest.mark.parametrize(
    "overrides",
    [
        {"start_timestep": 400},
        {"seed": 1},
        {"guidance_scale": 1.0},
        {"sampler": "plms"},
        {"prompt_style": "numeric"},
    ],
)
def test_settings_change_scores(
    demo_bundle_dir: Path, reference_scores: PatchScores, slide_patches: np.ndarray, overrides: dict
) -> None:
    bundle = load_bundle(demo_bundle_dir)
    other = AnoPILaDScorer(bundle, settings=bundle.settings.with_overrides(**overrides))
    keys = [("slide-a", 0, 0), ("slide-a", 0, 1)]

    reference = reference_scores
    changed = other.score(slide_patches[:2], keys)

    assert not np.allclose(changed.lpips, reference.lpips, rtol=1e-6, atol=0)
    assert not np.allclose(changed.mse_latent, reference.mse_latent, rtol=1e-6, atol=0)


def test_unprompted_mode_skips_conch(
    demo_bundle_dir: Path, scorer: AnoPILaDScorer, slide_patches: np.ndarray
) -> None:
    bundle = load_bundle(demo_bundle_dir)
    unprompted = AnoPILaDScorer(bundle, settings=bundle.settings.with_overrides(unprompted=True))
    keys = [("slide-a", 0, 0), ("slide-a", 0, 1)]

    scores = unprompted.score(slide_patches[:2], keys)
    prompted = scorer.score(slide_patches[:2], keys)

    assert unprompted.conch is None
    assert unprompted.prompt_encoder is None
    assert unprompted.guidance_scale == 1.0
    assert scores.keywords == [[], []]
    assert scores.prompt == ["", ""]
    assert not np.allclose(scores.lpips, prompted.lpips, rtol=1e-6, atol=0)


def test_z_scores_from_calibration(scorer: AnoPILaDScorer) -> None:
    calibration = scorer.bundle.calibration
    assert calibration is not None
    values = np.array([0.1, 0.2, 0.3])

    z_scores = scorer.z_scores(values)

    assert z_scores.source == "calibration"
    assert z_scores.note is None
    expected = (values - calibration.mean["lpips"]) / calibration.std["lpips"]
    np.testing.assert_allclose(z_scores.values, expected, rtol=1e-12)
    mse = scorer.z_scores(values, "mse_latent")
    expected_mse = (values - calibration.mean["mse_latent"]) / calibration.std["mse_latent"]
    np.testing.assert_allclose(mse.values, expected_mse, rtol=1e-12)


def test_z_scores_within_slide_without_matching_calibration(demo_bundle_dir: Path) -> None:
    bundle = load_bundle(demo_bundle_dir)
    other = AnoPILaDScorer(
        bundle, settings=bundle.settings.with_overrides(start_timestep=400, unprompted=True)
    )
    values = np.array([1.0, 2.0, 4.0, 5.0])

    z_scores = other.z_scores(values)

    assert other.calibration is None
    assert z_scores.source == "within-slide"
    assert z_scores.note is not None
    assert z_scores.note.startswith("calibration:")
    np.testing.assert_allclose(z_scores.values, (values - 3.0) / np.sqrt(2.5), rtol=1e-12)


def test_invalid_patches_are_rejected(scorer: AnoPILaDScorer, slide_patches: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"patches have shape \(1, 224, 224, 3\)"):
        scorer.score(slide_patches[:1, :224, :224], [("slide-a", 0, 0)])
    with pytest.raises(ValueError, match="got 2 noise keys for 1 patches"):
        scorer.score(slide_patches[:1], [("slide-a", 0, 0), ("slide-a", 0, 1)])


def test_float16_needs_cuda(demo_bundle_dir: Path) -> None:
    bundle = load_bundle(demo_bundle_dir)

    with pytest.raises(ValueError, match="precision 'float16' needs a CUDA device"):
        AnoPILaDScorer(bundle, settings=bundle.settings.with_overrides(precision="float16"))


@pytest.mark.parametrize(
    "overrides", [{"start_timestep": 400, "sampler": "plms"}, {"prompt_style": "numeric", "top_k": 4}]
)
def test_with_settings_shares_models(
    demo_bundle_dir: Path, scorer: AnoPILaDScorer, slide_patches: np.ndarray, overrides: dict
) -> None:
    bundle = load_bundle(demo_bundle_dir)
    settings = bundle.settings.with_overrides(**overrides)
    keys = [("slide-a", 0, 0), ("slide-a", 0, 1)]

    shared = scorer.with_settings(settings)
    fresh = AnoPILaDScorer(bundle, settings=settings)

    assert shared is not None
    assert shared.unet is scorer.unet
    assert shared.conch is scorer.conch
    assert shared.lpips is scorer.lpips
    assert shared.settings == settings
    assert scorer.settings == bundle.settings
    shared_scores = shared.score(slide_patches[:2], keys)
    fresh_scores = fresh.score(slide_patches[:2], keys)
    assert shared_scores.prompt == fresh_scores.prompt
    np.testing.assert_allclose(shared_scores.lpips, fresh_scores.lpips, rtol=1e-5, atol=1e-7)
    assert (shared.calibration is None) == (fresh.calibration is None)


@pytest.mark.parametrize("overrides", [{"precision": "bfloat16"}, {"unprompted": True}])
def test_with_settings_needs_reload(scorer: AnoPILaDScorer, overrides: dict) -> None:
    assert scorer.with_settings(scorer.settings.with_overrides(**overrides)) is None


def test_model_cache_reuses_models(demo_bundle_dir: Path) -> None:
    from napari_anopilad.widgets.analysis import ModelCache

    cache = ModelCache()
    bundle = cache.bundle(demo_bundle_dir)
    first = cache.scorer(demo_bundle_dir, bundle, "cpu", bundle.settings)
    later_start = cache.scorer(
        demo_bundle_dir, bundle, "cpu", bundle.settings.with_overrides(start_timestep=500)
    )
    bfloat16 = cache.scorer(
        demo_bundle_dir, bundle, "cpu", bundle.settings.with_overrides(precision="bfloat16")
    )

    assert later_start is not first
    assert later_start.unet is first.unet
    assert later_start.settings.start_timestep == 500
    assert bfloat16.unet is not first.unet
    assert next(bfloat16.unet.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_cli_run_gives_eager_scores(
    tmp_path: Path, demo_bundle_dir: Path, cmu_slide_path: Path
) -> None:
    """``anopilad analyze --compile`` on one patch, against the same run without compiling."""
    from napari_anopilad.cli import main
    from napari_anopilad.io.tables import read_patches_csv

    args = ["analyze", str(cmu_slide_path), "--bundle", str(demo_bundle_dir), "--device", "cpu"]
    args += ["--region", "1024", "1024", "256", "256", "--start-timestep", "21"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "default"])):
        out = tmp_path / name
        # Compiling is not part of the result store's key, so each run gets its own store.
        assert main([*args, "--out", str(out), "--store", str(tmp_path / f"store-{name}"), *extra]) == 0
        runs[name] = read_patches_csv(out / "patches.csv")

    assert len(runs["eager"]) >= 1
    assert len(runs["compiled"]) == len(runs["eager"])
    for compiled, eager in zip(runs["compiled"], runs["eager"], strict=True):
        assert (compiled["row"], compiled["col"]) == (eager["row"], eager["col"])
        assert compiled["prompt"] == eager["prompt"]
        np.testing.assert_allclose(compiled["lpips"], eager["lpips"], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(compiled["mse_latent"], eager["mse_latent"], rtol=1e-3, atol=1e-6)


def test_compile_mode_is_checked(demo_bundle_dir: Path) -> None:
    with pytest.raises(ValueError, match="compile mode 'fast' is invalid: use one of default"):
        AnoPILaDScorer(load_bundle(demo_bundle_dir), compile_mode="fast")
