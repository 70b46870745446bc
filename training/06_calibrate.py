"""Training step 06: Write the calibration statistics of normal validation patches into the bundle. See docs/training.md."""

import sys

from napari_anopilad.training.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
