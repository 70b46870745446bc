"""Model bundle: the demo bundle loads, and each missing or mismatched part fails with a message naming it."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_anopilad.method.bundle import BundleError, load_bundle, load_prompt_parts
from napari_anopilad.method.settings import InferenceSettings


class NotATensor:
    """A pickled object that ``torch.load(weights_only=True)`` must reject."""

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (str, ("pickled object",))


@pytest.fixture
def bundle_copy(demo_bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the demo bundle that a test may break."""
    target = tmp_path / "bundle"
    shutil.copytree(demo_bundle_dir, target, ignore=shutil.ignore_patterns(".cache"))
    return target


def read_spec(folder: Path) -> dict:
    return json.loads((folder / "bundle.json").read_text())


def write_spec(folder: Path, spec: dict) -> None:
    (folder / "bundle.json").write_text(json.dumps(spec, indent=2))


def save_unet_lora(bundle_folder: Path, target: Path, rank: int, targets: list[str]) -> None:
    """Save a LoRA for the demo UNet with peft and diffusers, as training does."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(bundle_folder / "sd15" / "unet")
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    )
    StableDiffusionPipeline.save_lora_weights(
        target,
        unet_lora_layers=get_peft_model_state_dict(unet),
        safe_serialization=True,
        unet_lora_adapter_metadata={"r": rank, "lora_alpha": rank, "target_modules": targets},
    )


def test_demo_bundle_loads(demo_bundle_dir: Path) -> None:
    bundle = load_bundle(demo_bundle_dir)

    assert bundle.demo is True
    assert len(bundle.keywords) == 74
    assert len(bundle.templates) == 22
    assert bundle.lora.rank == 4
    assert bundle.lora.alpha == 4
    assert bundle.calibration is not None
    assert bundle.calibration_note is None
    assert bundle.calibration.settings == bundle.settings
    assert bundle.calibration.count == 3
    assert all(bundle.calibration.std[name] > 0 for name in ("lpips", "mse_latent"))
    assert len(bundle.identity) == 16


def test_identity_is_stable_across_copies(demo_bundle_dir: Path, bundle_copy: Path) -> None:
    assert load_bundle(demo_bundle_dir).identity == load_bundle(bundle_copy).identity
    assert load_bundle(bundle_copy).identity == load_bundle(bundle_copy).identity


def test_identity_changes_with_weights(demo_bundle_dir: Path, bundle_copy: Path) -> None:
    lora_path = bundle_copy / "lora" / "pytorch_lora_weights.safetensors"
    state_dict = load_file(lora_path)
    first_key = sorted(key for key in state_dict if "lora_B" in key)[0]
    state_dict[first_key] = state_dict[first_key] + 0.01
    save_file(state_dict, lora_path, metadata={"format": "pt"})

    assert load_bundle(bundle_copy).identity != load_bundle(demo_bundle_dir).identity


def test_identity_changes_with_settings(bundle_copy: Path) -> None:
    before = load_bundle(bundle_copy)
    spec = read_spec(bundle_copy)
    spec["settings"]["guidance_scale"] = 3.0
    spec["calibration"]["settings"]["guidance_scale"] = 3.0
    write_spec(bundle_copy, spec)

    assert load_bundle(bundle_copy).identity != before.identity


def test_missing_bundle_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"bundle\.json not found"):
        load_bundle(tmp_path)


def test_missing_lora_file(bundle_copy: Path) -> None:
    (bundle_copy / "lora" / "pytorch_lora_weights.safetensors").unlink()

    with pytest.raises(
        BundleError, match=r"^LoRA weights: file .*pytorch_lora_weights.safetensors not found"
    ):
        load_bundle(bundle_copy)


def test_prompt_parts_without_diffusion_parts(demo_bundle_dir: Path, bundle_copy: Path) -> None:
    (bundle_copy / "lora" / "pytorch_lora_weights.safetensors").unlink()
    shutil.rmtree(bundle_copy / "sd15")
    shutil.rmtree(bundle_copy / "lpips")
    full = load_bundle(demo_bundle_dir)

    parts = load_prompt_parts(bundle_copy)

    assert parts.keywords == full.keywords
    assert parts.templates == full.templates
    assert parts.settings == full.settings
    assert parts.demo is True
    # The same hash as the full bundle's, so both use one cached set of keyword embeddings.
    assert parts.part_hashes == {"conch": full.part_hashes["conch"]}
    # load_bundle keeps requiring every part.
    with pytest.raises(BundleError, match=r"^base model: file .*sd15 not found"):
        load_bundle(bundle_copy)


def test_prompt_parts_missing_conch_checkpoint(bundle_copy: Path) -> None:
    checkpoint = bundle_copy / read_spec(bundle_copy)["conch"]["checkpoint"]
    checkpoint.unlink()

    with pytest.raises(BundleError, match=rf"^CONCH checkpoint: file {re.escape(str(checkpoint))} not found"):
        load_prompt_parts(bundle_copy)


def test_prompt_parts_missing_keyword_file(bundle_copy: Path) -> None:
    (bundle_copy / "prompts" / "normal_lymph_node_keywords.txt").unlink()

    with pytest.raises(BundleError, match=r"^keyword bank: file .*normal_lymph_node_keywords.txt not found"):
        load_prompt_parts(bundle_copy)


def test_prompt_parts_reject_comparison_bundle(bundle_copy: Path) -> None:
    spec = read_spec(bundle_copy)
    spec["method"] = "ae"
    write_spec(bundle_copy, spec)

    with pytest.raises(
        BundleError, match=r"is a bundle of the comparison method 'ae', which has no CONCH model"
    ):
        load_prompt_parts(bundle_copy)


def test_lora_of_rank_8(bundle_copy: Path) -> None:
    save_unet_lora(bundle_copy, bundle_copy / "lora", rank=8, targets=["to_q", "to_k", "to_v", "to_out.0"])

    with pytest.raises(BundleError, match=r"^LoRA weights: .* has rank 8 but the bundle declares rank 4"):
        load_bundle(bundle_copy)


def test_lora_with_other_targets(bundle_copy: Path) -> None:
    save_unet_lora(bundle_copy, bundle_copy / "lora", rank=4, targets=["to_q", "to_v"])

    with pytest.raises(BundleError, match=r"^LoRA weights: .* adapts \['to_q', 'to_v'\]"):
        load_bundle(bundle_copy)


def test_lora_for_another_unet(bundle_copy: Path) -> None:
    lora_path = bundle_copy / "lora" / "pytorch_lora_weights.safetensors"
    state_dict = load_file(lora_path)
    down_key = sorted(key for key in state_dict if key.endswith("to_q.lora_A.weight"))[0]
    state_dict[down_key] = torch.zeros(4, state_dict[down_key].shape[1] + 8)
    save_file(state_dict, lora_path)

    with pytest.raises(BundleError, match=r"^LoRA weights: .* the base UNet layer is"):
        load_bundle(bundle_copy)


def test_conch_checkpoint_with_key_removed(bundle_copy: Path) -> None:
    checkpoint = bundle_copy / "conch" / "conch.safetensors"
    state_dict = load_file(checkpoint)
    del state_dict["visual.proj_contrast"]
    save_file(state_dict, checkpoint)

    with pytest.raises(BundleError, match=r"^CONCH checkpoint: .*1 missing keys \(visual.proj_contrast\)"):
        load_bundle(bundle_copy)


def test_conch_checkpoint_with_extra_key(bundle_copy: Path) -> None:
    checkpoint = bundle_copy / "conch" / "conch.safetensors"
    state_dict = load_file(checkpoint)
    state_dict["visual.extra_head.weight"] = torch.zeros(2, 2)
    save_file(state_dict, checkpoint)

    with pytest.raises(
        BundleError, match=r"^CONCH checkpoint: .*1 unexpected keys \(visual.extra_head.weight\)"
    ):
        load_bundle(bundle_copy)


def test_conch_pickle_with_object_is_rejected(bundle_copy: Path) -> None:
    state_dict = load_file(bundle_copy / "conch" / "conch.safetensors")
    torch.save({"state_dict": state_dict, "trainer": NotATensor()}, bundle_copy / "conch" / "conch.pt")
    spec = read_spec(bundle_copy)
    spec["conch"]["checkpoint"] = "conch/conch.pt"
    write_spec(bundle_copy, spec)

    with pytest.raises(
        BundleError, match=r"^CONCH checkpoint: .*conch.pt was rejected by torch.load\(weights_only=True\)"
    ):
        load_bundle(bundle_copy)


def test_conch_pickle_of_tensors_loads(bundle_copy: Path) -> None:
    safetensors_bundle = load_bundle(bundle_copy)
    state_dict = load_file(bundle_copy / "conch" / "conch.safetensors")
    torch.save(
        {"state_dict": {f"module.{key}": value for key, value in state_dict.items()}},
        bundle_copy / "conch" / "conch.bin",
    )
    spec = read_spec(bundle_copy)
    spec["conch"]["checkpoint"] = "conch/conch.bin"
    write_spec(bundle_copy, spec)

    pickle_bundle = load_bundle(bundle_copy)
    from_safetensors = safetensors_bundle.load_conch().state_dict()
    from_pickle = pickle_bundle.load_conch().state_dict()
    assert from_safetensors.keys() == from_pickle.keys()
    for key, value in from_safetensors.items():
        assert torch.equal(value, from_pickle[key]), key


def test_calibration_under_other_settings_is_flagged(bundle_copy: Path) -> None:
    spec = read_spec(bundle_copy)
    spec["calibration"]["settings"]["start_timestep"] = 500
    write_spec(bundle_copy, spec)

    with pytest.warns(UserWarning, match="calibration: measured under other settings"):
        bundle = load_bundle(bundle_copy)

    assert bundle.calibration is None
    assert bundle.calibration_note is not None
    assert "start_timestep: 500 -> 674" in bundle.calibration_note
    assert "within each slide" in bundle.calibration_note


def test_calibration_under_other_settings_fails_when_required(bundle_copy: Path) -> None:
    spec = read_spec(bundle_copy)
    spec["calibration"]["settings"]["start_timestep"] = 500
    write_spec(bundle_copy, spec)

    with pytest.raises(BundleError, match=r"^calibration: measured under other settings .*start_timestep"):
        load_bundle(bundle_copy, require_calibration=True)


def test_calibration_for_other_score_choice_applies(demo_bundle_dir: Path) -> None:
    bundle = load_bundle(demo_bundle_dir)
    other_score = bundle.settings.with_overrides(score="mse_latent")
    other_start = bundle.settings.with_overrides(start_timestep=500)

    assert bundle.calibration_for(other_score) is bundle.calibration
    assert bundle.calibration_for(other_start) is None


def test_calibration_with_zero_std(bundle_copy: Path) -> None:
    spec = read_spec(bundle_copy)
    spec["calibration"]["scores"]["lpips"]["std"] = 0.0
    write_spec(bundle_copy, spec)

    with pytest.raises(
        BundleError, match=r"^calibration in .*bundle.json: scores.lpips.std 0.0 is invalid: use a positive"
    ):
        load_bundle(bundle_copy)


def test_missing_calibration_is_flagged(bundle_copy: Path) -> None:
    spec = read_spec(bundle_copy)
    del spec["calibration"]
    write_spec(bundle_copy, spec)

    bundle = load_bundle(bundle_copy)

    assert bundle.calibration is None
    assert bundle.calibration_note is not None
    assert bundle.calibration_note.startswith("calibration: the bundle has no calibration statistics")


def test_missing_keyword_file(bundle_copy: Path) -> None:
    (bundle_copy / "prompts" / "normal_lymph_node_keywords.txt").unlink()

    with pytest.raises(BundleError, match=r"^keyword bank: file .*normal_lymph_node_keywords.txt not found"):
        load_bundle(bundle_copy)


def test_empty_keyword_file(bundle_copy: Path) -> None:
    (bundle_copy / "prompts" / "normal_lymph_node_keywords.txt").write_text("\n  \n")

    with pytest.raises(BundleError, match=r"^keyword bank: .* is empty"):
        load_bundle(bundle_copy)


def test_template_without_placeholder(bundle_copy: Path) -> None:
    (bundle_copy / "prompts" / "keyword_templates.txt").write_text("an image of {}.\nan image.\n")

    with pytest.raises(BundleError, match=r"^caption templates: .*without exactly one \{\}: \['an image.'\]"):
        load_bundle(bundle_copy)


def test_lpips_backbone_of_other_net(bundle_copy: Path) -> None:
    spec = read_spec(bundle_copy)
    spec["lpips"]["net"] = "vgg"
    write_spec(bundle_copy, spec)

    with pytest.raises(
        BundleError, match=r"^LPIPS backbone: checkpoint .*alex_features.safetensors does not match"
    ):
        load_bundle(bundle_copy)


def test_missing_base_model_folder(bundle_copy: Path) -> None:
    shutil.rmtree(bundle_copy / "sd15" / "vae")

    with pytest.raises(BundleError, match=r"^base model: .*sd15 lacks the vae/ folder"):
        load_bundle(bundle_copy)


def test_invalid_settings(bundle_copy: Path) -> None:
    spec = read_spec(bundle_copy)
    spec["settings"]["sampler"] = "euler"
    write_spec(bundle_copy, spec)

    with pytest.raises(
        BundleError, match=r"^inference settings in .*bundle.json: sampler 'euler' is invalid"
    ):
        load_bundle(bundle_copy)


# Each case: where in bundle.json the value goes, the value, and the start of the message (FILE: bundle.json).
WRONG_TYPES = [
    (("base_model", "path"), 42, "base model in FILE: base_model.path 42 is invalid: use a file path"),
    (
        ("settings", "start_timestep"),
        "abc",
        "inference settings in FILE: start_timestep 'abc' is invalid: use an integer",
    ),
    (
        ("settings", "num_inference_steps"),
        2.5,
        "inference settings in FILE: num_inference_steps 2.5 is invalid: use an integer",
    ),
    (("settings", "seed"), True, "inference settings in FILE: seed True is invalid: use an integer"),
    (
        ("settings", "guidance_scale"),
        None,
        "inference settings in FILE: guidance_scale None is invalid: use a finite number",
    ),
    (
        ("settings", "guidance_scale"),
        "7.5",
        "inference settings in FILE: guidance_scale '7.5' is invalid: use a finite number",
    ),
    (
        ("settings", "unprompted"),
        "no",
        "inference settings in FILE: unprompted 'no' is invalid: use true or false",
    ),
    (("settings", "sampler"), 5, "inference settings in FILE: sampler 5 is invalid: use one of ddim, plms"),
    (("settings",), [1, 2], "inference settings in FILE: the settings [1, 2] are invalid: use an object"),
    (
        ("calibration", "scores", "lpips", "std"),
        "x",
        "calibration in FILE: scores.lpips.std 'x' is invalid: use a finite number",
    ),
    (
        ("calibration", "scores", "mse_latent", "mean"),
        float("nan"),
        "calibration in FILE: scores.mse_latent.mean nan is invalid: use a finite number",
    ),
    (
        ("calibration", "scores", "lpips"),
        0.5,
        "calibration in FILE: scores.lpips 0.5 is invalid: use an object with a 'mean' and a 'std'",
    ),
    (("calibration", "count"), 2.5, "calibration in FILE: count 2.5 is invalid: use an integer"),
    (
        ("calibration", "settings", "guidance_scale"),
        None,
        "calibration in FILE: the settings are invalid (guidance_scale None is invalid",
    ),
    (
        ("calibration",),
        [],
        "calibration in FILE: [] is invalid: use an object with 'count', 'settings' and 'scores'",
    ),
    (("lora", "rank"), 4.0, "LoRA weights in FILE: lora.rank 4.0 is invalid: use an integer"),
    (("lora", "alpha"), "4", "LoRA weights in FILE: lora.alpha '4' is invalid: use a finite number"),
    (
        ("lora", "target_modules"),
        "to_q",
        "LoRA weights in FILE: lora.target_modules 'to_q' is invalid: use a list",
    ),
    (("conch", "checkpoint"), 7, "CONCH checkpoint in FILE: conch.checkpoint 7 is invalid: use a string"),
    (
        ("lpips", "backbone"),
        ["a"],
        "LPIPS backbone in FILE: lpips.backbone ['a'] is invalid: use a file path",
    ),
    (
        ("prompts", "keywords"),
        {"file": "k.txt"},
        "keyword bank in FILE: prompts.keywords {'file': 'k.txt'} is invalid",
    ),
    (("demo",), "false", "bundle in FILE: demo 'false' is invalid: use true or false"),
    (("format_version",), True, "bundle in FILE: format_version True is invalid: use the integer 1"),
    (("format_version",), "1", "bundle in FILE: format_version '1' is invalid: use the integer 1"),
    (("format_version",), 1.0, "bundle in FILE: format_version 1.0 is invalid: use the integer 1"),
    (("format_version",), None, "bundle in FILE: format_version None is invalid: use the integer 1"),
    (("format_version",), 2, "bundle in FILE: format_version 2 is not supported"),
    (("name",), 5, "bundle in FILE: name 5 is invalid: use a string"),
]


@pytest.mark.parametrize(
    ("keys", "value", "message"),
    WRONG_TYPES,
    ids=[".".join(case[0]) + f"={case[1]!r}" for case in WRONG_TYPES],
)
def test_wrong_type_named_with_file(
    bundle_copy: Path, keys: tuple[str, ...], value: object, message: str
) -> None:
    spec = read_spec(bundle_copy)
    section = spec
    for key in keys[:-1]:
        section = section[key]
    section[keys[-1]] = value
    write_spec(bundle_copy, spec)

    with pytest.raises(BundleError) as raised:
        load_bundle(bundle_copy)

    assert str(raised.value).startswith(message.replace("FILE", str(bundle_copy / "bundle.json")))


def test_settings_keep_json_number_types() -> None:
    import numpy as np

    settings = InferenceSettings(guidance_scale=7, seed=np.int64(3))

    # An integer guidance scale stays an int, so the settings hash of an existing bundle is unchanged.
    assert type(settings.guidance_scale) is int
    assert type(settings.seed) is int
    assert settings.to_dict()["seed"] == 3


def test_hub_base_model_needs_permission(bundle_copy: Path) -> None:
    spec = read_spec(bundle_copy)
    spec["base_model"] = {"kind": "hub", "hub_id": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    write_spec(bundle_copy, spec)

    with pytest.raises(BundleError, match=r"^base model: the bundle names the hub model .*allow downloads"):
        load_bundle(bundle_copy)


def test_hub_download_offline_message(
    bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub reads it; this makes sure of it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    spec = read_spec(bundle_copy)
    spec["base_model"] = {"kind": "hub", "hub_id": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    write_spec(bundle_copy, spec)

    with pytest.raises(ValueError, match=r"is not in the local Hugging Face cache .*HF_HUB_OFFLINE=1"):
        load_bundle(bundle_copy, allow_download=True)


def test_conch_hub_download_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from napari_anopilad.method.hub import download_conch_checkpoint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(ValueError, match=r"^the CONCH checkpoint \(MahmoodLab/CONCH\) is not in the local"):
        download_conch_checkpoint(cache_dir=tmp_path / "hub-cache")


def test_loaded_unet_has_lora_fused(demo_bundle_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    bundle = load_bundle(demo_bundle_dir)
    pipeline = bundle.load_pipeline()
    base_unet = UNet2DConditionModel.from_pretrained(demo_bundle_dir / "sd15" / "unet")
    lora = load_file(bundle.lora.path)
    prefix = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k"

    fused = dict(pipeline.unet.named_modules())[prefix.removeprefix("unet.")].weight
    base = dict(base_unet.named_modules())[prefix.removeprefix("unet.")].weight
    # W' = W + alpha / rank * B @ A, with alpha = rank = 4.
    expected = base + (4 / 4) * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]

    assert not any("lora" in name for name, _ in pipeline.unet.named_parameters())
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fused, base)


def test_vgg_backbone_loads(tmp_path: Path) -> None:
    import torchvision

    from napari_anopilad.method.perceptual import check_lpips_backbone, load_lpips

    torch.manual_seed(0)
    full_vgg = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path / "vgg16.safetensors"
    save_file({key: value.half() for key, value in full_vgg.items()}, path)

    check_lpips_backbone("vgg", path)
    model = load_lpips("vgg", path)
    loaded = model.net.slice3.state_dict()["14.weight"]
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        same = model(images, images).reshape(-1)
        different = model(images, images.flip(0)).reshape(-1)

    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, full_vgg["features.14.weight"].half().float())
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)
    assert bool((different > 0).all())


def test_settings_from_bundle_round_trip(demo_bundle_dir: Path) -> None:
    spec = read_spec(demo_bundle_dir)
    bundle = load_bundle(demo_bundle_dir)

    assert bundle.settings == InferenceSettings.from_dict(spec["settings"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_bundle(demo_bundle_dir)


def test_make_demo_bundle_command_rejects_nonempty_folder(
    demo_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_anopilad.cli import main

    assert main(["make-demo-bundle", str(demo_bundle_dir)]) == 2
    assert "is not empty; give a new or empty folder" in capsys.readouterr().err
