"""Train the MemAE comparison method (memory-augmented autoencoder) on the normal patches. See docs/comparison-methods.md."""

import sys

from napari_anopilad.training.autoencoders_train import main

if __name__ == "__main__":
    sys.exit(main(method="memae"))
