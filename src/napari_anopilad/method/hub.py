"""Downloads from the Hugging Face hub, used only when the user allows them.

Stable Diffusion 1.5 is public. CONCH (``MahmoodLab/CONCH``) is gated: the user accepts its licence on the hub
and passes a token (or logs in with ``hf auth login``). Tests never download: they use local files only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

logger = logging.getLogger(__name__)

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CONCH_HUB_ID = "MahmoodLab/CONCH"
CONCH_HUB_FILENAME = "pytorch_model.bin"

# The parts of the SD1.5 repository that inference needs: the diffusers folders in float32 safetensors,
# not the 4 GB single-file checkpoints, the EMA weights or the safety checker.
SD15_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def download_base_model(
    hub_id: str = SD15_HUB_ID, token: str | None = None, cache_dir: Path | None = None
) -> Path:
    """Download the diffusers folders of a Stable Diffusion 1.5 repository and return the local folder.

    Raises
    ------
    ValueError
        When the hub cannot be reached (offline, or ``HF_HUB_OFFLINE=1``) and no cached copy exists, or the
        repository is not found. The message tells the user what to do next.
    """
    logger.info("downloading %s from the Hugging Face hub", hub_id)
    try:
        folder = snapshot_download(
            hub_id, allow_patterns=SD15_ALLOW_PATTERNS, token=token, cache_dir=cache_dir
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise ValueError(_offline_message(hub_id, "the Stable Diffusion 1.5 base model")) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"base model: repository {hub_id!r} was not found on the Hugging Face hub"
        ) from error
    except HfHubHTTPError as error:
        raise ValueError(f"base model: download of {hub_id!r} failed ({error})") from error
    return Path(folder)


def download_conch_checkpoint(
    hub_id: str = CONCH_HUB_ID,
    filename: str = CONCH_HUB_FILENAME,
    token: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Download the gated CONCH checkpoint with the user's token and return its local path.

    Raises
    ------
    ValueError
        When offline with no cached copy, or when the token has no access to the gated repository.
    """
    logger.info("downloading %s/%s from the Hugging Face hub", hub_id, filename)
    try:
        path = hf_hub_download(hub_id, filename=filename, token=token, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise ValueError(_offline_message(hub_id, "the CONCH checkpoint")) from error
    except GatedRepoError as error:
        raise ValueError(
            f"CONCH checkpoint: {hub_id} is gated and this token has no access. Accept the licence at "
            f"https://huggingface.co/{hub_id} while logged in, then pass a token of that account "
            "(HF_TOKEN or `hf auth login`)"
        ) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"CONCH checkpoint: repository {hub_id!r} was not found, or it is gated and no token was given: "
            "log in with `hf auth login` or set HF_TOKEN"
        ) from error
    except HfHubHTTPError as error:
        raise ValueError(f"CONCH checkpoint: download of {hub_id}/{filename} failed ({error})") from error
    return Path(path)


def _offline_message(hub_id: str, what: str) -> str:
    return (
        f"{what} ({hub_id}) is not in the local Hugging Face cache and the hub cannot be reached "
        "(offline, or HF_HUB_OFFLINE=1 is set). Connect to the internet and unset HF_HUB_OFFLINE, "
        "or point the bundle at a local copy"
    )
