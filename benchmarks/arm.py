"""ARM benchmark: speed against SciPy, and whether ARM predicts retraining cost on digits.

Run from the repository root::

    PYTHONPATH=. python benchmarks/arm.py            # full run (5 seeds, 11 noise levels, ~3-5 min)
    PYTHONPATH=. python benchmarks/arm.py --quick    # 1 seed, 4 levels, for a smoke test

(1) Speed: exact per-unit 1-D Wasserstein on a 512-unit layer with 2,000 samples per side, our vectorised
    ``wasserstein_1d`` against a loop of ``scipy.stats.wasserstein_distance`` over the units, same data,
    same process, ours on 1 and on 2 threads (SciPy is single-threaded). Also with a reference sorted once (what
    ARMDrift does every epoch; SciPy is given the sorted reference too) and with different sample sizes.
(2) Validity: per seed, a DigitsCNN trained on clean digits; for Gaussian noise sigma in {0, 0.1, ..., 1.0},
    ARM (clean vs noisy test inputs), then a copy retrained on the noisy training set (Adam 1e-3, batch 128)
    to its plateau; the cost is the number of epochs until the noisy-test accuracy first reached 95% of the
    best it attained (``measure_retraining_costs`` defaults); epochs averaged over seeds. Spearman and Pearson of the
    predictor with the mean epochs, for ARM and two alternatives: the accuracy drop on the shifted data and
    1 - linear CKA (Kornblith et al. 2019) between clean and noisy activations (mean over the same layers).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr, wasserstein_distance

from lightning_interp.capture import select_layers
from lightning_interp.demo import DigitsCNN, load_digits_tensors
from lightning_interp.methods.arm import (
    ARMCostModel,
    gaussian_noise_shift,
    measure_retraining_costs,
    record_activations,
    sort_samples,
    wasserstein_1d,
)

from _timing import best_time as best_of


def speed_table(units: int = 512, n: int = 2000, m_other: int = 1500) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, units, generator=gen)
    b = torch.randn(n, units, generator=gen) * 1.3 + 0.2
    b_other = b[:m_other]
    a_np, b_np, b_other_np = a.numpy(), b.numpy(), b_other.numpy()

    def scipy_loop(x, y):
        return np.array([wasserstein_distance(x[:, u], y[:, u]) for u in range(units)])

    ours = wasserstein_1d(a, b).double().numpy()
    max_err = float(np.abs(ours - scipy_loop(a_np, b_np)).max())
    max_err_other = float(np.abs(wasserstein_1d(a, b_other).double().numpy() - scipy_loop(a_np, b_other_np)).max())
    a_sorted = sort_samples(a)
    a_sorted_np = np.ascontiguousarray(a_sorted.numpy())
    cases = [
        (f"{n} vs {n} samples", lambda: wasserstein_1d(a, b), lambda: scipy_loop(a_np, b_np), max_err),
        (
            f"{n} vs {n}, reference sorted once",
            lambda: wasserstein_1d(a_sorted, sort_samples(b), assume_sorted=True),
            lambda: scipy_loop(a_sorted_np, b_np),  # SciPy gets the sorted reference too (it sorts it faster)
            max_err,
        ),
        (f"{n} vs {m_other} samples", lambda: wasserstein_1d(a, b_other), lambda: scipy_loop(a_np, b_other_np),
         max_err_other),
    ]
    rows = [
        "| case (512 units, float32) | ours, 1 thread (ms) | ours, 2 threads (ms) | SciPy loop (ms) | "
        "speed-up 1 / 2 threads | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    threads = torch.get_num_threads()
    for label, ours_fn, peer_fn, err in cases:
        t_ours = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)  # our sort splits its units over torch.get_num_threads() threads
            t_ours.append(best_of(ours_fn, 15))
        torch.set_num_threads(threads)
        t_peer = best_of(peer_fn, 3)
        rows.append(f"| {label} | {t_ours[0] * 1e3:.1f} | {t_ours[1] * 1e3:.1f} | {t_peer * 1e3:.1f} | "
                    f"{t_peer / t_ours[0]:.1f}x / {t_peer / t_ours[1]:.1f}x | {err:.1e} |")
    return rows


def train_clean(seed: int, epochs: int = 15):
    torch.manual_seed(seed)
    splits = load_digits_tensors(seed=seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(splits.y_train), generator=gen).split(64):
            loss = F.cross_entropy(model(splits.x_train[batch]), splits.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, splits


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of paired activations ``[N, p]`` and ``[N, q]`` (Kornblith et al. 2019, eq. for linear kernel)."""
    x, y = (x - x.mean(0)).double(), (y - y.mean(0)).double()
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def cka_distance(model, clean: torch.Tensor, shifted: torch.Tensor) -> float:
    layers = select_layers(model)
    acts_clean = record_activations(model, clean, layers)
    acts_shift = record_activations(model, shifted, layers)
    return float(np.mean([1.0 - linear_cka(acts_clean[k], acts_shift[k]) for k in layers]))


def leave_one_seed_out_rows(per_seed: list[dict]) -> list[str]:
    """Mean absolute error of a linear cost model fitted on the other seeds, per predictor."""
    rows = ["", "| linear cost model, leave one seed out | mean abs. error (epochs) |", "|---|---|"]
    for label, key in [("ARMCostModel on ARM", "arm"), ("same fit on accuracy drop", "acc_drop"),
                       ("same fit on 1 - CKA", "cka"), ("constant: mean epochs of the other seeds", None)]:
        errors = []
        for held_out in range(len(per_seed)):
            rest = [run for i, run in enumerate(per_seed) if i != held_out]
            truth = np.asarray(per_seed[held_out]["epochs"], dtype=float)
            if key is None:
                guess = np.full_like(truth, np.mean([run["epochs"] for run in rest]))
            else:
                model = ARMCostModel().fit([v for run in rest for v in run[key]],
                                           [v for run in rest for v in run["epochs"]], target="epochs")
                guess = model.predict(per_seed[held_out][key]).numpy()
            errors.append(np.abs(guess - truth).mean())
        rows.append(f"| {label} | {np.mean(errors):.2f} |")
    return rows


def validity_table(seeds: list[int], levels: list[float], max_epochs: int) -> tuple[list[str], list[str]]:
    per_seed = []
    for seed in seeds:
        model, s = train_clean(seed)
        started = time.perf_counter()
        records = measure_retraining_costs(
            model, (s.x_train, s.y_train), (s.x_test, s.y_test), levels, max_epochs=max_epochs, seed=seed,
            tracker="auto",  # target: 95% of the accuracy retraining reaches at its plateau
        )
        clean_acc = (model(s.x_test).argmax(1) == s.y_test).float().mean().item()
        cka = []
        for level in levels:  # the same noisy test inputs as measure_retraining_costs (generator seed + 1)
            shifted_test = gaussian_noise_shift(s.x_test, level, torch.Generator().manual_seed(seed + 1))
            cka.append(cka_distance(model, s.x_test, shifted_test))
        per_seed.append(
            {
                "arm": [r.arm for r in records],
                "epochs": [r.epochs for r in records],
                "reached": [r.reached for r in records],
                "seconds": [r.seconds for r in records],
                "acc_drop": [clean_acc - r.accuracy_before for r in records],
                "cka": cka,
                "energy": [r.energy_kwh for r in records],
            }
        )
        best = [round(r.best_accuracy, 2) for r in records]
        print(f"seed {seed}: clean acc {clean_acc:.3f}, best after retraining {best}, "
              f"epochs {[r.epochs for r in records]}, {time.perf_counter() - started:.0f} s", flush=True)

    def mean(key):
        return np.mean([[float(v) for v in run[key]] for run in per_seed], axis=0)

    epochs = mean("epochs")
    levels_rows = ["| sigma | ARM | accuracy drop | 1 - CKA | retraining epochs (mean) | seconds (mean) | "
                   "reached target |", "|---|---|---|---|---|---|---|"]
    for i, level in enumerate(levels):
        reached = sum(run["reached"][i] for run in per_seed)
        levels_rows.append(
            f"| {level:.1f} | {mean('arm')[i]:.4f} | {mean('acc_drop')[i]:.3f} | {mean('cka')[i]:.4f} | "
            f"{epochs[i]:.2f} | {mean('seconds')[i]:.2f} | {reached}/{len(per_seed)} |"
        )
    corr_rows = ["| predictor of retraining epochs | Spearman | Pearson |", "|---|---|---|"]
    for label, key in [("ARM", "arm"), ("accuracy drop", "acc_drop"), ("1 - linear CKA", "cka")]:
        pred = mean(key)
        corr_rows.append(f"| {label} | {spearmanr(pred, epochs)[0]:.3f} | {pearsonr(pred, epochs)[0]:.3f} |")
    pooled_arm = np.concatenate([run["arm"] for run in per_seed])
    pooled_epochs = np.concatenate([run["epochs"] for run in per_seed]).astype(float)
    corr_rows.append(
        f"| ARM, pooled ({len(pooled_arm)} seed x level pairs) | {spearmanr(pooled_arm, pooled_epochs)[0]:.3f} | "
        f"{pearsonr(pooled_arm, pooled_epochs)[0]:.3f} |"
    )
    if len(per_seed) > 1:  # leaving one seed out needs another to fit on
        corr_rows += leave_one_seed_out_rows(per_seed)
    energies = [e for run in per_seed for e in run["energy"]]
    measured = all(e is not None for e in energies)
    corr_rows.append(f"\nEnergy/CO2: {'measured' if measured else 'not measured (no tracker installed)'}.")
    return levels_rows, corr_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed and 4 noise levels")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--speed-only", action="store_true", help="only the speed table")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core each: SciPy is single-threaded, and the machine is shared
    started = time.perf_counter()
    print("## Speed: per-unit Wasserstein-1, 512 units\n")
    print("\n".join(speed_table()))
    if args.speed_only:
        return
    seeds = [0] if args.quick else list(range(args.seeds))
    levels = [0.0, 0.3, 0.6, 1.0] if args.quick else [round(0.1 * i, 1) for i in range(11)]
    print(f"\n## Validity: digits, Gaussian noise, seeds {seeds}\n", flush=True)
    levels_rows, corr_rows = validity_table(seeds, levels, args.max_epochs)
    print("\n".join(levels_rows))
    print()
    print("\n".join(corr_rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s, torch {torch.__version__}, 1 thread")


if __name__ == "__main__":
    main()
