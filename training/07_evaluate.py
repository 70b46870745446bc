"""Training step 07: Evaluate bundles and write a report folder. See docs/training.md."""

import sys

from napari_anopilad.training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
