"""MirroredInfluence against its peers, in one process, on the same digits data and the same training run.

Mislabeled samples — digits, 20% symmetric label noise, the demo CNN trained until it memorises (Adam 3e-3,
batch 64). Every method sees the same run; its wall time is what it adds on top of that training:

* mirrored (ours): ``mislabel_scores`` at every ``--every``-th epoch, running mean (what the callback does);
* per-sample loss of the final model; AUM (Pleiss et al. 2020, margin averaged over every epoch);
* cleanlab ``find_label_issues`` ranking on 5-fold cross-validated probabilities (its 5 trainings are its cost);
* captum ``TracInCP`` self-influence over the same checkpoints ours sees; our own ``self_influence`` likewise.

Leaked test images — clean labels; copies of test images inserted into training: exact, jittered (Gaussian
σ=0.05, clipped), shifted one pixel right and shifted two pixels right. For every test query: top-1/top-5
retrieval of its copy and the AUROC of the leak score (leaked vs clean queries), against input-space nearest
neighbours (plain, and under the same 1-pixel translations our default searches).

Run: ``PYTHONPATH=. python benchmarks/mirrored.py`` (about 3 minutes on 2 CPU cores; ``--leaks-only``: 30 s).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.demo import DigitsCNN, load_digits_tensors
from lightning_interp.methods.mirrored import (
    leak_scores,
    mislabel_scores,
    self_influence,
    tensor_batches,
    translation_orbit,
)


def train(x, y, epochs: int, seed: int, width: int = 16, on_epoch_end=lambda epoch, model: None) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN(width=width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
        model.eval()
        on_epoch_end(epoch, model)
    return model


@torch.no_grad()
def margins(model, x, y) -> torch.Tensor:
    logits = model.eval()(x)
    given = logits.gather(1, y[:, None]).squeeze(1)
    return given - logits.scatter(1, y[:, None], float("-inf")).max(1).values


def mislabel_metrics(scores: torch.Tensor, flipped: torch.Tensor) -> tuple[float, float]:
    k = int(flipped.sum())
    return roc_auc_score(flipped.numpy(), scores.numpy()), float(flipped[scores.topk(k).indices].float().mean())


def mislabel_benchmark(args) -> list[list]:
    s = load_digits_tensors(noise_fraction=0.2, seed=args.seed)
    x, y = s.x_train, s.y_train
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[s.flipped] = True
    timings = {"mirrored": 0.0, "aum": 0.0, "floor": 0.0}
    mirrored_runs, one_shot, aum, checkpoints = [], None, [], []
    ckpt_dir = Path(tempfile.mkdtemp(prefix="mirrored_bench_"))

    def on_epoch_end(epoch, model):
        nonlocal one_shot
        t = time.perf_counter()
        aum.append(margins(model, x, y))
        timings["aum"] += time.perf_counter() - t
        if (epoch + 1) % args.every == 0:
            t = time.perf_counter()
            mirrored_runs.append(mislabel_scores(model, s.x_val, s.y_val, tensor_batches(x, y)).scores)
            timings["mirrored"] += time.perf_counter() - t
            timings["floor"] += loss_pass_seconds(model, x, y, passes=2)
            path = ckpt_dir / f"epoch{epoch}.pt"
            torch.save(model.state_dict(), path)
            checkpoints.append(str(path))

    t = time.perf_counter()
    model = train(x, y, args.epochs, args.seed, args.width, on_epoch_end)
    train_seconds = time.perf_counter() - t
    rows = []

    def row(name, scores, seconds, note=""):
        auc, prec = mislabel_metrics(scores, flipped)
        rows.append([name, f"{auc:.3f}", f"{prec:.3f}", f"{seconds:.2f}", note])
        print(f"  {name}: {seconds:.1f} s", flush=True)

    row("mirrored, accumulated (ours)", torch.stack(mirrored_runs).mean(0), timings["mirrored"],
        f"{len(mirrored_runs)} runs (every {args.every} epochs)")
    row("mirrored, last checkpoint only", mirrored_runs[-1], timings["mirrored"] / len(mirrored_runs), "one run")
    t = time.perf_counter()
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(x), y, reduction="none")
    row("per-sample final loss", loss, time.perf_counter() - t)
    row("AUM (margin over epochs)", -torch.stack(aum).mean(0), timings["aum"], f"{args.epochs} epochs")
    row(*cleanlab_scores(x, y, args))
    row(*tracin_scores(checkpoints, x, y, args.width, fast=True),
        f"captum, fast mode (Conv/Linear layers), {len(checkpoints)} checkpoints")
    if not args.skip_exact_tracin:
        row(*tracin_scores(checkpoints, x, y, args.width, fast=False),
            f"captum at its defaults (all parameters), {len(checkpoints)} checkpoints")
    t = time.perf_counter()
    own = torch.zeros(len(y))
    for path in checkpoints:
        net = DigitsCNN(width=args.width)
        net.load_state_dict(torch.load(path))
        own += self_influence(net.eval(), x, y)
    row("TracIn self-influence (ours)", own, time.perf_counter() - t, f"{len(checkpoints)} checkpoints")
    print(f"training: {train_seconds:.1f} s for {args.epochs} epochs; {int(flipped.sum())} of {len(y)} labels flipped")
    rows.append(["floor: two forward passes over the training set per run", "", "", f"{timings['floor']:.2f}",
                 f"the least any mirrored score costs (losses before and after), {len(mirrored_runs)} runs"])
    return rows


def loss_pass_seconds(model: nn.Module, x, y, passes: int) -> float:
    """Seconds of ``passes`` eval-mode forward passes over ``(x, y)`` in the scorer's batches (the model's mode is
    restored; nothing else is touched)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(passes):
            for xb, yb in tensor_batches(x, y):
                F.cross_entropy(model(xb), yb, reduction="none")
    model.train(was_training)
    return time.perf_counter() - start


def cleanlab_scores(x, y, args):
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    t = time.perf_counter()
    probs = torch.zeros(len(y), 10)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=args.seed)
    for fold, (fit_idx, held_idx) in enumerate(folds.split(np.zeros(len(y)), y.numpy())):
        fit_idx, held_idx = torch.as_tensor(fit_idx), torch.as_tensor(held_idx)
        net = train(x[fit_idx], y[fit_idx], args.epochs, args.seed + fold + 1, args.width)
        with torch.no_grad():
            probs[held_idx] = net.eval()(x[held_idx]).softmax(1)
    quality = get_label_quality_scores(y.numpy(), probs.numpy())
    return "cleanlab (5-fold CV probabilities)", -torch.as_tensor(quality), time.perf_counter() - t, "5 trainings"


def tracin_scores(checkpoints, x, y, width: int, fast: bool):
    from captum.influence import TracInCP

    def load(net, path):
        net.load_state_dict(torch.load(path))
        net.eval()
        return 1.0

    t = time.perf_counter()
    model = DigitsCNN(width=width).eval()
    if fast:
        # captum's fast per-sample gradients cover Conv/Linear layers only: the BatchNorm affine (64 of ~30k
        # parameters) is left out.
        layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        tracin = TracInCP(model, TensorDataset(x, y), checkpoints, checkpoints_load_func=load, layers=layers,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=256,
                          sample_wise_grads_per_batch=True)
    else:  # captum's defaults: every parameter, per-sample gradients one sample at a time
        tracin = TracInCP(model, TensorDataset(x, y), checkpoints, checkpoints_load_func=load,
                          loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=256)
    scores = tracin.self_influence(DataLoader(TensorDataset(x, y), batch_size=256))
    name = "captum TracInCP self-influence" + ("" if fast else ", defaults")
    return name, scores.detach(), time.perf_counter() - t


def shift_right(images: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    return F.pad(images, (pixels, 0, 0, 0))[..., :-pixels]


def translated_nearest_neighbours(queries: torch.Tensor, train: torch.Tensor, radius: int = 1, k: int = 5):
    """Input-space nearest neighbours, each query compared under every translation up to ``radius`` pixels."""
    orbit = translation_orbit(queries, radius).flatten(2)  # [G, Q, D]
    distance = torch.stack([torch.cdist(view, train.flatten(1)) for view in orbit]).amin(0)
    return distance.topk(k, largest=False)


def leak_benchmark(args) -> list[list]:
    s = load_digits_tensors(seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 100)
    torch.randperm(len(s.y_test), generator=gen)  # the draw of the earlier 3-kind table, kept so the same images
    chosen = torch.randperm(len(s.y_test), generator=gen)[: 4 * args.leaks_per_kind]  # are chosen as in the docs
    kinds = dict(zip(["exact", "jittered", "shifted", "shifted 2 px"], chosen.split(args.leaks_per_kind)))
    x, y, copy_of = [s.x_train], [s.y_train], {}
    offset = len(s.y_train)
    for kind, queries in kinds.items():
        images = s.x_test[queries]
        if kind == "jittered":
            images = (images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
        if kind.startswith("shifted"):
            images = shift_right(images, 2 if "2 px" in kind else 1)
        copy_of.update({int(q): offset + i for i, q in enumerate(queries)})
        x.append(images)
        y.append(s.y_test[queries])
        offset += len(queries)
    x, y = torch.cat(x), torch.cat(y)
    leaked = torch.zeros(len(s.y_test), dtype=torch.bool)
    leaked[chosen] = True
    model = train(x, y, args.epochs, args.seed, args.width).eval()
    rows = []

    def row(name, top5, score, seconds):
        cells = [name]
        for queries in kinds.values():
            hits = torch.tensor([copy_of[int(q)] for q in queries])
            cells.append(f"{(top5[queries, 0] == hits).float().mean():.2f} / "
                         f"{(top5[queries] == hits[:, None]).any(1).float().mean():.2f}")
        cells += [f"{roc_auc_score(leaked.numpy(), score.numpy()):.3f}", f"{seconds:.2f}"]
        rows.append(cells)

    t = time.perf_counter()
    distance = torch.cdist(s.x_test.flatten(1), x.flatten(1)).topk(5, largest=False)
    row("input-space nearest neighbour", distance.indices, -distance.values[:, 0], time.perf_counter() - t)
    t = time.perf_counter()
    distance = translated_nearest_neighbours(s.x_test, x, radius=1)
    row("input-space nearest neighbour, min over 1-pixel translations", distance.indices, -distance.values[:, 0],
        time.perf_counter() - t)
    for name, options in [
        ("mirrored, relative head step, T = 10, 1-pixel translations (ours, default)", {}),
        ("  same, T = 10, no translations", {"shift_radius": 0}),
        ("  same, T = 1, no translations (the previous default)", {"shift_radius": 0, "temperature": 1.0}),
        ("  same, T = 10, translations up to 2 pixels", {"shift_radius": 2}),
    ]:
        t = time.perf_counter()
        relative = leak_scores(model, s.x_test, s.y_test, x, y, rule="relative", **options)
        row(name, relative.top_k, relative.score, time.perf_counter() - t)
    t = time.perf_counter()
    reference = leak_scores(model, s.x_test, s.y_test, x, y, rule="reference", candidates=None)
    row("mirrored, reference rule (Adam ascent, |Δloss|, all pairs)", reference.top_k, reference.score,
        time.perf_counter() - t)
    fit = int((reference.radius > 0).sum())
    print(f"leakage: {len(s.y_test)} test queries, {len(chosen)} leaked; reference rule moved {fit} fit queries onto "
          f"the L2 sphere (radius {reference.radius[reference.radius > 0].min():.2f}-{reference.radius.max():.2f})")
    return rows


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="scoring schedule (the callback default: 10)")
    parser.add_argument("--leaks-per-kind", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--leaks-only", action="store_true", help="skip the mislabel part")
    parser.add_argument("--width", type=int, default=16, help="DigitsCNN width (16: the demo model, ~30k parameters)")
    parser.add_argument("--skip-exact-tracin", action="store_true",
                        help="leave out captum's TracInCP at its defaults (minutes on wide models)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not args.leaks_only:
        rows = mislabel_benchmark(args)
        print(markdown(["method", "AUROC", "precision@k", "seconds", "note"], rows))
        seconds = {r[0]: float(r[3]) for r in rows}
        ours = seconds["mirrored, accumulated (ours)"]
        floor = seconds["floor: two forward passes over the training set per run"]
        for name in ("captum TracInCP self-influence", "captum TracInCP self-influence, defaults"):
            if name in seconds:
                print(f"\n{name} / mirrored (ours) wall time: {seconds[name] / ours:.1f}x "
                      f"(/ the forward-pass floor: {seconds[name] / floor:.1f}x)", end="")
        print(f"\nparameters: {sum(p.numel() for p in DigitsCNN(width=args.width).parameters())}")
        print()
    rows = leak_benchmark(args)
    print(markdown(["method", "exact top-1 / top-5", "jittered top-1 / top-5", "shifted top-1 / top-5",
                    "shifted 2 px top-1 / top-5", "AUROC leaked vs clean", "seconds"], rows))
    print(f"\ntotal benchmark time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
