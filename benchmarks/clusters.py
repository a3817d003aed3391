"""LayerClusters benchmark: does the DP-GMM find planted groups, and what does the callback cost?

Run from the repository root::

    PYTHONPATH=. python benchmarks/clusters.py            # full run, ~10 min on our shared 2 cores
    PYTHONPATH=. python benchmarks/clusters.py --quick    # fewer seeds and a 6-epoch demo, a smoke test

(1) Validity, synthetic: ``n`` points around ``k`` random Gaussian centres (spread 4, unit noise, unequal
    group sizes from a Dirichlet(5)), in 8/24/64 dimensions, 3 seeds each; ``fit_dpgmm`` at its defaults.
    Reported: mean recovered count, share of fits within +-1 of ``k``, mean and worst ARI.
(2) Validity, a trained model: a DigitsCNN trained 15 epochs on digits (10 classes); per layer, the per-sample
    fit on 512 and 256 training images (pooled activations), torch and scikit-learn; at ``max_dims`` 4, 8
    (default) and 16: clusters, NMI, ARI;
    and at the default width, ``max_iter`` 100 (fit_dpgmm's default) against LayerClusters' default.
(3) Cost: the fits of one callback run (scikit-learn one by one, torch one by one, torch batched), and a
    whole demo run (DigitsCNN on DigitsDataModule, 20 epochs,
    TensorBoard logger) without and with ``LayerClusters()`` at its defaults, in this process, alternating;
    the callback's own time is also measured directly (wall time inside its ``on_train_epoch_end``) and
    divided by the rest of the same run: the steadier ratio on a shared machine, where two identical runs
    differed by 2x in our measurements.
(4) Convergence: the inputs of every fit of a demo run's LayerClusters, fitted again with ``max_iter`` 50 (the
    callback's default until the fourth round), 100, 200 (its default now) and 500, and with scikit-learn (500):
    are the default's counts converged?
    (``--convergence-only`` runs just this.)

The fits run on our torch implementation (``methods/vbgmm.py``, scikit-learn's updates, several fits batched);
(1) and (2) put scikit-learn's ``BayesianGaussianMixture`` beside it on the same data, (3a) times both.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from tempfile import TemporaryDirectory

import torch
import torch.nn.functional as F

from lightning_interp import LayerClusters
from lightning_interp._lightning import TensorBoardLogger, Trainer
from lightning_interp.capture import ActivationRecorder, select_layers
from lightning_interp.demo import DigitsCNN, DigitsDataModule, load_digits_tensors
from lightning_interp.methods.dpgmm import cluster_agreement, fit_dpgmm, fit_dpgmm_many, spatial_samples
from _timing import best_time

warnings.filterwarnings("ignore")
CALLBACK_MAX_ITER = LayerClusters().fit_options["max_iter"]  # 200 (fit_dpgmm's own default is 100)


def planted_groups(k: int, n: int, dims: int, seed: int, spread: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dims, generator=g) * spread
    shares = torch.distributions.Dirichlet(torch.full((k,), 5.0)).sample()
    classes = torch.multinomial(shares, n, replacement=True, generator=g)
    return centres[classes] + torch.randn(n, dims, generator=g), classes


def synthetic_table(seeds: int, n: int = 512) -> list[str]:
    """Recovered counts and ARI on planted groups, our torch fit and scikit-learn's on the same points."""
    rows = [f"{n} points. torch = `fit_dpgmm` (default backend), sklearn = `backend=\"sklearn\"`; agreement = "
            "ARI between the two fits' clusters.", "",
            "| planted k | fits | torch: mean found / within k+-1 / mean ARI / worst ARI | sklearn: same | "
            "agreement (mean ARI) | ms per fit torch / sklearn |", "|---|---|---|---|---|---|"]
    for k in (1, 2, 3, 5, 8, 12, 20):
        stats = {backend: ([], 0, [], []) for backend in ("torch", "sklearn")}
        agreement = []
        for dims in (8, 24, 64):
            for seed in range(seeds):
                torch.manual_seed(1000 * k + seed)  # the Dirichlet group shares
                x, classes = planted_groups(k, n, dims, seed=100 * k + seed)
                fits = {}
                for backend, (found, hits, aris, times) in stats.items():
                    start = time.perf_counter()
                    fits[backend] = fit = fit_dpgmm(x, classes, backend=backend)
                    times.append(time.perf_counter() - start)
                    found.append(fit.n_clusters)
                    aris.append(1.0 if k == 1 and fit.n_clusters == 1 else fit.ari)
                    stats[backend] = (found, hits + (abs(fit.n_clusters - k) <= 1), aris, times)
                agreement.append(cluster_agreement(fits["torch"].labels, fits["sklearn"].labels)[1])
        cells = []
        for found, hits, aris, _ in stats.values():
            fits = len(found)
            cells.append(f"{sum(found) / fits:.1f} / {hits}/{fits} / {sum(aris) / fits:.3f} / {min(aris):.3f}")
        ms = [1000 * sum(t) / len(t) for *_, t in stats.values()]
        rows.append(f"| {k} | {len(agreement)} | {cells[0]} | {cells[1]} | {sum(agreement) / len(agreement):.3f} | "
                    f"{ms[0]:.0f} / {ms[1]:.0f} |")
    return rows


def single_blob_table(blobs: int = 20) -> list[str]:
    """How often one Gaussian blob (16 dimensions) comes out as more than one cluster, by number of rows."""
    rows = ["| rows | torch: blobs with more than one cluster | sklearn: same |", "|---|---|---|"]
    for n in (64, 128, 256, 512):
        wrong = {"torch": 0, "sklearn": 0}
        for seed in range(blobs):
            x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) * 3 + 5
            for backend in wrong:
                wrong[backend] += fit_dpgmm(x, seed=seed, backend=backend).n_clusters != 1
        rows.append(f"| {n} | {wrong['torch']}/{blobs} | {wrong['sklearn']}/{blobs} |")
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


def trained_model_table(epochs: int) -> list[str]:
    model, x_all, y_all = train_digits_cnn(epochs)
    with torch.no_grad():
        accuracy = float((model(x_all).argmax(1) == y_all).float().mean())
    rows = [f"DigitsCNN after {epochs} epochs, training accuracy {accuracy:.3f}; the first n training images, "
            "10 classes; clusters / NMI / ARI per layer.", "",
            "| layer | n=512, torch | n=512, sklearn | n=256, torch | n=256, sklearn |",
            "|---|---|---|---|---|"]
    acts = {}
    for n in (512, 256):
        with torch.no_grad(), ActivationRecorder(model, select_layers(model)) as rec:
            model(x_all[:n])
        acts[n] = rec.stacked()
    for name in acts[512]:
        cells = []
        for n in (512, 256):
            for backend in ("torch", "sklearn"):
                fit = fit_dpgmm(acts[n][name], y_all[:n], backend=backend)
                cells.append(f"{fit.n_clusters} / {fit.nmi:.2f} / {fit.ari:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    y = y_all[:512]
    rec_512 = acts[512]
    rows += ["", "Width of the PCA before the fit (n=512, torch):", "",
             "| layer | max_dims=4: clusters / NMI / ARI | max_dims=8 (default) | max_dims=16 |", "|---|---|---|---|"]
    for name, act in rec_512.items():
        cells = []
        for dims in (4, 8, 16):
            fit = fit_dpgmm(act, y, max_dims=dims)
            cells.append(f"{fit.n_clusters} / {fit.nmi:.2f} / {fit.ari:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows += ["", "| layer | max_iter=100: clusters / NMI / ARI / iterations | "
             f"max_iter={CALLBACK_MAX_ITER} (LayerClusters' default) |",
             "|---|---|---|"]
    for name, act in rec_512.items():
        fits = [fit_dpgmm(act, y, max_iter=m) for m in (100, CALLBACK_MAX_ITER)]
        cells = [f"{f.n_clusters} / {f.nmi:.2f} / {f.ari:.2f} / {f.n_iter}" for f in fits]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def fit_cost_table(repeats: int = 5) -> list[str]:
    """The fits of one LayerClusters run at its defaults: scikit-learn one by one, torch one by one, torch batched."""
    defaults = LayerClusters()
    options = dict(defaults.fit_options)
    model, x, y = train_digits_cnn(5)
    layers = select_layers(model)
    rows = ["| probe | fits in one run | sklearn, one by one | torch, one by one | torch, batched (what "
            "LayerClusters does) | speed-up batched vs sklearn | mean ARI torch vs sklearn | mean ARI sklearn seed 0 "
            "vs seed 1 |", "|---|---|---|---|---|---|---|---|"]
    for n, images in ((defaults.probe_size, defaults.label_map_fit_images), (256, 4)):
        with torch.no_grad(), ActivationRecorder(model, layers) as pooled:
            model(x[:n])
        with torch.no_grad(), ActivationRecorder(model, layers, pool=False) as full:
            model(x[:images])
        requests = [(act, y[:n], None) for act in pooled.stacked().values()]
        requests += [(spatial_samples(m), None, defaults.max_label_map_positions)
                     for m in full.stacked().values() if m.dim() >= 3]
        one_by_one = lambda backend: [fit_dpgmm(a, c, max_fit_rows=r, **{**options, "backend": backend})  # noqa: E731
                                      for a, c, r in requests]
        sk_s = best_time(lambda: one_by_one("sklearn"), repeats)
        torch_s = best_time(lambda: one_by_one("torch"), repeats)
        batched_s = best_time(lambda: fit_dpgmm_many(requests, **options), repeats)
        sklearn_fits = one_by_one("sklearn")
        agreement = [cluster_agreement(a.labels, b.labels)[1]
                     for a, b in zip(fit_dpgmm_many(requests, **options), sklearn_fits)]
        reseeded = [fit_dpgmm(a, c, max_fit_rows=r, **{**options, "backend": "sklearn", "seed": 1})
                    for a, c, r in requests]
        variability = [cluster_agreement(a.labels, b.labels)[1] for a, b in zip(sklearn_fits, reseeded)]
        rows.append(f"| {n} samples, {images} label-map images | {len(requests)} | {1000 * sk_s:.0f} ms | "
                    f"{1000 * torch_s:.0f} ms | {1000 * batched_s:.0f} ms | {sk_s / batched_s:.1f}x | "
                    f"{sum(agreement) / len(agreement):.2f} | {sum(variability) / len(variability):.2f} |")
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


class CapturingClusters(LayerClusters):
    """LayerClusters that keeps the inputs of each run's fits (layer, kind) -> (rows, classes, row cap)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.captured: list[dict] = []

    def _fit_all(self, requests):
        self.captured.append(dict(requests))
        return super()._fit_all(requests)


def convergence_table(epochs: int) -> list[str]:
    """The demo's own LayerClusters inputs (every run of a demo training), fitted again at several ``max_iter``:
    how far the counts at the callback's default are from converged ones."""
    callback = CapturingClusters()
    with TemporaryDirectory() as root:
        demo_run(epochs, callback, root)
    iterations = (50, 100, 200, 500)
    rows = ["Counts per fit (the callback's options, only `max_iter` varied; `*` = stopped at `max_iter` before the "
            "lower bound settled, tol 1e-3); last column: scikit-learn, its own k-means start, `max_iter` 500.", "",
            "| run | fit | " + " | ".join(f"max_iter {m}" + (" (default)" if m == CALLBACK_MAX_ITER else "")
                                         for m in iterations) + " | scikit-learn, 500 |",
            "|---" * (len(iterations) + 3) + "|"]
    options = {k: v for k, v in callback.fit_options.items() if k != "max_iter"}
    for run, requests in enumerate(callback.captured):
        keys = list(requests)
        per_iter = [fit_dpgmm_many([requests[k] for k in keys], max_iter=m, **options) for m in iterations]
        reference = fit_dpgmm_many([requests[k] for k in keys], max_iter=500, backend="sklearn", **options)
        for i, (layer, kind) in enumerate(keys):
            cells = [f"{fits[i].n_clusters}{'' if fits[i].converged else '*'}" for fits in per_iter]
            rows.append(f"| {run + 1} | {layer} ({kind}) | " + " | ".join(cells) + f" | {reference[i].n_clusters} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=2, help="demo runs without/with the callback")
    parser.add_argument("--convergence-only", action="store_true", help="only section (4)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    seeds, epochs = (1, 6) if args.quick else (3, 20)
    convergence = (f"(4) Convergence of the demo's own fits ({epochs}-epoch demo, LayerClusters() at defaults)",
                   convergence_table(epochs))
    if args.convergence_only:
        print(f"python {' '.join(sys.argv)}; torch {torch.__version__}\n\n### {convergence[0]}\n")
        print("\n".join(convergence[1]))
        return
    sections = [
        ("(1) Planted Gaussian groups, dims 8/24/64 x seeds, fit_dpgmm defaults", synthetic_table(seeds, 512)),
        ("(1b) The same with 256 points", synthetic_table(seeds, 256)),
        ("(1c) One Gaussian blob, 20 seeds", single_blob_table(20 if not args.quick else 5)),
        ("(2) A trained model: per-sample clusters of each DigitsCNN layer vs the 10 classes", trained_model_table(15)),
        ("(3a) The fits of one LayerClusters run (best of 5, one thread)", fit_cost_table()),
        (f"(3b) Whole demo run, {epochs} epochs, LayerClusters() at defaults", overhead_table(epochs, args.pairs)),
        convergence,
    ]
    print(f"python {' '.join(sys.argv)}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    for title, rows in sections:
        print(f"### {title}\n")
        print("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
