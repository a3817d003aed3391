"""The demo: a small CNN on scikit-learn's digits with injected label noise and leaked test images."""

from .data import DigitsDataModule, DigitsSplits, load_digits_tensors
from .model import DigitsCNN

__all__ = ["DigitsCNN", "DigitsDataModule", "DigitsSplits", "load_digits_tensors"]
