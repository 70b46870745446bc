"""Training step 01: Cut the tissue patches of whole slides into PNG files with a manifest. See docs/training.md."""

import sys

from napari_anopilad.training.extract import main

if __name__ == "__main__":
    sys.exit(main())
