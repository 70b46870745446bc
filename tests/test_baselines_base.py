"""The pieces every comparison method shares: settings, crops, seeds, bundle checks, named scores in the store."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_anopilad.engine.store import ResultStore
from napari_anopilad.method.baselines.autoencoders import AutoencoderConfig, build_network, default_settings
from napari_anopilad.method.baselines.base import (
    BaselineCalibration,
    BaselineSettings,
    bundle_method,
    from_crops,
    load_baseline_bundle,
    noise_seed,
    save_baseline_bundle,
    to_crops,
)
from napari_anopilad.method.errors import BundleError
from napari_anopilad.training.baselines import _trim_log, training_batch


def _memae_bundle(folder: Path) -> Path:
    """Save a tiny MemAE bundle with random weights."""
    torch.manual_seed(0)
    config = AutoencoderConfig(channels=(4, 8), latent_channels=8, memory_items=6)
    network = build_network("memae", config)
    return save_baseline_bundle(
        folder, "memae", config.to_dict(), {"model": network.state_dict()}, default_settings("memae")
    )


def test_settings_round_trip_and_key_change_with_options() -> None:
    settings = BaselineSettings("anoddpm", "mse", seed=3, options={"start_timestep": 250, "sampler": "ddim"})
    assert BaselineSettings.from_dict(settings.to_dict()) == settings
    changed = settings.with_overrides(start_timestep=300)
    assert changed.options["start_timestep"] == 300
    assert changed.score_key() != settings.score_key()
    # The score choice is part of the key too: the store keeps one folder per scored quantity.
    assert settings.with_overrides(score="lpips").score_key() != settings.score_key()
    assert settings.with_overrides(start_timestep=None) == settings


def test_settings_reject_unknown_option() -> None:
    settings = BaselineSettings("memae", "mse")
    with pytest.raises(ValueError, match="'guidance_scale' does not apply to the memae method"):
        settings.with_overrides(guidance_scale=7.5)
    with pytest.raises(ValueError, match="unknown comparison-method settings"):
        BaselineSettings.from_dict({"method": "ae", "score": "mse", "steps": 3})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "ae", "score": "mse", "seed": 2.5}, "seed 2.5 is invalid: use an integer"),
        ({"method": "ae", "score": "mse", "seed": "1"}, "seed '1' is invalid: use an integer"),
        ({"method": 42, "score": "mse"}, "method 42 is invalid: use a string"),
        ({"method": "ae", "score": None}, "score None is invalid: use a string"),
        ({"method": "ae", "score": "mse", "options": [1]}, "options [1] is invalid: use an object"),
        ({"method": "ae"}, "comparison-method settings need 'score'"),
    ],
)
def test_settings_reject_wrong_types(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        BaselineSettings.from_dict(values)


def test_bundle_settings_error_names_file(tmp_path) -> None:
    folder = _memae_bundle(tmp_path / "bundle")
    spec = json.loads((folder / "bundle.json").read_text())
    spec["settings"]["seed"] = 2.5
    (folder / "bundle.json").write_text(json.dumps(spec))

    with pytest.raises(BundleError) as raised:
        load_baseline_bundle(folder)

    assert str(raised.value) == f"settings in {folder / 'bundle.json'}: seed 2.5 is invalid: use an integer"


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ({"mse": {"mean": 1.0, "std": "x"}}, "scores.mse.std 'x' is invalid: use a finite number"),
        ({"mse": {"mean": None, "std": 1.0}}, "scores.mse.mean None is invalid: use a finite number"),
        ({"mse": {"mean": 1.0, "std": -1.0}}, "scores.mse.std -1.0 is invalid: use a positive number"),
        ({"l1": {"mean": 1.0, "std": 1.0}}, "scores has no statistics for the score 'mse'"),
    ],
)
def test_calibration_rejects_wrong_values(scores: dict, message: str) -> None:
    values = {"count": 10, "settings": BaselineSettings("ae", "mse").to_dict(), "scores": scores}

    with pytest.raises(BundleError) as raised:
        BaselineCalibration.from_dict(values, ("mse",), source="bundle/bundle.json")

    assert str(raised.value).startswith(f"calibration in bundle/bundle.json: {message}")


def test_calibration_count_must_be_integer() -> None:
    values = {
        "count": 10.5,
        "settings": BaselineSettings("ae", "mse").to_dict(),
        "scores": {"mse": {"mean": 1.0, "std": 1.0}},
    }

    with pytest.raises(BundleError, match=r"^calibration: count 10.5 is invalid: use an integer$"):
        BaselineCalibration.from_dict(values, ("mse",))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"importance_samples": 2.5}, "importance_samples 2.5 is invalid: use an integer"),
        ({"regret_steps": True}, "regret_steps True is invalid: use an integer"),
        ({"regret_learning_rate": "0.01"}, "regret_learning_rate '0.01' is invalid: use a finite number"),
        ({"regret_learning_rate": float("inf")}, "regret_learning_rate inf is invalid: use a finite number"),
        ({"compressor": 1}, "compressor 1 is invalid: use a string"),
    ],
)
def test_vae_density_options_reject_wrong_types(options: dict, message: str) -> None:
    from napari_anopilad.method.baselines.vae_density import VaeDensityOptions

    with pytest.raises(ValueError, match=re.escape(message)):
        VaeDensityOptions.from_options(options)


@pytest.mark.parametrize(
    ("kappa", "message"),
    [
        ("1.5", "kappa '1.5' is invalid: use a finite number"),
        (float("nan"), "kappa nan is invalid: use a finite number"),
        (True, "kappa True is invalid: use a finite number"),
        (-1, "kappa -1 is invalid: use a finite number of 0 or more"),
    ],
)
def test_kappa_rejects_wrong_values(kappa: object, message: str) -> None:
    from napari_anopilad.method.baselines.fanogan import check_kappa

    with pytest.raises(ValueError, match=re.escape(message)):
        check_kappa(kappa)


def test_calibration_differences_ignore_the_score_choice() -> None:
    measured = BaselineSettings("anoddpm", "mse", options={"start_timestep": 250})
    calibration = BaselineCalibration({"mse": 1.0}, {"mse": 0.5}, 10, measured)
    assert calibration.differences(measured.with_overrides(score="lpips")) == []
    assert calibration.differences(measured.with_overrides(start_timestep=100)) == [
        "start_timestep: 250 -> 100"
    ]


def test_crops_are_row_major_tiles_and_reassemble() -> None:
    patches = torch.arange(2 * 3 * 256 * 256, dtype=torch.float32).reshape(2, 3, 256, 256)
    crops, per_patch = to_crops(patches, 64)
    assert per_patch == 16
    assert crops.shape == (32, 3, 64, 64)
    # Crop 6 of patch 1 is tile row 1, tile col 2.
    assert torch.equal(crops[16 + 6], patches[1, :, 64:128, 128:192])
    assert torch.equal(from_crops(crops, 2, 64), patches)
    with pytest.raises(ValueError, match="do not split into 48 px crops"):
        to_crops(patches, 48)


def test_noise_seed_uses_whole_key() -> None:
    base = noise_seed(("slide", 1, 2), 0)
    assert base == noise_seed(("slide", 1, 2), 0)
    others = {
        noise_seed(("other", 1, 2), 0),
        noise_seed(("slide", 2, 1), 0),
        noise_seed(("slide", 1, 2), 1),
        noise_seed(("slide", 1, 2), 0, crop=1),
    }
    assert base not in others
    assert len(others) == 4
    assert 0 <= base < 2**63


def test_training_batch_reproducible_crops() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 256, 256, 3), dtype=np.uint8)
    first = training_batch(images, step=7, batch_size=4, crop_size=64, seed=1)
    assert torch.equal(first, training_batch(images, step=7, batch_size=4, crop_size=64, seed=1))
    assert not torch.equal(first, training_batch(images, step=8, batch_size=4, crop_size=64, seed=1))
    assert first.shape == (4, 3, 64, 64)
    # Each crop is some patch's window at some offset, scaled to [-1, 1].
    crop = ((first[0].permute(1, 2, 0) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    found = any(
        np.array_equal(images[index, y : y + 64, x : x + 64], crop)
        for index in range(5)
        for y in range(193)
        for x in range(193)
        if images[index, y, x, 0] == crop[0, 0, 0]
    )
    assert found


def test_trim_log_drops_later_steps(tmp_path) -> None:
    log = tmp_path / "loss_log.csv"
    log.write_text("step,loss\n0,1.0\n1,0.9\n2,0.8\n3,0.7\n")
    _trim_log(log, 2)
    with open(log, newline="") as handle:
        assert list(csv.reader(handle)) == [["step", "loss"], ["0", "1.0"], ["1", "0.9"]]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format_version", True, "format_version True is invalid: use the integer 1"),
        ("format_version", "1", "format_version '1' is invalid: use the integer 1"),
        ("format_version", 2, "format_version 2 is not supported"),
        ("name", 5, "name 5 is invalid: use a string"),
    ],
)
def test_bundle_header_wrong_type(tmp_path, key: str, value: object, message: str) -> None:
    folder = _memae_bundle(tmp_path / "bundle")
    spec_path = folder / "bundle.json"
    spec = json.loads(spec_path.read_text())
    spec[key] = value
    spec_path.write_text(json.dumps(spec))

    with pytest.raises(BundleError) as raised:
        load_baseline_bundle(folder)

    assert str(raised.value).startswith(f"bundle in {spec_path}: {message}")


def test_bundle_name_defaults_to_method(tmp_path) -> None:
    folder = _memae_bundle(tmp_path / "bundle")
    spec_path = folder / "bundle.json"
    spec = json.loads(spec_path.read_text())
    del spec["name"]
    spec_path.write_text(json.dumps(spec))

    assert load_baseline_bundle(folder).name == "memae"


def test_bundle_method_default_and_unknown(tmp_path) -> None:
    (tmp_path / "bundle.json").write_text(json.dumps({"format_version": 1}))
    assert bundle_method(tmp_path) == "anopilad"
    (tmp_path / "bundle.json").write_text(json.dumps({"format_version": 1, "method": "pca"}))
    with pytest.raises(BundleError, match="method 'pca' is unknown"):
        load_baseline_bundle(tmp_path)
    with pytest.raises(BundleError, match="not found"):
        bundle_method(tmp_path / "missing")


def test_store_named_and_legacy_scores(tmp_path) -> None:
    settings = BaselineSettings("memae", "mse")
    store = ResultStore(tmp_path, "slide-id", "bundle-id", settings)
    store.write_batch([(0, 1), (2, 3)], scores={"mse": [0.5, 0.25], "l1": [0.1, 0.2]})
    store.write_batch([(0, 1)], scores={"mse": [0.75], "l1": [0.3]})
    stored = store.load()
    assert stored.score_names == ["l1", "mse"]
    by_cell = {(int(r), int(c)): value for r, c, value in zip(stored.rows, stored.cols, stored.scores("mse"))}
    assert by_cell == {(0, 1): 0.75, (2, 3): 0.25}
    assert stored.keywords.shape == (2, 0)
    assert list(stored.prompts) == ["", ""]
    with pytest.raises(ValueError, match="score 'lpips' is not stored here"):
        stored.scores("lpips")

    # A batch file in the layout before named scores ("lpips" and "mse_latent" keys) still loads.
    old = ResultStore(tmp_path / "old", "slide-id", "bundle-id", settings)
    np.savez(
        old.folder / "batch-00000001-abcd.npz",
        rows=np.array([4]),
        cols=np.array([5]),
        lpips=np.array([0.3]),
        mse_latent=np.array([0.02]),
        keywords=np.zeros((1, 0), "<U1"),
        similarities=np.zeros((1, 0)),
        weights=np.zeros((1, 0)),
        prompts=np.array([""]),
        has_reconstruction=np.array([False]),
    )
    legacy = old.load()
    assert legacy.lpips.tolist() == [0.3]
    assert legacy.mse_latent.tolist() == [0.02]


def test_store_refuses_batches_with_different_scores(tmp_path) -> None:
    store = ResultStore(tmp_path, "slide-id", "bundle-id", BaselineSettings("ae", "mse"))
    store.write_batch([(0, 0)], scores={"mse": [0.5]})
    store.write_batch([(0, 1)], scores={"l1": [0.5]})
    with pytest.raises(ValueError, match="holds other scores"):
        store.load()
    with pytest.raises(ValueError, match="score name 'bad name' is invalid"):
        store.write_batch([(0, 2)], scores={"bad name": [0.5]})
