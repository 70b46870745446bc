"""One entry point for every scoring method: a bundle folder gives a loaded bundle and its scorer.

``bundle.json`` names the method (``"method"``; AnoPILaD when absent). AnoPILaD bundles load with
:func:`napari_anopilad.method.bundle.load_bundle`; the comparison methods' bundles load with
:func:`napari_anopilad.method.baselines.base.load_baseline_bundle`. Both scorers have
``settings`` (with ``score``), ``calibration``, ``device`` and ``score(images_uint8, noise_keys)``.
"""

from __future__ import annotations

import os
from typing import Any

from napari_anopilad.method.baselines.base import (
    BaselineBundle,
    bundle_method,
    load_baseline_bundle,
    scorer_class_for,
)

ANOPILAD = "anopilad"
# Display name of each method in messages and the napari dock.
METHOD_LABELS = {
    ANOPILAD: "AnoPILaD",
    "ae": "AE",
    "memae": "MemAE",
    "anoddpm": "AnoDDPM",
    "vae-density": "VAE density",
    "f-anogan": "f-AnoGAN",
}


def load_any_bundle(
    folder: str | os.PathLike[str], allow_download: bool = False, *, require_calibration: bool = False
) -> Any:
    """Load the bundle in ``folder`` whatever its method; raise BundleError naming what is wrong."""
    method = bundle_method(folder)
    if method == ANOPILAD:
        from napari_anopilad.method.bundle import load_bundle

        return load_bundle(folder, allow_download=allow_download, require_calibration=require_calibration)
    return load_baseline_bundle(folder, require_calibration=require_calibration)


def method_of(bundle: Any) -> str:
    """Return the method name of a loaded bundle."""
    return bundle.method if isinstance(bundle, BaselineBundle) else ANOPILAD


def method_label(method: str) -> str:
    """Return the display name of a method (``"MemAE"`` for ``"memae"``), or ``method`` when it has none."""
    return METHOD_LABELS.get(method, method)


def reconstructs(bundle: Any) -> bool:
    """Tell whether the bundle's scorer returns reconstructions (AnoPILaD's always does)."""
    if isinstance(bundle, BaselineBundle):
        return bool(scorer_class_for(bundle.method).reconstructs)
    return True


def score_names(bundle: Any) -> tuple[str, ...]:
    """Return the names of the scores the bundle's scorer gives, the default first."""
    if isinstance(bundle, BaselineBundle):
        names = scorer_class_for(bundle.method).score_names
    else:
        from napari_anopilad.method.settings import SCORES

        names = SCORES
    default = bundle.settings.score
    return (default, *[name for name in names if name != default])


def settings_with(bundle: Any, **overrides: Any) -> Any:
    """Return the bundle's settings with overrides; ``None`` values keep the bundle's value."""
    return bundle.settings.with_overrides(**overrides)


def make_scorer(
    bundle: Any, device: Any = "cpu", settings: Any = None, compile_mode: str | None = None
) -> Any:
    """Build the scorer of a loaded bundle on ``device`` under ``settings`` (the bundle's when None).

    ``compile_mode`` compiles AnoPILaD's UNet (see ``AnoPILaDScorer``). It raises ValueError for a
    comparison method's bundle.
    """
    if isinstance(bundle, BaselineBundle):
        if compile_mode is not None:
            raise ValueError(
                f"compiling applies to AnoPILaD's UNet only, but this is a {method_label(bundle.method)} "
                "bundle: leave out the compile mode"
            )
        return scorer_class_for(bundle.method)(bundle, device=device, settings=settings)
    from napari_anopilad.method.scorer import AnoPILaDScorer

    return AnoPILaDScorer(bundle, device=device, settings=settings, compile_mode=compile_mode)
