"""Lightning callbacks: thin schedulers and loggers over :mod:`lightning_interp.methods`."""

from .base import InterpretationCallback

__all__ = ["InterpretationCallback"]
