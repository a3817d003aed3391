"""COAR vs leave-one-component-out vs gradient x parameter on the demo CNN, and a COAR-Edit example.

One process, one trained model, the same examples and the same held-out masks for every method:

1. per alpha in {0.05, 0.10, 0.15}: held-out per-example Pearson correlation (mean over examples) of each
   method's linear prediction of the margins, and each method's wall time to produce its attributions;
2. at alpha = 0.10: correlation against the number of fitting masks (prefixes of one mask stream);
3. the callback's default budget (12 examples, 128 masks, ridge 0.01);
4. COAR-Edit: fix misclassified test images one at a time, report the accuracy of the rest of the test set
   (never used by the edit) before and after;
5. (``--overhead``) ``ComponentAttribution()`` at defaults on the demo's Lightning run (20 epochs, a
   ModelCheckpoint every epoch): wall time of the fit with and without it, and the time spent inside it.

    PYTHONPATH=. python benchmarks/coar.py              # 1-4: < 10 min on 2 shared CPU cores
    PYTHONPATH=. python benchmarks/coar.py --overhead   # only 5: the callback's cost on the demo at defaults
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lightning_interp.demo import DigitsCNN, load_digits_tensors
from lightning_interp.methods import coar as C


def train_demo(epochs: int, seed: int = 0):
    """The demo CNN trained on the demo data (10% symmetric label noise), as in examples/."""
    data = load_digits_tensors(noise_fraction=0.1, n_leaked=0, seed=seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=model.hparams.lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(data.x_train), generator=gen).split(64):
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), data


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def mean_corr(c: torch.Tensor) -> float:
    return float(c.nanmean())


def compare_methods(model, comps, x, y, alphas, n_masks, n_eval):
    loo, t_loo = timed(C.leave_one_out_attributions, model, comps, x, y)
    gxp, t_gxp = timed(C.grad_times_param_attributions, model, comps, x, y)
    rows, kept = [], {}
    for alpha in alphas:
        sampler = torch.Generator().manual_seed(0)
        masks = C.sample_keep_masks(n_masks, len(comps), alpha, sampler)
        margins, t_collect = timed(C.margins_under_masks, model, comps, x, y, masks)
        (w, b), t_solve = timed(C.solve_attributions, masks, margins)
        fitted = {"coar": (w, b), "loo": loo, "gxp": gxp}
        corr = C.heldout_correlation(model, comps, x, y, fitted, n_eval, alpha, seed=1)
        rows.append((alpha, *(mean_corr(corr[k]) for k in ("coar", "loo", "gxp")), t_collect + t_solve))
        kept[alpha] = (masks, margins, t_collect)
    return rows, t_loo, t_gxp, kept


def mask_growth(model, comps, x, y, masks, margins, t_collect, counts, n_eval):
    predictors = {m: C.solve_attributions(masks[:m], margins[:m]) for m in counts}
    ridge = {m: C.solve_attributions(masks[:m], margins[:m], ridge=0.01) for m in counts}
    corr = C.heldout_correlation(
        model, comps, x, y, {**{f"p{m}": p for m, p in predictors.items()}, **{f"r{m}": p for m, p in ridge.items()}},
        n_eval, 0.1, seed=1,
    )
    per_mask = t_collect / len(masks)
    return [(m, mean_corr(corr[f"p{m}"]), mean_corr(corr[f"r{m}"]), per_mask * m) for m in counts]


def callback_defaults(model, comps, x, y, n_eval):
    """ComponentAttribution's default budget: 12 examples, 128 fitting and 24 evaluation masks, ridge 0.01."""
    coar = C.COAR(alpha=0.1, n_masks=128, ridge=0.01, seed=0)
    _, t_fit = timed(coar.fit, model, x[:12], y[:12])
    return coar.score(model, x[:12], y[:12], n_masks=24), coar.score(model, x[:12], y[:12], n_masks=n_eval), t_fit


def edit_examples(model, data, n_masks, n_targets, n_reference):
    with torch.no_grad():
        test_pred = model(data.x_test).argmax(1)
    wrong = (test_pred != data.y_test).nonzero().flatten()[:n_targets]
    ref = torch.randperm(len(data.x_val), generator=torch.Generator().manual_seed(0))[:n_reference]
    x = torch.cat([data.x_test[wrong], data.x_val[ref]])
    y = torch.cat([data.y_test[wrong], data.y_val[ref]])
    coar, t_fit = timed(C.COAR(alpha=0.1, n_masks=n_masks, seed=2).fit, model, x, y)
    reference = torch.arange(len(wrong), len(x))
    rows = []
    for i, test_index in enumerate(wrong.tolist()):
        result = C.edit(model, coar.components_, coar.attributions_, x, y, torch.tensor([i]), reference,
                        max_components=10)
        rest = torch.ones(len(data.x_test), dtype=torch.bool)
        rest[test_index] = False
        with torch.no_grad():
            after_pred = result.model(data.x_test).argmax(1)
        acc_before = float((test_pred[rest] == data.y_test[rest]).float().mean())
        acc_after = float((after_pred[rest] == data.y_test[rest]).float().mean())
        rows.append((
            test_index, int(data.y_test[test_index]), int(test_pred[test_index]), int(after_pred[test_index]),
            result.ablated, float(result.target_margins_before), float(result.target_margins_after),
            result.reference_accuracy_before, result.reference_accuracy_after, acc_before, acc_after,
        ))
    return rows, t_fit, len(x)


def callback_overhead(epochs: int = 20, repeats: int = 2) -> None:
    import shutil
    import tempfile
    import warnings
    from pathlib import Path

    from lightning_interp import ComponentAttribution
    from lightning_interp._lightning import ModelCheckpoint, Trainer
    from lightning_interp.demo import DigitsDataModule

    warnings.filterwarnings("ignore")
    spent: list[float] = []

    def timing(method):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)
        return wrapper

    class Timed(ComponentAttribution):  # every hook that does work, timed
        on_save_checkpoint = timing(ComponentAttribution.on_save_checkpoint)
        on_train_end = timing(ComponentAttribution.on_train_end)
        on_train_epoch_end = timing(ComponentAttribution.on_train_epoch_end)
        setup = timing(ComponentAttribution.setup)

    print("| run | fit wall (s) | inside ComponentAttribution (s) | share of the fit |\n|---|---|---|---|")
    for repeat in range(repeats):
        for use in (False, True):
            root = Path(tempfile.mkdtemp())
            torch.manual_seed(0)
            callbacks = [ModelCheckpoint(dirpath=root / "ckpt")] + ([Timed()] if use else [])
            trainer = Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                              default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                              num_sanity_val_steps=0)
            spent.clear()
            _, wall = timed(trainer.fit, DigitsCNN(), DigitsDataModule())
            name = "with ComponentAttribution()" if use else "without"
            print(f"| {repeat + 1}: {name} | {wall:.2f} | {sum(spent):.2f} | {100 * sum(spent) / wall:.1f}% |")
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--examples", type=int, default=100, help="test examples whose margins are modelled")
    parser.add_argument("--masks", type=int, default=1000, help="fitting masks per alpha")
    parser.add_argument("--eval-masks", type=int, default=300)
    parser.add_argument("--edit-targets", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overhead", action="store_true", help="only measure the callback's cost on the demo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.overhead:
        callback_overhead()
        return
    start = time.perf_counter()

    model, data = train_demo(args.epochs)
    with torch.no_grad():
        test_acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    comps = C.find_components(model)
    x, y = data.x_test[: args.examples], data.y_test[: args.examples]
    print(f"demo CNN, {args.epochs} epochs, test accuracy {test_acc:.3f}; {len(comps)} components "
          f"({', '.join(f'{g.name}: {g.size}' for g in comps.groups)}); {len(x)} test examples; "
          f"{args.masks} fitting masks, {args.eval_masks} fresh evaluation masks per alpha\n")

    rows, t_loo, t_gxp, kept = compare_methods(model, comps, x, y, (0.05, 0.1, 0.15), args.masks, args.eval_masks)
    print("| alpha | COAR corr | leave-one-out corr | grad x param corr | COAR time (s) | LOO time (s) "
          "| GxP time (s) |")
    print("|---|---|---|---|---|---|---|")
    for alpha, coar, loo, gxp, t in rows:
        print(f"| {alpha:.2f} | **{coar:.3f}** | {loo:.3f} | {gxp:.3f} | {t:.1f} | {t_loo:.1f} | {t_gxp:.2f} |")

    masks, margins, t_collect = kept[0.1]
    counts = [m for m in (150, 250, 500, 750, 1000, 2000) if m <= len(masks)]
    print("\n| masks (alpha 0.10) | COAR corr (least squares) | COAR corr (ridge 0.01) | ablation time (s) |")
    print("|---|---|---|---|")
    for m, plain, ridge, t in mask_growth(model, comps, x, y, masks, margins, t_collect, counts, args.eval_masks):
        print(f"| {m} | {plain:.3f} | {ridge:.3f} | {t:.1f} |")

    corr_32, corr_full, t_fit = callback_defaults(model, comps, x, y, args.eval_masks)
    print(f"\ncallback defaults (12 examples, 128 masks, ridge 0.01): fit {t_fit:.2f} s, held-out correlation "
          f"{corr_32:.3f} on its 24 evaluation masks, {corr_full:.3f} on {args.eval_masks}")

    edits, t_fit, n_fit = edit_examples(model, data, args.masks, args.edit_targets, 100)
    print(f"\nCOAR-Edit: COAR fitted on {n_fit} examples (the misclassified test images + 100 validation images as "
          f"the reference set) with {args.masks} masks in {t_fit:.1f} s; each error edited on its own")
    print("| test image | label | predicted before | after | components ablated | margin before -> after "
          "| reference acc before -> after | rest of test set acc before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for idx, label, before, after, ablated, m0, m1, r0, r1, a0, a1 in edits:
        print(f"| {idx} | {label} | {before} | {after} | {len(ablated)}: {', '.join(ablated)} | {m0:+.2f} -> {m1:+.2f} "
              f"| {r0:.3f} -> {r1:.3f} | {a0:.4f} -> {a1:.4f} ({100 * (a1 - a0):+.2f} pt) |")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
