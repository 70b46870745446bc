"""Train the f-AnoGAN comparison method (WGAN-GP, then the izi_f encoder) on normal 64 px crops. See docs/comparison-methods.md."""

import sys

from napari_anopilad.training.fanogan_train import main

if __name__ == "__main__":
    sys.exit(main())
