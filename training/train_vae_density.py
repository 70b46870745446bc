"""Train the VAE density comparison methods (NLL, Regret, likelihood ratio, complexity) on normal 64 px crops. See docs/comparison-methods.md."""

import sys

from napari_anopilad.training.vae_density_train import main

if __name__ == "__main__":
    sys.exit(main())
