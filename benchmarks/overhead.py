"""What all four callbacks at their defaults add to the demo's training wall time.

    python benchmarks/overhead.py --pairs 3 --epochs 20 [--profile] [--max-overhead 0.025]

Trains the demo CNN alternately without and with ``ARMDrift, MirroredInfluence, ComponentAttribution,
LayerClusters`` (all defaults), same seed and data, and prints each pair's times and the median ratio.
With ``--profile`` one more run with the callbacks goes under pyinstrument and the callbacks' top frames are
printed. Each callback's own share comes from timing its hooks. ``--max-overhead`` gives every callback that
budget (a share of the fit's wall time; analyses that would exceed it are postponed) and prints how many ran.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

from lightning_interp._lightning import Callback, pl
from lightning_interp.demo import DigitsCNN, DigitsDataModule
from lightning_interp.demo.__main__ import build_trainer, default_callbacks

HOOKS = ("on_train_epoch_end", "on_train_epoch_start", "on_validation_end", "on_save_checkpoint", "on_fit_end",
         "on_train_end", "teardown", "setup")


class HookTimer(Callback):
    """Not a callback of the benchmark: wraps the others' hooks to attribute time to each."""

    def __init__(self, callbacks):
        self.seconds = defaultdict(float)
        for cb in callbacks:
            for hook in HOOKS:
                original = getattr(cb, hook, None)
                if original is not None:
                    setattr(cb, hook, self._timed(type(cb).__name__, original))

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return wrapper


def fit_once(epochs: int, with_callbacks: bool, seed: int = 0, width: int = 16, max_overhead: float | None = None):
    pl.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(noise_fraction=0.1, n_leaked=10, seed=seed)
    callbacks = default_callbacks(datamodule, max_overhead=max_overhead) if with_callbacks else []
    timer = HookTimer(callbacks)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = build_trainer(logdir, epochs, callbacks, progress=False)
        start = time.perf_counter()
        trainer.fit(DigitsCNN(width=width), datamodule)
        elapsed = time.perf_counter() - start
        runs = {type(cb).__name__: (cb.cost_["runs"], cb.cost_["postponed"]) for cb in callbacks}
        return elapsed, dict(timer.seconds), runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=16, help="conv width of the demo CNN (16 = the demo)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--max-overhead", type=float, default=None, help="every callback's budget (default: none)")
    args = parser.parse_args()

    fit_once(1, True)  # warm-up: imports, first-call allocations
    ratios, rows, shares, runs = [], [], defaultdict(list), {}
    for pair in range(args.pairs):
        base, _, _ = fit_once(args.epochs, False, width=args.width)
        full, per_callback, runs = fit_once(args.epochs, True, width=args.width, max_overhead=args.max_overhead)
        ratios.append(full / base)
        rows.append((pair, base, full, full / base))
        for name, seconds in per_callback.items():
            shares[name].append(seconds / base)

    print("\n| pair | without callbacks (s) | with all four at defaults (s) | ratio |\n|---|---|---|---|")
    for pair, base, full, ratio in rows:
        print(f"| {pair} | {base:.2f} | {full:.2f} | {ratio:.3f} |")
    print(f"\nwidth {args.width}, max_overhead {args.max_overhead}: median ratio over {args.pairs} pairs: "
          f"{statistics.median(ratios):.3f}")
    print("\n| callback | median added time, % of training | analyses run / postponed (last run) |\n|---|---|---|")
    for name, values in sorted(shares.items()):
        print(f"| {name} | {100 * statistics.median(values):.1f}% | {runs[name][0]} / {runs[name][1]} |")

    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.002)
        profiler.start()
        fit_once(args.epochs, True, width=args.width, max_overhead=args.max_overhead)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False, timeline=False)[:6000])


if __name__ == "__main__":
    main()
