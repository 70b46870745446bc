"""Building and measuring an AnoPILaD bundle: patch extraction, captions, LoRA training, FID,
calibration and evaluation. Each step has a ``main(argv)`` that a thin script in ``training/`` calls."""
