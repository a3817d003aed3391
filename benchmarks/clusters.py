"""LayerClusters benchmark: does the DP-GMM find planted groups, and what does the callback cost?

Run from the repository root::

    PYTHONPATH=. python benchmarks/clusters.py            # full run, ~10 min on our shared 2 cores
    PYTHONPATH=. python benchmarks/clusters.py --quick    # fewer seeds and a 6-epoch demo, a smoke test

(1) Validity, synthetic: ``n`` points around ``k`` random Gaussian centres (spread 4, unit noise, unequal
    group sizes from a Dirichlet(5)), in 8/24/64 dimensions, 3 seeds each; ``fit_dpgmm`` at its defaults.
    Reported: mean recovered count, share of fits within +-1 of ``k``, mean and worst ARI.
(2) Validity, a trained model: a DigitsCNN trained 15 epochs on digits (10 classes); per layer, the per-sample
    fit on 512 training images (pooled activations) at ``max_dims`` 4, 8 (default) and 16: clusters, NMI, ARI;
    and at the default width, ``max_iter`` 100 (fit_dpgmm's default) against 50 (LayerClusters').
(3) Cost: time of one fit per layer at the callback's defaults (``max_iter=50``; 512 samples, and the
    per-position fit of 8 images), and a whole demo run (DigitsCNN on DigitsDataModule, 20 epochs,
    TensorBoard logger) without and with ``LayerClusters()`` at its defaults, in this process, alternating;
    the callback's own time is also measured directly (wall time inside its ``on_train_epoch_end``) and
    divided by the rest of the same run: the steadier ratio on a shared machine, where two identical runs
    differed by 2x in our measurements.

No torch re-implementation of the variational DP-GMM was written (scikit-learn's fit is a few tens of
milliseconds at these sizes), so there is no agreement/speed-ratio table for one.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.nn.functional as F

from lightning_interp import LayerClusters
from lightning_interp._lightning import TensorBoardLogger, Trainer
from lightning_interp.capture import ActivationRecorder, select_layers
from lightning_interp.demo import DigitsCNN, DigitsDataModule, load_digits_tensors
from lightning_interp.methods.dpgmm import fit_dpgmm, fit_label_maps
from _timing import best_time

warnings.filterwarnings("ignore")
CALLBACK_MAX_ITER = 50  # LayerClusters' default (fit_dpgmm's own default is 100)


def planted_groups(k: int, n: int, dims: int, seed: int, spread: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dims, generator=g) * spread
    shares = torch.distributions.Dirichlet(torch.full((k,), 5.0)).sample()
    classes = torch.multinomial(shares, n, replacement=True, generator=g)
    return centres[classes] + torch.randn(n, dims, generator=g), classes


def synthetic_table(seeds: int, n: int = 512) -> list[str]:
    rows = ["| planted groups k | fits | mean clusters found | within k+-1 | mean ARI | worst ARI | mean fit time |",
            "|---|---|---|---|---|---|---|"]
    for k in (1, 2, 3, 5, 8, 12, 20):
        found, hits, aris, times = [], 0, [], []
        for dims in (8, 24, 64):
            for seed in range(seeds):
                torch.manual_seed(1000 * k + seed)  # the Dirichlet group shares
                x, classes = planted_groups(k, n, dims, seed=100 * k + seed)
                start = time.perf_counter()
                fit = fit_dpgmm(x, classes)
                times.append(time.perf_counter() - start)
                found.append(fit.n_clusters)
                hits += abs(fit.n_clusters - k) <= 1
                aris.append(1.0 if k == 1 and fit.n_clusters == 1 else fit.ari)
        fits = len(found)
        rows.append(f"| {k} | {fits} | {sum(found) / fits:.1f} | {hits}/{fits} | {sum(aris) / fits:.3f} | "
                    f"{min(aris):.3f} | {1000 * sum(times) / fits:.0f} ms |")
    return rows


def train_digits_cnn(epochs: int, seed: int = 0) -> tuple[DigitsCNN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    splits = load_digits_tensors(seed=seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(splits.x_train))
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            opt.zero_grad()
            F.cross_entropy(model(splits.x_train[batch]), splits.y_train_clean[batch]).backward()
            opt.step()
    return model.eval(), splits.x_train, splits.y_train_clean


def trained_model_table(epochs: int, n: int = 512) -> list[str]:
    model, x, y = train_digits_cnn(epochs)
    x, y = x[:n], y[:n]
    with torch.no_grad(), ActivationRecorder(model, select_layers(model)) as rec:
        accuracy = float((model(x).argmax(1) == y).float().mean())
    rows = [f"DigitsCNN after {epochs} epochs, training accuracy {accuracy:.3f}; {n} training images, 10 classes.",
            "", "| layer | max_dims=4: clusters / NMI / ARI | max_dims=8 (default) | max_dims=16 |",
            "|---|---|---|---|"]
    for name, act in rec.stacked().items():
        cells = []
        for dims in (4, 8, 16):
            fit = fit_dpgmm(act, y, max_dims=dims)
            cells.append(f"{fit.n_clusters} / {fit.nmi:.2f} / {fit.ari:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows += ["", "| layer | max_iter=100: clusters / NMI / ARI / iterations | max_iter=50 |", "|---|---|---|"]
    for name, act in rec.stacked().items():
        fits = [fit_dpgmm(act, y, max_iter=m) for m in (100, 50)]
        cells = [f"{f.n_clusters} / {f.nmi:.2f} / {f.ari:.2f} / {f.n_iter}" for f in fits]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def fit_cost_table(repeats: int = 3) -> list[str]:
    model, x, y = train_digits_cnn(5)
    x, y = x[:512], y[:512]
    layers = select_layers(model)
    with torch.no_grad(), ActivationRecorder(model, layers) as pooled:
        model(x)
    with torch.no_grad(), ActivationRecorder(model, layers, pool=False) as full:
        model(x[:8])
    rows = ["| layer | units | per-sample fit, 512 x units | per-position fit, 8 images | positions |",
            "|---|---|---|---|---|"]
    for name, act in pooled.stacked().items():
        sample_s = best_time(lambda: fit_dpgmm(act, y, max_iter=CALLBACK_MAX_ITER), repeats)
        maps = full.stacked()[name]
        if maps.dim() >= 3:
            position_s = best_time(lambda: fit_label_maps(maps, max_fit_rows=1024, max_iter=CALLBACK_MAX_ITER), repeats)
            positions = maps.shape[0] * maps[0, 0].numel()
            rows.append(f"| {name} | {act.shape[1]} | {1000 * sample_s:.0f} ms | {1000 * position_s:.0f} ms "
                        f"| {positions} |")
        else:
            rows.append(f"| {name} | {act.shape[1]} | {1000 * sample_s:.0f} ms | n/a | n/a |")
    return rows




class TimedClusters(LayerClusters):
    """LayerClusters that adds up the wall time of its own epoch-end work."""

    spent = 0.0
    calls = 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        if self._is_due(trainer.current_epoch):
            self.calls += 1
        self.spent += time.perf_counter() - start


def demo_run(epochs: int, callback: LayerClusters | None, root: str) -> float:
    torch.manual_seed(0)
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=TensorBoardLogger(root, name="demo"),
        callbacks=[callback] if callback is not None else [], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=root,
    )
    dm = DigitsDataModule()
    start = time.perf_counter()
    trainer.fit(DigitsCNN(), dm)
    return time.perf_counter() - start


def overhead_table(epochs: int, pairs: int) -> list[str]:
    rows = ["| pair | demo without (s) | demo with LayerClusters() (s) | wall ratio | callback's own time (s) | "
            "own time / rest of the same run | calls |", "|---|---|---|---|---|---|---|"]
    with TemporaryDirectory() as root:
        demo_run(1, None, root)  # warm-up: imports, first-call kernels
        for pair in range(pairs):
            plain = demo_run(epochs, None, root)
            cb = TimedClusters()
            with_cb = demo_run(epochs, cb, root)
            rows.append(f"| {pair + 1} | {plain:.1f} | {with_cb:.1f} | {with_cb / plain:.3f} | {cb.spent:.2f} | "
                        f"{cb.spent / (with_cb - cb.spent):.1%} | {cb.calls} |")
            last = cb
    rows += ["", "Last run's summary table (TensorBoard text `clusters/summary`):", "",
             last.summary_table(last.results_, list(last.results_))]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=2, help="demo runs without/with the callback")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    seeds, epochs = (1, 6) if args.quick else (3, 20)
    sections = [
        ("(1) Planted Gaussian groups, 512 points, dims 8/24/64 x seeds, fit_dpgmm defaults", synthetic_table(seeds)),
        ("(2) A trained model: per-sample clusters of each DigitsCNN layer vs the 10 classes", trained_model_table(15)),
        ("(3a) Cost of one fit at the callback's defaults (best of 3)", fit_cost_table()),
        (f"(3b) Whole demo run, {epochs} epochs, LayerClusters() at defaults", overhead_table(epochs, args.pairs)),
    ]
    print(f"python {' '.join(sys.argv)}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    for title, rows in sections:
        print(f"### {title}\n")
        print("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
