"""Training step 07: Evaluate bundles and write a report folder. See docs/training.md.

With --triage, each bundle's CONCH triage score and triage-guided AnoPILaD join the table; see docs/triage.md.
"""

import sys

from napari_anopilad.training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
