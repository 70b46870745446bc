"""Build the triage normal reference of a bundle; see ``--help`` and docs/triage.md."""

import sys

from napari_anopilad.training.triage_reference import main

if __name__ == "__main__":
    sys.exit(main())
