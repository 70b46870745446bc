"""Inference settings of AnoPILaD, with the defaults that produced the published numbers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from napari_anopilad.method.json_values import check_bool, check_integer, check_number

SAMPLERS = ("ddim", "plms")
SCORES = ("lpips", "mse_latent")
PROMPT_STYLES = ("marks", "numeric")
PRECISIONS = ("float32", "float16", "bfloat16")
# torch.compile modes offered for the UNet. "reduce-overhead" replays the UNet call from CUDA graphs.
# Compiling changes speed, not scores (to float rounding), so it is not one of the settings.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class InferenceSettings:
    """Everything that changes a patch's scores, so results are keyed by these values.

    Defaults follow the AnoPILaD paper (Wang et al., MICCAI 2025) where it is explicit and its public
    code where the paper is silent: start timestep 674 on a 100-step grid, a deterministic DDIM update
    (the paper's text says PLMS, its code ran DDIM), classifier-free guidance 7.5 with the empty prompt,
    LPIPS (VGG) as the score.
    """

    start_timestep: int = 674
    num_inference_steps: int = 100
    sampler: str = "ddim"
    guidance_scale: float = 7.5
    score: str = "lpips"
    seed: int = 0
    prompt_style: str = "marks"
    top_k: int = 5
    # Unprompted ablation: empty prompt and guidance 1, no keyword selection.
    unprompted: bool = False
    # Precision of the UNet; the VAE always runs in float32.
    precision: str = "float32"

    def __post_init__(self) -> None:
        # bundle.json may hold any JSON value, so the types come first: 2.5 steps or a null guidance
        # scale would otherwise pass, or fail later without naming the setting.
        for name in ("start_timestep", "num_inference_steps", "seed", "top_k"):
            object.__setattr__(self, name, check_integer(name, getattr(self, name)))
        object.__setattr__(self, "guidance_scale", check_number("guidance_scale", self.guidance_scale))
        check_bool("unprompted", self.unprompted)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is invalid: use one of {', '.join(SAMPLERS)}")
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r} is invalid: use one of {', '.join(SCORES)}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(
                f"prompt_style {self.prompt_style!r} is invalid: use one of {', '.join(PROMPT_STYLES)}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is invalid: use one of {', '.join(PRECISIONS)}")
        if not 1 <= self.num_inference_steps <= 1000:
            raise ValueError(f"num_inference_steps {self.num_inference_steps} is invalid: use 1 to 1000")
        if not 0 <= self.start_timestep < 1000:
            raise ValueError(f"start_timestep {self.start_timestep} is invalid: use 0 to 999")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale {self.guidance_scale} is invalid: use 1 (no guidance) or more")
        if not 1 <= self.top_k <= 74:
            raise ValueError(f"top_k {self.top_k} is invalid: use 1 to the size of the keyword bank")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InferenceSettings:
        """Build settings from a JSON object; raise ValueError naming an unknown setting or an invalid value."""
        if not isinstance(values, Mapping):
            raise ValueError(
                f"the settings {values!r} are invalid: use an object of setting names and values"
            )
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown inference settings {unknown}: known settings are {sorted(known)}")
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> InferenceSettings:
        """Return a copy with the given settings replaced; ``None`` values keep the current setting."""
        return replace(self, **{key: value for key, value in overrides.items() if value is not None})

    def score_key(self) -> str:
        """Return a short hash of the settings that change scores (precision included)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
