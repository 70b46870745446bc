"""Training step 02: Write the CONCH keyword prompt of each patch into the manifest. See docs/training.md."""

import sys

from napari_anopilad.training.caption import main

if __name__ == "__main__":
    sys.exit(main())
