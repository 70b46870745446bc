"""Training step 05: Score the evaluation slides at several start timesteps and report the best. See docs/training.md."""

import sys

from napari_anopilad.training.sweep import main

if __name__ == "__main__":
    sys.exit(main())
