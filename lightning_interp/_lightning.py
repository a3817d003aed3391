"""The one place that imports Lightning, so the whole package follows one namespace.

``pytorch_lightning`` is the default. Set ``LIGHTNING_INTERP_NAMESPACE=lightning`` to build the callbacks on
``lightning.pytorch`` instead (both packages define their own ``Callback`` class, and a ``Trainer`` accepts only
its own namespace's callbacks).
"""

from __future__ import annotations

import importlib
import os

_NAMESPACES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}

_choice = os.environ.get("LIGHTNING_INTERP_NAMESPACE", "pytorch_lightning")
if _choice not in _NAMESPACES:
    raise ImportError(
        f"LIGHTNING_INTERP_NAMESPACE={_choice!r} is not supported; use one of {sorted(_NAMESPACES)}"
    )

pl = importlib.import_module(_NAMESPACES[_choice])
Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
rank_zero_only = importlib.import_module(_NAMESPACES[_choice] + ".utilities").rank_zero_only
TensorBoardLogger = pl.loggers.TensorBoardLogger
ModelCheckpoint = pl.callbacks.ModelCheckpoint

__all__ = [
    "pl",
    "Callback",
    "LightningModule",
    "LightningDataModule",
    "Trainer",
    "TensorBoardLogger",
    "ModelCheckpoint",
    "rank_zero_only",
]
