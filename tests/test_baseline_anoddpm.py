"""AnoDDPM: partial diffusion against diffusers' own schedulers, DDPM's loss by hand, training, scoring, errors.

The UNet2DModel is tiny (two levels of 8 and 16 channels, no attention) with random or briefly trained
weights, so its scores mean nothing. The tests check the arithmetic and the plumbing on real patches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from napari_anopilad.engine.session import AnalysisSession
from napari_anopilad.engine.store import ResultStore, grid_description
from napari_anopilad.method.baselines.anoddpm import (
    AnoDDPMScorer,
    check_options,
    ddpm_loss,
    gaussian_noise,
    reconstruct_pixels,
)
from napari_anopilad.method.baselines.base import BaselineSettings, load_baseline_bundle
from napari_anopilad.method.diffusion import alphas_cumprod
from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.perceptual import build_backbone_features
from napari_anopilad.method.scorers import load_any_bundle, make_scorer, score_names
from napari_anopilad.slide import build_patch_grid, open_slide, read_patches
from napari_anopilad.training import anoddpm_train, calibrate, extract
from napari_anopilad.training.manifest import load_patches, read_manifest, select_rows

SPLIT_CSV = """slide,split,mpp
TCGA-CR-7395-01A-01-TS1,train,0.5
CMU-1-Small-Region,validation,
"""
TINY_UNET = anoddpm_train.unet_config([8, 16], 1, [], 4, mid_attention=False)


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**TINY_UNET).eval()


@pytest.fixture(scope="module")
def patches(tmp_path_factory, data_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("anoddpm-patches")
    (root / "split.csv").write_text(SPLIT_CSV)
    output = root / "patches"
    arguments = [
        str(data_dir / "slides"),
        "--split",
        str(root / "split.csv"),
        "--output",
        str(output),
        "--target-mpp",
        "1.0",
        "--max-patches-per-slide",
        "3",
    ]
    assert extract.main(arguments) == 0
    return output


@pytest.fixture(scope="module")
def real_patches(patches: Path) -> np.ndarray:
    rows = select_rows(read_manifest(patches), splits=["train", "validation"], labels=["normal"])
    images = load_patches(patches, rows["path"][:4])
    assert images.shape == (4, 256, 256, 3)
    return images


@pytest.fixture(scope="module")
def lpips_backbone(tmp_path_factory) -> Path:
    """A random AlexNet ``features`` module, the LPIPS backbone the demo bundle uses."""
    path = tmp_path_factory.mktemp("lpips") / "alex_features.safetensors"
    torch.manual_seed(0)
    features = build_backbone_features("alex")
    save_file({key: value.contiguous() for key, value in features.state_dict().items()}, str(path))
    return path


def train_arguments(patches: Path, output: Path, backbone: Path, steps: int) -> list[str]:
    return [
        str(patches),
        "--output",
        str(output),
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--learning-rate",
        "0.001",
        "--checkpoint-every",
        "2",
        "--crop-size",
        "64",
        "--block-out-channels",
        "8,16",
        "--layers-per-block",
        "1",
        "--attention-levels",
        "",
        "--norm-num-groups",
        "4",
        "--no-mid-attention",
        "--lpips-backbone",
        str(backbone),
        "--lpips-net",
        "alex",
        "--start-timestep",
        "150",
        "--num-inference-steps",
        "10",
    ]


@pytest.fixture(scope="module")
def trained(patches: Path, lpips_backbone: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("anoddpm-run") / "run"
    assert anoddpm_train.main(train_arguments(patches, output, lpips_backbone, 4)) == 0
    return output


def as_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def crops_64(images: np.ndarray) -> torch.Tensor:
    """Central 64 px crops: the samplers' arithmetic does not depend on the image size, and they run 16x faster."""
    return as_pixels(images[:, 96:160, 96:160])


def test_reconstruction_matches_diffusers_ddim(real_patches: np.ndarray):
    unet = tiny_unet()
    config = anoddpm_train.scheduler_config()
    pixels = crops_64(real_patches[:2])
    noise = gaussian_noise([11, 12], (3, 64, 64))

    # start 320 on a 10-step grid (900, 800, ..., 0) starts at 300: four DDIM steps.
    ours = reconstruct_pixels(unet, config, pixels, noise, start_timestep=320, num_inference_steps=10)

    scheduler = DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    timesteps = [int(t) for t in scheduler.timesteps]
    start = timesteps.index(300)
    sample = scheduler.add_noise(pixels, noise, torch.tensor([300]))
    with torch.no_grad():
        for timestep in timesteps[start:]:
            epsilon = unet(sample, timestep).sample
            sample = scheduler.step(epsilon, timestep, sample, eta=0.0).prev_sample

    assert timesteps[start:] == [300, 200, 100, 0]
    torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-5)


def test_plms_matches_diffusers_pndm(real_patches: np.ndarray):
    unet = tiny_unet(1)
    config = anoddpm_train.scheduler_config()
    pixels = crops_64(real_patches[:2])
    noise = gaussian_noise([21, 22], (3, 64, 64))

    # A start at the top of a 3-step grid (666, 333, 0) runs the whole PLMS sequence, warm-up included.
    ours = reconstruct_pixels(
        unet, config, pixels, noise, start_timestep=666, num_inference_steps=3, sampler="plms"
    )

    scheduler = PNDMScheduler.from_config(config, skip_prk_steps=True, set_alpha_to_one=True)
    scheduler.set_timesteps(3)
    sample = scheduler.add_noise(pixels, noise, torch.tensor([666]))
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            epsilon = unet(sample, timestep).sample
            sample = scheduler.step(epsilon, timestep, sample).prev_sample

    assert [int(t) for t in scheduler.timesteps] == [666, 333, 333, 0]
    torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-5)


def test_ddpm_loss_hand_computed():
    unet = tiny_unet(2)
    rng = np.random.default_rng(3)
    pixels = rng.uniform(-1, 1, size=(2, 3, 16, 16))
    noise = rng.standard_normal((2, 3, 16, 16))
    timesteps = np.array([0, 999])

    betas = np.linspace(0.0001, 0.02, 1000)
    alpha_bar = np.cumprod(1.0 - betas)[timesteps].reshape(-1, 1, 1, 1)
    noisy = np.sqrt(alpha_bar) * pixels + np.sqrt(1.0 - alpha_bar) * noise
    with torch.no_grad():
        predicted = unet(torch.from_numpy(noisy).float(), torch.from_numpy(timesteps)).sample.double().numpy()
    expected = np.mean((predicted - noise) ** 2)

    with torch.no_grad():
        loss = ddpm_loss(
            unet,
            alphas_cumprod(anoddpm_train.scheduler_config()),
            torch.from_numpy(pixels).float(),
            torch.from_numpy(timesteps),
            torch.from_numpy(noise).float(),
        )
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_noise_seeded_per_input():
    pair = gaussian_noise([5, 9], (3, 4, 4))
    single = gaussian_noise([9], (3, 4, 4))
    reference = torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(pair[1], single[0], rtol=0, atol=0)
    torch.testing.assert_close(single[0], reference, rtol=0, atol=0)


def test_training_lowers_fixed_batch_loss(trained: Path, real_patches: np.ndarray):
    log = pd.read_csv(trained / "loss_log.csv")
    assert list(log["step"]) == [0, 1, 2, 3]
    assert np.isfinite(log["loss"]).all()

    bundle = load_baseline_bundle(trained / "bundle")
    initial = anoddpm_train.AnoDDPMTrainer(
        bundle.model["unet"],
        bundle.model["scheduler"],
        "alex",
        build_backbone_features("alex").state_dict(),
        0.001,
        0,
        "cpu",
        bundle.settings,
    ).unet
    trained_unet = UNet2DModel(**bundle.model["unet"])
    trained_unet.load_state_dict(bundle.state_dict("model"))
    alphas = alphas_cumprod(bundle.model["scheduler"])
    pixels = crops_64(real_patches[:2])
    timesteps = torch.tensor([100, 600])
    noise = gaussian_noise([1, 2], (3, 64, 64))
    with torch.no_grad():
        before = float(ddpm_loss(initial.eval(), alphas, pixels, timesteps, noise))
        after = float(ddpm_loss(trained_unet.eval(), alphas, pixels, timesteps, noise))
    assert after < before


def test_resume_matches_uninterrupted(trained: Path, patches: Path, lpips_backbone: Path, tmp_path: Path):
    output = tmp_path / "run"
    assert anoddpm_train.main(train_arguments(patches, output, lpips_backbone, 2)) == 0
    assert anoddpm_train.main(train_arguments(patches, output, lpips_backbone, 4)) == 0

    resumed = load_file(str(output / "bundle" / "model.safetensors"))
    uninterrupted = load_file(str(trained / "bundle" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    log = pd.read_csv(output / "loss_log.csv")
    assert list(log["step"]) == [0, 1, 2, 3]


def test_bundle_records_method_and_options(trained: Path):
    bundle = load_any_bundle(trained / "bundle")
    assert bundle.method == "anoddpm"
    assert score_names(bundle) == ("mse", "lpips")
    assert sorted(bundle.weights) == ["lpips", "model"]
    assert dict(bundle.settings.options) == {
        "start_timestep": 150,
        "num_inference_steps": 10,
        "sampler": "ddim",
        "noise": "gaussian",
    }
    assert bundle.model["scheduler"]["beta_schedule"] == "linear"
    assert bundle.calibration is None


def test_scores_batch_independent(trained: Path, real_patches: np.ndarray):
    scorer = make_scorer(load_any_bundle(trained / "bundle"))
    keys = [("slide", 3, index) for index in range(4)]
    batch = scorer.score(real_patches, keys, return_reconstructions=True)
    singles = [scorer.score(real_patches[i : i + 1], keys[i : i + 1]) for i in range(4)]

    assert batch.reconstructions is not None
    assert batch.reconstructions.shape == (4, 256, 256, 3)
    for name in ("mse", "lpips"):
        values = batch.values(name)
        assert np.isfinite(values).all(), name
        assert (values > 0).all(), name
        single_values = np.concatenate([scores.values(name) for scores in singles])
        np.testing.assert_allclose(single_values, values, rtol=1e-5, err_msg=name)


def test_empty_batch_gives_no_scores(trained: Path):
    scorer = make_scorer(load_any_bundle(trained / "bundle"))
    scores = scorer.score(np.zeros((0, 256, 256, 3), dtype=np.uint8), [], return_reconstructions=True)
    assert len(scores) == 0
    assert scores.values("lpips").shape == (0,)
    assert scores.reconstructions is not None
    assert scores.reconstructions.shape == (0, 256, 256, 3)


def test_mse_is_mean_squared_pixel_error(trained: Path, real_patches: np.ndarray):
    scorer = make_scorer(load_any_bundle(trained / "bundle"))
    pixels = as_pixels(real_patches[:1])
    values, reconstructed = scorer.score_pixels(pixels, [7], return_reconstructions=True)

    assert reconstructed is not None
    images = pixels.double().numpy()
    reconstruction = reconstructed.double().numpy()
    assert reconstruction.min() >= -1.0
    assert reconstruction.max() <= 1.0
    expected = ((images - reconstruction) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(values["mse"].double().numpy(), expected, rtol=1e-5)


def test_sampler_and_start_change_scores(trained: Path, real_patches: np.ndarray):
    bundle = load_any_bundle(trained / "bundle")
    keys = [("slide", 0, 0)]
    default = make_scorer(bundle).score(real_patches[:1], keys).values("mse")
    plms = make_scorer(bundle, settings=bundle.settings.with_overrides(sampler="plms"))
    later = make_scorer(bundle, settings=bundle.settings.with_overrides(start_timestep=250))
    reseeded = make_scorer(bundle, settings=bundle.settings.with_overrides(seed=1))

    assert not np.allclose(plms.score(real_patches[:1], keys).values("mse"), default)
    assert not np.allclose(later.score(real_patches[:1], keys).values("mse"), default)
    assert not np.allclose(reseeded.score(real_patches[:1], keys).values("mse"), default)
    assert later.calibration is None


def test_session_stores_scores_of_real_slide(trained: Path, cmu_slide_path: Path, tmp_path: Path):
    bundle = load_any_bundle(trained / "bundle")
    scorer = make_scorer(bundle)
    with open_slide(cmu_slide_path) as slide:
        grid = build_patch_grid(slide)
        cells = grid.tissue_cells()[:3]
        store = ResultStore(
            tmp_path / "store", slide.identity, bundle.identity, scorer.settings, grid_description(grid)
        )
        batches = list(AnalysisSession(slide, grid, scorer, store, cells=cells, batch_size=2).run())
        direct = scorer.score(read_patches(slide, grid, cells), [(slide.identity, r, c) for r, c in cells])

    assert sum(len(batch.cells) for batch in batches) == 3
    stored = store.load()
    order = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(stored.rows, stored.cols))}
    for index, (row, col) in enumerate(cells):
        for name in ("mse", "lpips"):
            assert stored.scores(name)[order[(int(row), int(col))]] == pytest.approx(
                direct.values(name)[index], rel=1e-5
            )


def test_calibrate_writes_statistics_scorer_uses(trained: Path, patches: Path, tmp_path: Path):
    folder = tmp_path / "bundle"
    shutil.copytree(trained / "bundle", folder)
    assert calibrate.main([str(patches), "--bundle", str(folder), "--start-timestep", "90"]) == 0

    spec = json.loads((folder / "bundle.json").read_text())
    scores = pd.read_csv(folder / calibrate.CALIBRATION_SCORES_NAME)
    validation = select_rows(read_manifest(patches), splits=["validation"], labels=["normal"])
    assert spec["settings"]["options"]["start_timestep"] == 90
    assert spec["calibration"]["count"] == len(validation)

    scorer = make_scorer(load_any_bundle(folder, require_calibration=True))
    assert scorer.calibration is not None
    assert scorer.settings.options["start_timestep"] == 90
    for name in ("mse", "lpips"):
        assert scorer.calibration.mean[name] == pytest.approx(scores[name].mean())
        assert scorer.calibration.std[name] == pytest.approx(np.std(scores[name], ddof=0))
    z = scorer.z_scores(scores["mse"].to_numpy())
    assert z.source == "calibration"
    np.testing.assert_allclose(z.values, (scores["mse"] - scores["mse"].mean()) / np.std(scores["mse"]))


def test_missing_weight_file_names_it(trained: Path, tmp_path: Path):
    folder = tmp_path / "bundle"
    shutil.copytree(trained / "bundle", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors.*retrain or copy the bundle whole"):
        load_any_bundle(folder)


def test_wrong_architecture_names_file(trained: Path, tmp_path: Path):
    folder = tmp_path / "bundle"
    shutil.copytree(trained / "bundle", folder)
    spec = json.loads((folder / "bundle.json").read_text())
    spec["model"]["unet"]["block_out_channels"] = [8, 32]
    (folder / "bundle.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=r"model\.safetensors does not match its model config"):
        make_scorer(load_any_bundle(folder))


def test_wrong_lpips_backbone_names_file(trained: Path, tmp_path: Path):
    folder = tmp_path / "bundle"
    shutil.copytree(trained / "bundle", folder)
    backbone = load_file(str(folder / "lpips.safetensors"))
    backbone["0.weight"] = backbone["0.weight"][:, :1].contiguous()
    save_file(backbone, str(folder / "lpips.safetensors"))
    with pytest.raises(BundleError, match=r"LPIPS backbone: checkpoint .*lpips\.safetensors does not match"):
        make_scorer(load_any_bundle(folder))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sampler": "euler"}, "sampler 'euler' is invalid"),
        ({"start_timestep": 1000}, "start_timestep 1000 is invalid: use 0 to 999"),
        ({"num_inference_steps": 0}, "num_inference_steps 0 is invalid"),
        ({"noise": "simplex"}, "simplex noise is not implemented"),
        ({"strength": 0.5}, r"unknown anoddpm options \['strength'\]"),
    ],
)
def test_invalid_options_rejected(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        check_options(options)


def test_scorer_rejects_invalid_settings(trained: Path):
    bundle = load_baseline_bundle(trained / "bundle")
    settings = BaselineSettings("anoddpm", "mse", options={**bundle.settings.options, "sampler": "euler"})
    with pytest.raises(ValueError, match="sampler 'euler' is invalid"):
        AnoDDPMScorer(bundle, settings=settings)
    with pytest.raises(ValueError, match="score 'ssim' is invalid"):
        AnoDDPMScorer(bundle, settings=BaselineSettings("anoddpm", "ssim", options=bundle.settings.options))


def test_train_rejects_bad_options(patches: Path, lpips_backbone: Path, tmp_path: Path):
    arguments = train_arguments(patches, tmp_path / "run", lpips_backbone, 1)
    with pytest.raises(SystemExit, match="--crop-size 8 is invalid for 5 UNet levels: use a multiple of 16"):
        anoddpm_train.main([*arguments, "--crop-size", "8", "--block-out-channels", "8,8,16,16,16"])
    with pytest.raises(SystemExit, match=r"LPIPS backbone: checkpoint .* does not match"):
        anoddpm_train.main([*arguments, "--lpips-net", "vgg"])
    with pytest.raises(SystemExit, match="norm groups 4 do not divide the channels"):
        anoddpm_train.main([*arguments, "--block-out-channels", "6,16"])
    assert not (tmp_path / "run").exists()


def test_resume_rejects_other_architecture(
    trained: Path, patches: Path, lpips_backbone: Path, tmp_path: Path
):
    output = tmp_path / "run"
    shutil.copytree(trained, output)
    arguments = train_arguments(patches, output, lpips_backbone, 6)
    with pytest.raises(SystemExit, match=r"another UNet or noise schedule \(unet\.block_out_channels\)"):
        anoddpm_train.main([*arguments, "--block-out-channels", "8,8"])


def test_cohort_accepts_anoddpm_options(trained: Path):
    from napari_anopilad.cli import CommandError
    from napari_anopilad.commands.analyze_cohort import _check_method_settings

    bundle = trained / "bundle"
    unset = {"guidance_scale": None, "precision": None, "unprompted": None, "score": None}

    _check_method_settings(
        bundle, {**unset, "start_timestep": 300, "sampler": "plms", "num_inference_steps": 50}
    )

    with pytest.raises(CommandError, match="--guidance-scale: AnoPILaD settings, which do not apply"):
        _check_method_settings(bundle, {**unset, "guidance_scale": 3.0, "start_timestep": 300})
