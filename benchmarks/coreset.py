"""Coreset probe sets: how faithful is an interpretation computed on 5% / 10% / 30% of the probe set?

Run from the repository root::

    PYTHONPATH=. python benchmarks/coreset.py --threads 1    # add --quick for a smoke run

1. k-center greedy on 10,000 x 512 random features: our lazy exact k-center vs the textbook loop
   (one matrix-vector product per center), same process, same data; herding timed alongside.
2. The demo model (DigitsCNN trained on the demo digits, 10% label noise, 10 leaked images); the probe
   set is its training set. For every selector and fraction, each interpretation result is computed on
   the coreset and compared with the full-set result by :func:`lightning_interp.methods.coreset.fidelity`:

   * ARM per unit: 1-D Wasserstein between the probe's activations and those of a Gaussian-noise-shifted
     copy (sigma 0.1 on [0, 1] pixels), per unit of conv1..conv3, fc1 (``methods.arm``); Spearman and
     top-10% Jaccard within each layer, averaged over layers;
   * ARM per layer: the 4 per-layer ARM values (Spearman over 4 numbers: coarse);
   * mean activation profile: per-unit mean activation, within each layer, averaged over layers;
   * COAR: per-component attribution averaged over the probe examples (``methods.coar``);
   * DP-GMM (``methods.dpgmm``, LayerClusters' defaults): per layer, the cluster count and its NMI with the
     classes; reported as the mean relative count error and mean |NMI difference| over the 4 layers (4
     counts are too few for a rank correlation). Counts grow with the number of samples, so small
     coresets are expected to find fewer clusters.

   Every selector runs plain and class-balanced; "random" is averaged over 5 seeds (mean +- std). A last
   row gives the ceiling of per-unit ARM: the full set against itself under another noise draw.
3. Time saved: each method on the full probe set vs on 5/10/30% of it.
4. adaptive_coreset on per-unit ARM (target Spearman 0.9): the size each selector settles on.

On a busy shared CPU pass ``--threads 1``: timings with several threads then mostly measure waiting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings
import time

import torch
import torch.nn.functional as F

from lightning_interp.demo import DigitsCNN, load_digits_tensors
from lightning_interp import LayerClusters
from lightning_interp.methods import arm, coar
from lightning_interp.methods.dpgmm import fit_dpgmm_many
from lightning_interp.methods.coreset import (
    SELECTORS,
    adaptive_coreset,
    fidelity,
    herding,
    kcenter_greedy,
    resolve_size,
    select_coreset,
)
from _timing import best_time as _best_time


def best_time(fn, repeats: int = 3) -> float:
    return _best_time(fn, repeats, warmup=False)

LAYERS = ("conv1", "conv2", "conv3", "fc1")
FRACTIONS = (0.05, 0.10, 0.30)




# --------------------------------------------------------------------------------- k-center speed
def textbook_kcenter(x: torch.Tensor, size: int, first: int) -> torch.Tensor:
    """Sener & Savarese's greedy loop as usually written: one distance update per new center."""
    sq = (x * x).sum(1)
    min_sq = torch.full((x.shape[0],), float("inf"))
    order = torch.empty(size, dtype=torch.long)
    pick = first
    for t in range(size):
        order[t] = pick
        torch.minimum(min_sq, torch.addmv(sq + sq[pick], x, x[pick], alpha=-2.0), out=min_sq)
        min_sq[pick] = -float("inf")
        pick = int(min_sq.argmax())
    return order


def kcenter_speed(repeats: int) -> list[str]:
    x = torch.randn(10_000, 512, generator=torch.Generator().manual_seed(0))
    default_threads = torch.get_num_threads()
    lines = ["| torch threads | centers | ours (lazy, exact) s | textbook loop s | speed-up | same picks | herding s |",
             "|---|---|---|---|---|---|---|"]
    try:
        for threads in sorted({1, 2, default_threads}):
            torch.set_num_threads(threads)
            kcenter_greedy(x, 100)  # warm-up (first-call kernel setup)
            for size in (500, 1000):
                ours = kcenter_greedy(x, size)
                same = torch.equal(ours, textbook_kcenter(x, size, int(ours[0])))
                t_ours = best_time(lambda: kcenter_greedy(x, size), repeats)
                t_book = best_time(lambda: textbook_kcenter(x, size, int(ours[0])), repeats)
                t_herd = best_time(lambda: herding(x, size), 1)
                lines.append(f"| {threads} | {size} | {t_ours:.3f} | {t_book:.3f} | {t_book / t_ours:.1f}x | {same} "
                             f"| {t_herd:.3f} |")
                print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(default_threads)
    return lines


# ------------------------------------------------------------------------------------ demo model
def train_demo(epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    splits = load_digits_tensors(noise_fraction=0.1, n_leaked=10, seed=seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=model.hparams.lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(splits.x_train), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(splits.x_train[idx]), splits.y_train[idx]).backward()
            opt.step()
    model.eval()
    acc = float((model(splits.x_val).argmax(1) == splits.y_val).float().mean())
    return model, splits, acc


@torch.no_grad()
def record(model, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Spatially pooled activations of LAYERS, penultimate features (fc2's input) and logits."""
    acts, hooks = {}, []
    for name in LAYERS:
        hooks.append(getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: acts.__setitem__(name, o.flatten(2).mean(2) if o.dim() > 2 else o)))
    feats = {}
    hooks.append(model.fc2.register_forward_hook(lambda m, i, o: feats.__setitem__("x", i[0])))
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return acts, feats["x"], logits


def arm_result(model, x_clean, x_noisy):
    a, _, _ = record(model, x_clean)
    b, _, _ = record(model, x_noisy)
    return arm.arm_from_activations(a, b)


def cluster_results(acts: dict[str, torch.Tensor], classes: torch.Tensor) -> list:
    """LayerClusters' per-sample fits (its default options) of every layer, batched as the callback does."""
    options = dict(LayerClusters().fit_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small coresets shrink the truncation, with a warning
        return fit_dpgmm_many([(acts[k], classes, None) for k in LAYERS], **options)


def results_on(model, x, x_noisy, positions, coar_attr, classes):
    res = arm_result(model, x[positions], x_noisy[positions])
    acts, _, _ = record(model, x[positions])
    return {
        "arm_unit": res.per_unit,
        "arm_layer": torch.tensor([res.per_layer[k] for k in LAYERS]),
        "profile": {k: v.mean(0) for k, v in acts.items()},
        "coar": coar_attr[positions].mean(0),
        "clusters": cluster_results({k: v.detach() for k, v in acts.items()}, classes[positions]),
    }


def compare(full, sub) -> dict[str, float]:
    arm_fid = fidelity(full["arm_unit"], sub["arm_unit"])  # {layer: per-unit}: compared within each layer
    coar_fid = fidelity(full["coar"], sub["coar"])
    return {
        "arm_unit_rho": arm_fid["spearman"], "arm_unit_j": arm_fid["jaccard_top_k"],
        "arm_layer_rho": fidelity(full["arm_layer"], sub["arm_layer"], top_k=1)["spearman"],
        "profile_rho": fidelity(full["profile"], sub["profile"])["spearman"],
        "coar_rho": coar_fid["spearman"], "coar_j": coar_fid["jaccard_top_k"],
        "count_err": statistics.mean(abs(s.n_clusters - f.n_clusters) / f.n_clusters
                                     for f, s in zip(full["clusters"], sub["clusters"])),
        "nmi_diff": statistics.mean(abs(s.nmi - f.nmi) for f, s in zip(full["clusters"], sub["clusters"])),
    }


COLUMNS = ("arm_unit_rho", "arm_unit_j", "arm_layer_rho", "profile_rho", "coar_rho", "coar_j", "count_err",
           "nmi_diff")


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def demo_fidelity(epochs: int, n_masks: int, random_seeds: int, repeats: int) -> list[str]:
    t0 = time.perf_counter()
    model, splits, acc = train_demo(epochs)
    x = splits.x_train
    n = len(x)
    x_noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _, features, logits = record(model, x)
    print(f"demo model: {epochs} epochs in {time.perf_counter() - t0:.1f}s, val acc {acc:.3f}, probe n={n}, "
          f"features {tuple(features.shape)}", flush=True)

    components = coar.find_components(model)
    start = time.perf_counter()
    coar_full, _ = coar.fit_attributions(model, components, x, splits.y_train, n_masks=n_masks, seed=0)
    t_coar_full = time.perf_counter() - start
    coar_attr = coar_full  # [examples, components]
    print(f"COAR: {len(components)} components, {n_masks} masks, full fit {t_coar_full:.1f}s", flush=True)

    full = results_on(model, x, x_noisy, torch.arange(n), coar_attr, splits.y_train)
    print("DP-GMM on the full probe: " + ", ".join(f"{k} {f.n_clusters} clusters (NMI {f.nmi:.2f})"
                                                   for k, f in zip(LAYERS, full["clusters"])), flush=True)
    rows = []
    variants = [(sel, False) for sel in SELECTORS] + [(sel, True) for sel in SELECTORS]
    for selector, balance in variants:
        for fraction in FRACTIONS:
            size = resolve_size(n, fraction)
            seeds = range(random_seeds) if selector == "random" else range(1)
            scores: dict[str, list[float]] = {c: [] for c in COLUMNS}
            select_ms = []
            for seed in seeds:
                start = time.perf_counter()
                pos = select_coreset(selector, size, features=features, logits=logits, labels=splits.y_train,
                                     balance=balance, seed=seed)
                select_ms.append((time.perf_counter() - start) * 1e3)
                for c, v in compare(full, results_on(model, x, x_noisy, pos, coar_attr, splits.y_train)).items():
                    scores[c].append(v)
            name = selector + (" (balanced)" if balance else "")
            rows.append(f"| {name} | {fraction:.0%} ({size}) | " + " | ".join(fmt(scores[c]) for c in COLUMNS)
                        + f" | {min(select_ms):.1f} |")
            print(rows[-1], flush=True)
    # the ceiling: the same full-set ARM with another draw of the input noise
    x_noisy2 = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    redraw = fidelity(full["arm_unit"], arm_result(model, x, x_noisy2).per_unit)
    rows.append(f"| full set, another noise draw | 100% ({n}) | {redraw['spearman']:.3f} | "
                f"{redraw['jaccard_top_k']:.3f} | | | | | | | |")
    print(rows[-1], flush=True)
    header = ["| selector | fraction (n) | ARM unit ρ | ARM unit J@10% | ARM layer ρ | profile ρ | COAR ρ | COAR J@10% "
              "| DP-GMM count rel. error | DP-GMM NMI abs. diff | select ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    # time saved: the methods themselves on the full set vs on a coreset (selection is a one-off cost)
    pos10 = select_coreset("random", resolve_size(n, 0.1), n_total=n)
    sub_attr, _ = coar.fit_attributions(model, components, x[pos10], splits.y_train[pos10], n_masks=n_masks, seed=0)
    same_masks = float((sub_attr - coar_attr[pos10]).abs().max())
    timing = ["| method | full set s | 5% s | 10% s | 30% s | speed-up at 10% |", "|---|---|---|---|---|---|"]
    t_arm = {1.0: best_time(lambda: arm_result(model, x, x_noisy), repeats)}
    t_coar = {1.0: t_coar_full}
    for fraction in FRACTIONS:
        pos = select_coreset("random", resolve_size(n, fraction), n_total=n)
        t_arm[fraction] = best_time(lambda: arm_result(model, x[pos], x_noisy[pos]), repeats)
        start = time.perf_counter()
        coar.fit_attributions(model, components, x[pos], splits.y_train[pos], n_masks=n_masks, seed=0)
        t_coar[fraction] = time.perf_counter() - start
    for name, t in (("ARM (forward clean + noisy, W1)", t_arm), (f"COAR fit ({n_masks} masks)", t_coar)):
        timing.append(f"| {name} | {t[1.0]:.3f} | {t[0.05]:.3f} | {t[0.1]:.3f} | {t[0.3]:.3f} | "
                      f"{t[1.0] / t[0.1]:.1f}x |")
    print("\n".join(timing))

    adaptive = ["| selector | chosen size | Spearman | sizes tried (Spearman) |", "|---|---|---|---|"]
    def arm_units(positions):
        return arm_result(model, x[positions], x_noisy[positions]).per_unit

    for selector in SELECTORS:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            res = adaptive_coreset(arm_units, n, selector, features=features, logits=logits, target=0.9)
        tried = ", ".join(f"{size} ({rho:.2f})" for size, rho in res.trace)
        adaptive.append(f"| {selector} | {res.size} ({res.size / n:.0%}) | {res.fidelity['spearman']:.3f} | {tried} |")
    print("\n".join(adaptive))
    print(f"COAR on a 10% subset vs the same rows of the full fit (same masks): max |diff| = {same_masks:.2e}")
    return header + rows, timing, adaptive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer epochs/masks/repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs, n_masks, seeds, repeats = (3, 160, 2, 1) if args.quick else (20, 300, 5, 3)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print("\n## k-center greedy, 10,000 x 512 random features (randn)")
    kcenter_speed(repeats)
    print("\n## fidelity to the full probe set, demo model")
    demo_fidelity(epochs, n_masks, seeds, repeats)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
