"""Annotation-free detection of lymph node metastases in whole-slide images (AnoPILaD)."""

__version__ = "0.1.0"
