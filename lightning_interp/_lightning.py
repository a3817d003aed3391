"""The one place that imports Lightning.

``pytorch_lightning`` is used when installed, else ``lightning.pytorch``. The callbacks work with a ``Trainer``
of either namespace: Lightning calls callback hooks by name, and this package recognises loggers and
checkpoint callbacks by class name rather than by ``isinstance`` on one namespace's classes.
"""

from __future__ import annotations

import importlib

try:
    pl = importlib.import_module("pytorch_lightning")
except ImportError:  # only the unified ``lightning`` package is installed
    pl = importlib.import_module("lightning.pytorch")

Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
TensorBoardLogger = pl.loggers.TensorBoardLogger
ModelCheckpoint = pl.callbacks.ModelCheckpoint


def is_instance_by_name(obj: object, class_name: str) -> bool:
    """``isinstance`` that holds across the ``pytorch_lightning`` and ``lightning.pytorch`` namespaces."""
    return any(cls.__name__ == class_name for cls in type(obj).__mro__)


__all__ = [
    "pl",
    "Callback",
    "LightningModule",
    "LightningDataModule",
    "Trainer",
    "TensorBoardLogger",
    "ModelCheckpoint",
    "is_instance_by_name",
]
