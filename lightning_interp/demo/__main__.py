"""Run the demo: ``python -m lightning_interp.demo [--epochs N] [--logdir DIR]``.

Trains the digits CNN (10% flipped labels, 10 test images leaked into training) with every lightning_interp
callback at its defaults, then prints what each one found and how to open TensorBoard.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .._lightning import ModelCheckpoint, TensorBoardLogger, Trainer, pl
from .data import DigitsDataModule
from .model import DigitsCNN


def default_callbacks(datamodule: DigitsDataModule | None = None, **common) -> list:
    """All four callbacks at their defaults (what the overhead benchmark measures), each also given ``common``
    arguments (e.g. ``max_overhead=0.025``).

    With a ``datamodule``, MirroredInfluence searches its *test* images for copies in the training set (the
    demo leaks test images; the default query set is the validation set).
    """
    from .. import ARMDrift, ComponentAttribution, LayerClusters, MirroredInfluence

    leak_queries = datamodule.test_dataset if datamodule is not None else "val"
    return [ARMDrift(**common), MirroredInfluence(leak_queries=leak_queries, **common),
            ComponentAttribution(**common), LayerClusters(**common)]


def build_trainer(logdir: str | Path, epochs: int, callbacks: list, progress: bool = True) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=TensorBoardLogger(str(logdir), name="digits"),
        callbacks=[*callbacks, ModelCheckpoint(monitor="val/acc", mode="max", save_last=True)],
        log_every_n_steps=5,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )


def summarize(callbacks: list, datamodule: DigitsDataModule) -> list[str]:
    """One or two lines per callback: what it found, checked against the injected ground truth."""
    lines = []
    splits = datamodule.splits
    for cb in callbacks:
        name = type(cb).__name__
        if name == "ARMDrift" and getattr(cb, "history_", None):
            last = cb.history_[-1]
            lines.append(f"ARMDrift: last epoch-to-epoch ARM {last['aggregate']:.4f}; "
                         "settled layers (freeze candidates): "
                         f"{list(getattr(cb, 'settled_layers_', [])) or 'none yet'}")
        elif name == "MirroredInfluence" and getattr(cb, "flagged_", None) is not None:
            flagged = [int(i) for i in cb.flagged_]
            truth = set(splits.flipped.tolist())
            hits = sum(i in truth for i in flagged)
            lines.append(f"MirroredInfluence: {len(flagged)} training samples flagged as mislabeled, "
                         f"{hits} of them truly flipped ({len(truth)} flipped in all)")
            leaks = getattr(cb, "leaks_", None) or []
            true_pairs = {(t, tr) for t, tr in splits.leaked}
            found = sum((int(q), int(t)) in true_pairs for q, t, _ in leaks)
            if leaks or true_pairs:
                lines.append(f"  leaks: {len(leaks)} validation/test samples reported; {found} of the "
                             f"{len(true_pairs)} planted test->train copies among them")
        elif name == "ComponentAttribution" and getattr(cb, "correlation_", None) is not None:
            lines.append(f"ComponentAttribution: held-out correlation of the linear component model "
                         f"{float(cb.correlation_):.3f} over {len(cb.component_names_)} components")
        elif name == "LayerClusters" and getattr(cb, "results_", None):
            per_layer = ", ".join(f"{layer}: {r['n_clusters']}" for layer, r in cb.results_.items())
            lines.append(f"LayerClusters: clusters per layer — {per_layer}")
        elif getattr(cb, "alerts_", None) is not None:
            lines.append(f"{name}: no result yet")
    alerts = sum(len(getattr(cb, "alerts_", [])) for cb in callbacks)
    lines.append(f"alerts raised: {alerts}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--logdir", default="demo_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed)
    datamodule = DigitsDataModule(noise_fraction=0.1, n_leaked=10, seed=args.seed)
    callbacks = default_callbacks(datamodule)
    trainer = build_trainer(args.logdir, args.epochs, callbacks, progress=not args.no_progress)
    start = time.perf_counter()
    trainer.fit(DigitsCNN(), datamodule)
    elapsed = time.perf_counter() - start

    logdir = Path(trainer.logger.log_dir).resolve()
    print(f"\nTrained {args.epochs} epochs in {elapsed:.1f} s "
          f"(val/acc {float(trainer.callback_metrics.get('val/acc', float('nan'))):.3f}).")
    for line in summarize(callbacks, datamodule):
        print(line)
    print(f"\nTensorBoard logs: {logdir}")
    print(f"Open them with:   tensorboard --logdir {Path(args.logdir).resolve()}   (then http://localhost:6006)")


if __name__ == "__main__":
    main()
