"""LPIPS with its backbone read from a local weights file, so nothing is downloaded.

LPIPS's own linear layers (v0.1) ship inside the ``lpips`` package; the ImageNet backbone that torchvision
would download is read from the bundle instead. The file contains the backbone's ``features`` module as
torchvision names it (``0.weight``, ``2.weight``, ...). A whole torchvision state dict is accepted too: the
``features.`` prefix is removed and the ``classifier.`` layers are ignored.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lpips
import torch
import torchvision

from napari_anopilad.method.errors import BundleError
from napari_anopilad.method.weights import compare_state_dict, read_state_dict, read_tensor_shapes

PART = "LPIPS backbone"
LPIPS_NETS = ("vgg", "alex")
CLASSIFIER_PREFIX = "classifier."


def build_backbone_features(net: str, device: str | torch.device = "cpu") -> torch.nn.Sequential:
    """Build torchvision's randomly initialised ``features`` module of VGG16 or AlexNet."""
    with torch.device(device):
        if net == "vgg":
            return torchvision.models.vgg16(weights=None).features
        if net == "alex":
            return torchvision.models.alexnet(weights=None).features
    raise BundleError(f"LPIPS net {net!r} is invalid: use one of {', '.join(LPIPS_NETS)}")


def check_lpips_backbone(net: str, path: Path) -> None:
    """Raise a ValueError unless the file contains exactly the backbone's feature parameters."""
    expected = {
        key: tuple(value.shape) for key, value in build_backbone_features(net, "meta").state_dict().items()
    }
    actual = {
        _strip_features_prefix(key): shape
        for key, shape in read_tensor_shapes(path, PART).items()
        if not key.startswith(CLASSIFIER_PREFIX)
    }
    compare_state_dict(expected, actual, PART, path)


def load_lpips(net: str, backbone_path: Path, device: str | torch.device = "cpu") -> lpips.LPIPS:
    """Build LPIPS (v0.1 linear layers from the package) with the backbone weights from ``backbone_path``.

    The model stays in float32 whatever precision the UNet uses.
    """
    state_dict = {
        _strip_features_prefix(key): value
        for key, value in read_state_dict(backbone_path, PART).items()
        if not key.startswith(CLASSIFIER_PREFIX)
    }
    features = build_backbone_features(net)
    expected = {key: tuple(value.shape) for key, value in features.state_dict().items()}
    compare_state_dict(
        expected, {key: tuple(value.shape) for key, value in state_dict.items()}, PART, backbone_path
    )

    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated ``pretrained=False`` to build the random backbone.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)

    # lpips splits torchvision's ``features`` into slices but keeps each layer's index as its module name,
    # so ``slice2.5.weight`` is torchvision's ``5.weight``.
    slice_keys = {key.split(".", 1)[1]: key for key in model.net.state_dict()}
    model.net.load_state_dict(
        {slice_keys[key]: value.float() for key, value in state_dict.items() if key in slice_keys},
        strict=True,
    )
    return model.to(device).float().eval()


@torch.no_grad()
def lpips_distances(model: lpips.LPIPS, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Return LPIPS per patch ``(n,)``; both inputs are ``(n, 3, h, w)`` RGB in [-1, 1]."""
    distances = model(images.float(), reconstructions.float(), normalize=False)
    return distances.reshape(-1).cpu()


def _strip_features_prefix(key: str) -> str:
    return key.removeprefix("features.")
