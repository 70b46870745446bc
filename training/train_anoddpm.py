"""Train the AnoDDPM comparison model (a pixel-space DDPM) on normal patches. See docs/comparison-methods.md."""

import sys

from napari_anopilad.training.anoddpm_train import main

if __name__ == "__main__":
    sys.exit(main())
