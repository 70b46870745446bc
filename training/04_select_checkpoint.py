"""Training step 04: Choose the LoRA checkpoint with the lowest FID on validation patches. See docs/training.md."""

import sys

from napari_anopilad.training.select_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
