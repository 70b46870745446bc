"""Training step 03: Train LoRA weights of the UNet on the captioned normal patches (accelerate launch for several GPUs). See docs/training.md."""

import sys

from napari_anopilad.training.lora import main

if __name__ == "__main__":
    sys.exit(main())
