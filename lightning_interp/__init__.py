"""lightning_interp: interpretation that runs during training, as PyTorch Lightning callbacks.

Callbacks: :class:`ARMDrift`, :class:`MirroredInfluence`, :class:`ComponentAttribution`, :class:`LayerClusters`.
The methods behind them live in :mod:`lightning_interp.methods` and run on any ``nn.Module`` without a Trainer.
Names are imported on first use, so ``import lightning_interp`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ARMDrift": "lightning_interp.callbacks.arm",
    "MirroredInfluence": "lightning_interp.callbacks.mirrored",
    "ComponentAttribution": "lightning_interp.callbacks.components",
    "LayerClusters": "lightning_interp.callbacks.clusters",
    "InterpretationCallback": "lightning_interp.callbacks.base",
    "Alert": "lightning_interp.alerts",
    "InterpretationAlert": "lightning_interp.alerts",
    "InterpretationWarning": "lightning_interp.alerts",
    "LayerSelectionError": "lightning_interp.capture",
    "ProbeDataError": "lightning_interp.probe",
    "ProbeData": "lightning_interp.probe",
    "select_layers": "lightning_interp.capture",
    "evaluation_mode": "lightning_interp.probe",
    "aggregate_representation_measure": "lightning_interp.methods.arm",
    "ARMCostModel": "lightning_interp.methods.arm",
    "wasserstein_1d": "lightning_interp.methods.arm",
    "mislabel_scores": "lightning_interp.methods.mirrored",
    "leak_scores": "lightning_interp.methods.mirrored",
    "COAR": "lightning_interp.methods.coar",
    "edit": "lightning_interp.methods.coar",
    "find_components": "lightning_interp.methods.coar",
    "fit_dpgmm": "lightning_interp.methods.dpgmm",
    "select_coreset": "lightning_interp.methods.coreset",
    "fidelity": "lightning_interp.methods.coreset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_interp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
