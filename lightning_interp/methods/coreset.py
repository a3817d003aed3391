"""Coreset probe sets and the fidelity of an interpretation computed on them.

Behzadi-Khormouji & Oramas, "Deep Model Interpretation with Limited Data: A Coreset-based Approach"
(arXiv 2410.00524): run an interpretation method on a small representative subset instead of the
full set, and *measure* how close the subset's result is to the full result. This module gives

* selectors (:func:`select_coreset`): ``"random"`` (the control), ``"kcenter"`` (greedy k-center on
  penultimate-layer features, Sener & Savarese 2018), ``"uncertainty"`` (entropy / margin / least
  confidence of the predictions), ``"herding"`` (greedy mean matching, Welling 2009; Chen et al. 2010);
* the fidelity measure (:func:`fidelity`): Spearman rank correlation and top-k Jaccard overlap of two
  score vectors (per unit, per component or per layer);
* :func:`adaptive_coreset`: grow a coreset geometrically until its fidelity to a reference result
  reaches a target.

Everything is plain torch on the device of the tensors given. Selection is deterministic given the
seed. The greedy selectors (k-center, herding) produce *nested* selections: the first ``k`` positions
of a size-``m`` selection are the size-``k`` selection (``balance=False``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "SELECTORS",
    "UNCERTAINTY_MEASURES",
    "AdaptiveResult",
    "adaptive_coreset",
    "average_ranks",
    "balanced_quotas",
    "fidelity",
    "herding",
    "kcenter_greedy",
    "resolve_size",
    "select_coreset",
    "spearman",
    "top_k_jaccard",
    "uncertainty_scores",
]

SELECTORS = ("random", "kcenter", "uncertainty", "herding")
UNCERTAINTY_MEASURES = ("entropy", "margin", "least_confidence")

_NEEDS = {"random": None, "kcenter": "features", "herding": "features", "uncertainty": "logits"}


# --------------------------------------------------------------------------------------------- sizes
def resolve_size(n_total: int, probe_size: int | float) -> int:
    """Number of samples a probe size stands for.

    A float in ``(0, 1]`` is a fraction of ``n_total`` (rounded, at least 1); an int is a count in
    ``[1, n_total]``. ``1.0`` means the whole set, ``1`` one sample.
    """
    if isinstance(n_total, bool) or not isinstance(n_total, numbers.Integral):
        raise TypeError(f"n_total must be an int, got {type(n_total).__name__}")
    if n_total <= 0:
        raise ValueError(f"the dataset is empty (n_total={n_total}); a coreset needs at least one sample")
    if isinstance(probe_size, bool) or not isinstance(probe_size, numbers.Real):
        raise TypeError(
            f"probe_size must be an int (a count) or a float in (0, 1] (a fraction), got {probe_size!r}"
        )
    if isinstance(probe_size, numbers.Integral):
        if not 1 <= probe_size <= n_total:
            raise ValueError(
                f"probe_size={int(probe_size)} samples is outside [1, {n_total}] (the dataset has {n_total});"
                " pass a count in that range or a float fraction in (0, 1]"
            )
        return int(probe_size)
    fraction = float(probe_size)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"probe_size={fraction} as a fraction must lie in (0, 1]; pass an int for a count")
    return max(1, min(n_total, round(fraction * n_total)))


# ----------------------------------------------------------------------------------------- selectors
def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a greedy loop of many small ops on one CPU thread (restored after).

    Each greedy step is a handful of small or memory-bound ops; on a busy CPU every multi-threaded op
    waits for its sibling threads to be scheduled. Measured on 2 shared cores (docs/coreset.md):
    k-center 1000 of 10k x 512 took 0.2-0.75 s on one thread and 13-21 s on two.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kcenter_greedy(features: Tensor, size: int, *, seed: int = 0, block: int = 64, candidates: int = 64) -> Tensor:
    """Greedy k-center (Sener & Savarese 2018, Alg. 1): ``u = argmax_{i not in S} min_{j in S} ||x_i - x_j||``.

    The first center is drawn with ``seed``. Exact, but *lazy*: new centers are queued and the
    distances of all N rows to them are computed ``block`` centers at a time (one matrix product
    instead of one matrix-vector product per center, ~10x faster on CPU). Between two updates only
    the ``candidates`` rows with the largest (stale, hence upper-bound) min-distance are brought up
    to date; the best of them is the true argmax when it is not below the next stale bound,
    otherwise the queue is flushed first. Cost O(size * N * D) flops, O(N * block) memory; on CPU the
    loop runs on one thread (see :func:`_one_cpu_thread`). Returns the positions in selection order.
    """
    with _one_cpu_thread(features.device):
        return _kcenter_loop(features, size, seed, block, candidates)


def _kcenter_loop(features: Tensor, size: int, seed: int, block: int, candidates: int) -> Tensor:
    n = features.shape[0]
    x = _as_float(features)
    sq = (x * x).sum(1)
    order = torch.empty(size, dtype=torch.long, device=x.device)
    first = int(torch.randint(n, (1,), generator=_generator(seed)))
    order[0] = first
    min_sq = (sq + sq[first] - 2.0 * (x @ x[first])).clamp_min_(0.0)
    min_sq[first] = -math.inf  # selected rows never win the argmax again (even among duplicates)
    block = max(1, min(block, size))
    centers = x[first].expand(block, -1).clone()  # padding slots repeat a flushed center: harmless
    center_sq = sq[first].expand(block).clone()
    queued = 0
    m = min(candidates, n - 1)

    def sq_dist_to_queue(rows: Tensor | None) -> Tensor:
        # index_select, not x[rows]: advanced indexing goes multi-threaded and stalls on a busy CPU
        xr, sqr = (x, sq) if rows is None else (x.index_select(0, rows), sq.index_select(0, rows))
        # ||x||^2 is constant per row, so it is added after the min over the queued centers
        return torch.addmm(center_sq, xr, centers.T, alpha=-2.0).amin(1).add_(sqr).clamp_min_(0.0)

    def flush() -> None:
        nonlocal queued
        torch.minimum(min_sq, sq_dist_to_queue(None), out=min_sq)
        centers.copy_(centers[queued - 1].expand_as(centers))
        center_sq.fill_(float(center_sq[queued - 1]))
        queued = 0

    for t in range(1, size):
        if queued:
            bounds, rows = min_sq.topk(m + 1)
            exact = torch.minimum(bounds[:m], sq_dist_to_queue(rows[:m]))
            min_sq[rows[:m]] = exact
            best = int(exact.argmax())
            if exact[best] >= bounds[m]:
                pick = int(rows[best])
            else:
                flush()
                pick = int(min_sq.argmax())
        else:
            pick = int(min_sq.argmax())
        order[t] = pick
        min_sq[pick] = -math.inf
        centers[queued] = x[pick]
        center_sq[queued] = sq[pick]
        queued += 1
        if queued == block:
            flush()
    return order


def herding(features: Tensor, size: int) -> Tensor:
    """Greedy herding (Welling 2009; Chen, Welling & Smola 2010, linear kernel).

    ``x_{t+1} = argmin_{x not in S} || mu - (sum_{s<=t} x_s + x) / (t + 1) ||`` with ``mu`` the mean
    feature: the running mean of the selection tracks the full mean as closely as possible.
    Expanding the norm, the argmin is over ``||x||^2 - 2 x . ((t+1) mu - sum_{s<=t} x_s)``: one
    matrix-vector product per pick, O(size * N * D) flops (memory-bound: one pass over the features per
    pick; on CPU on one thread, which is as fast as two). Returns positions in selection order.
    """
    with _one_cpu_thread(features.device):
        return _herding_loop(features, size)


def _herding_loop(features: Tensor, size: int) -> Tensor:
    x = _as_float(features)
    mu = x.mean(0)
    sq = (x * x).sum(1)
    order = torch.empty(size, dtype=torch.long, device=x.device)
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    running = torch.zeros_like(mu)
    for t in range(size):
        target = (t + 1) * mu - running
        cost = torch.addmv(sq, x, target, alpha=-2.0).masked_fill_(taken, math.inf)
        pick = int(cost.argmin())
        order[t] = pick
        taken[pick] = True
        running += x[pick]
    return order


def uncertainty_scores(logits: Tensor, measure: str = "entropy") -> Tensor:
    """Per-sample uncertainty of the predictions, higher = more uncertain.

    The three classic active-learning scores (Settles 2009, Sec. 3.1), as used for data selection by
    Coleman et al. 2020 ("Selection via Proxy") and DeepCore (Guo et al. 2022):

    ``entropy``: ``-sum_c p_c log p_c``; ``margin``: ``1 - (p_(1) - p_(2))`` (top-two gap);
    ``least_confidence``: ``1 - max_c p_c``. ``p = softmax(logits)``.
    """
    if measure not in UNCERTAINTY_MEASURES:
        raise ValueError(f"unknown uncertainty measure {measure!r}; choose one of {UNCERTAINTY_MEASURES}")
    log_p = torch.log_softmax(_as_float(logits), dim=1)
    p = log_p.exp()
    if measure == "entropy":
        return torch.special.entr(p).sum(1)  # -p log p, 0 where p = 0 (a masked class, logit -inf)
    if measure == "least_confidence":
        return 1.0 - p.max(1).values
    if p.shape[1] < 2:
        raise ValueError("the margin measure needs at least two classes (logits has one column)")
    top2 = p.topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def _most_uncertain(logits: Tensor, size: int, measure: str, seed: int) -> Tensor:
    # A seeded shuffle first, so that ties (e.g. saturated softmax) are not broken by dataset order.
    shuffle = torch.randperm(logits.shape[0], generator=_generator(seed)).to(logits.device)
    scores = uncertainty_scores(logits[shuffle], measure)
    return shuffle[torch.argsort(scores, descending=True, stable=True)[:size]]


def _select_unbalanced(selector, size, features, logits, n, seed, uncertainty, device) -> Tensor:
    if selector == "random":
        return torch.randperm(n, generator=_generator(seed))[:size].to(device)
    if selector == "kcenter":
        return kcenter_greedy(features, size, seed=seed)
    if selector == "herding":
        return herding(features, size)
    return _most_uncertain(logits, size, uncertainty, seed)


def balanced_quotas(counts: Tensor, size: int) -> Tensor:
    """Split ``size`` over classes as evenly as their counts allow (water filling, smallest class first)."""
    quotas = torch.zeros_like(counts)
    remaining = size
    order = torch.argsort(counts, stable=True).tolist()
    for done, c in enumerate(order):
        share = min(int(counts[c]), -(-remaining // (len(order) - done)))  # ceil of the fair share
        quotas[c] = share
        remaining -= share
    return quotas


def _select_balanced(selector, size, features, logits, labels, seed, uncertainty) -> Tensor:
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if size < len(classes):
        raise ValueError(
            f"size={size} cannot hold one sample of each of the {len(classes)} classes with balance=True;"
            f" use size >= {len(classes)} or balance=False"
        )
    quotas = balanced_quotas(counts.cpu(), size).tolist()
    picks, keys = [], []
    for c, quota in enumerate(quotas):
        members = torch.nonzero(inverse == c).squeeze(1)
        local = _select_unbalanced(
            selector, quota,
            None if features is None else features[members.to(features.device)],
            None if logits is None else logits[members.to(logits.device)],
            len(members), seed + c, uncertainty, labels.device,
        )
        picks.append(members[local.to(members.device)])
        # interleave the classes so that any prefix of the selection stays roughly balanced
        keys.append((torch.arange(quota, device=members.device, dtype=torch.float64) + 0.5) / quota)
    picks, keys = torch.cat(picks), torch.cat(keys)
    return picks[torch.argsort(keys, stable=True)]


def _rows(name: str, t: Tensor | None, ndim: int) -> int | None:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D ({'[N]' if ndim == 1 else '[N, D]'}), got shape {tuple(t.shape)}")
    return t.shape[0]


def select_coreset(
    selector: str,
    size: int,
    *,
    features: Tensor | None = None,
    logits: Tensor | None = None,
    labels: Tensor | None = None,
    balance: bool = False,
    seed: int = 0,
    uncertainty: str = "entropy",
    n_total: int | None = None,
) -> Tensor:
    """Positions (into the rows given) of a coreset of ``size`` rows, in selection order.

    Args:
        selector: one of :data:`SELECTORS`. ``random`` needs nothing but a row count (from any tensor
            given, or ``n_total``); ``kcenter`` and ``herding`` need ``features``; ``uncertainty`` needs
            ``logits``.
        size: number of rows to select (see :func:`resolve_size` to turn a fraction into a size).
        features: penultimate-layer features ``[N, D]`` (the input of the output head).
        logits: model outputs ``[N, C]``.
        labels: class labels ``[N]``; needed with ``balance=True``.
        balance: select per class, with quotas as equal as the class counts allow.
        seed: seeds the random selector, k-center's first center and tie-breaking.
        uncertainty: ``entropy`` | ``margin`` | ``least_confidence`` (only for ``uncertainty``).
        n_total: row count for ``random`` when no tensor is given.

    Returns:
        LongTensor ``[size]`` of distinct positions, on the device of the tensors given.
    """
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose one of {SELECTORS}")
    need = _NEEDS[selector]
    if need == "features" and features is None:
        raise ValueError(f"selector {selector!r} needs features=[N, D] (penultimate-layer features)")
    if need == "logits" and logits is None:
        raise ValueError("selector 'uncertainty' needs logits=[N, C] (the model's outputs)")
    if balance and labels is None:
        raise ValueError("balance=True needs labels=[N]")
    counts = {
        k: v
        for k, v in (
            ("features", _rows("features", features, 2)),
            ("logits", _rows("logits", logits, 2)),
            ("labels", _rows("labels", labels, 1)),
            ("n_total", n_total),
        )
        if v is not None
    }
    if not counts:
        raise ValueError("cannot tell the dataset size: pass n_total or any of features/logits/labels")
    if len(set(counts.values())) > 1:
        raise ValueError(f"row counts disagree: {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise ValueError("the dataset is empty; a coreset needs at least one sample")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 1 <= size <= n:
        raise ValueError(f"size={size!r} must be an int in [1, {n}] (the dataset has {n} rows)")
    if selector == "uncertainty" and uncertainty not in UNCERTAINTY_MEASURES:
        raise ValueError(f"unknown uncertainty measure {uncertainty!r}; choose one of {UNCERTAINTY_MEASURES}")
    size = int(size)
    if not balance:
        device = next((t.device for t in (features, logits, labels) if t is not None), torch.device("cpu"))
        return _select_unbalanced(selector, size, features, logits, n, seed, uncertainty, device)
    n_classes = len(torch.unique(labels))
    if logits is not None:
        n_classes = max(n_classes, logits.shape[1])
    if n < n_classes:
        raise ValueError(
            f"balance=True needs at least one sample per class: the dataset has {n} samples"
            f" for {n_classes} classes; use balance=False"
        )
    return _select_balanced(selector, size, features, logits, labels, seed, uncertainty)


# ------------------------------------------------------------------------------------------ fidelity
def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, ties given the average of the ranks they span (float64)."""
    values, order = torch.sort(x, stable=True)
    _, group, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    group_rank = counts.cumsum(0).double() - (counts.double() - 1.0) / 2.0  # mean of start..end
    ranks = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    ranks[order] = group_rank[group]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rho: Pearson correlation of the average ranks. NaN (with a warning) if either is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if float(denom) == 0.0:
        warnings.warn("Spearman correlation is undefined for a constant score vector; returning nan", stacklevel=3)
        return math.nan
    return float((ra * rb).sum() / denom)


def top_k_jaccard(a: Tensor, b: Tensor, k: int) -> float:
    """``|A ∩ B| / |A ∪ B|`` for A, B the positions of the ``k`` largest scores (ties broken by position)."""
    in_a = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    in_b = torch.zeros_like(in_a)
    in_a[torch.argsort(a, descending=True, stable=True)[:k]] = True  # topk's order among ties is unspecified
    in_b[torch.argsort(b.to(a.device), descending=True, stable=True)[:k]] = True
    return float((in_a & in_b).sum()) / float((in_a | in_b).sum())


def _fidelity_one(a: Tensor, b: Tensor, top_k: int | None, what: str) -> dict[str, float]:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"fidelity expects torch.Tensor scores{what}, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(
            f"score shapes differ{what}: full {tuple(a.shape)} vs subset {tuple(b.shape)};"
            " both must score the same units in the same order"
        )
    a = a.detach().reshape(-1).double()
    b = b.detach().reshape(-1).double().to(a.device)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"fidelity needs at least 2 scores to rank{what}, got {n}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError(f"scores contain NaN or inf{what}; fidelity is only defined on finite scores")
    k = max(1, math.ceil(0.1 * n)) if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"top_k={top_k!r} must be an int in [1, {n}] (the number of scores{what})")
    return {"spearman": spearman(a, b), "jaccard_top_k": top_k_jaccard(a, b, int(k)), "top_k": int(k)}


def fidelity(
    full_scores: Tensor | Mapping[str, Tensor],
    subset_scores: Tensor | Mapping[str, Tensor],
    top_k: int | None = None,
) -> dict[str, float]:
    """How closely an interpretation computed on a coreset matches the one computed on the full set.

    Both are score tensors of the same shape (per unit, per component, per layer ...), flattened.
    Returns ``{"spearman": rho, "jaccard_top_k": J, "top_k": k}``: Spearman's rank correlation with
    average ranks for ties, and the Jaccard overlap of the ``k`` highest-scoring entries. The default
    ``k`` is 10% of the entries (at least 1). Larger scores count as "top": negate scores where
    smaller means more important.

    Per-layer results (``{layer: Tensor}``, same keys on both sides) are compared layer by layer and
    the two numbers averaged over layers (``top_k`` is then the summed k): concatenating layers of
    different scales would let the between-layer differences inflate the rank correlation.
    """
    if isinstance(full_scores, Mapping) or isinstance(subset_scores, Mapping):
        if not (isinstance(full_scores, Mapping) and isinstance(subset_scores, Mapping)):
            raise TypeError("pass two tensors or two {name: tensor} mappings, not one of each")
        if set(full_scores) != set(subset_scores) or not full_scores:
            raise ValueError(
                f"the mappings must hold the same non-empty keys: full has {sorted(full_scores)},"
                f" subset has {sorted(subset_scores)}"
            )
        each = [_fidelity_one(full_scores[k], subset_scores[k], top_k, f" for {k!r}") for k in full_scores]
        return {
            "spearman": sum(f["spearman"] for f in each) / len(each),
            "jaccard_top_k": sum(f["jaccard_top_k"] for f in each) / len(each),
            "top_k": sum(f["top_k"] for f in each),
        }
    return _fidelity_one(full_scores, subset_scores, top_k, "")


# ------------------------------------------------------------------------------------------ adaptive
@dataclass
class AdaptiveResult:
    """Outcome of :func:`adaptive_coreset`.

    Attributes:
        positions: the chosen coreset (positions in selection order).
        size: its size.
        fidelity: :func:`fidelity` of its scores to the reference.
        trace: ``(size, spearman)`` for every size tried, in order.
        reference_size: number of rows the reference scores were computed on.
        reached: whether ``fidelity["spearman"] >= target``.
    """

    positions: Tensor
    size: int
    fidelity: dict[str, float]
    trace: list[tuple[int, float]] = field(default_factory=list)
    reference_size: int = 0
    reached: bool = False


def adaptive_coreset(
    score_fn: Callable[[Tensor], Tensor | Mapping[str, Tensor]],
    n_total: int,
    selector: str,
    *,
    start_fraction: float = 0.05,
    growth: float = 2.0,
    target: float = 0.9,
    reference_fraction: float = 1.0,
    features: Tensor | None = None,
    logits: Tensor | None = None,
    labels: Tensor | None = None,
    balance: bool = False,
    seed: int = 0,
    uncertainty: str = "entropy",
    top_k: int | None = None,
) -> AdaptiveResult:
    """Smallest coreset (on a geometric grid) whose interpretation matches a reference.

    ``score_fn(positions)`` computes the interpretation result (a score tensor, or ``{layer: scores}``
    compared layer by layer, see :func:`fidelity`) on the rows at ``positions``. The reference is computed
    once, on all rows (``reference_fraction=1.0``) or on a seeded uniform sample of ``reference_fraction`` of
    them. Starting at ``start_fraction`` of
    ``n_total``, the coreset grows by ``growth`` until ``fidelity(reference, scores)["spearman"] >=
    target`` or it holds every row; a warning says when the target was never reached. Cost: one
    ``score_fn`` call on the reference plus one per size tried (sizes sum to < growth/(growth-1)
    times the final size).
    """
    if not callable(score_fn):
        raise TypeError("score_fn must be callable: positions (LongTensor) -> scores (Tensor)")
    if not growth > 1.0:
        raise ValueError(f"growth={growth} must be > 1 for the coreset to grow")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target={target} must lie in (0, 1] (a Spearman correlation)")
    size = resolve_size(n_total, float(start_fraction))
    if balance and labels is not None:  # a balanced coreset holds at least one sample of every class
        size = min(n_total, max(size, len(torch.unique(labels))))
    reference_size = resolve_size(n_total, float(reference_fraction))
    if reference_size == n_total:
        reference_positions = torch.arange(n_total)
    else:
        reference_positions = torch.randperm(n_total, generator=_generator(seed))[:reference_size].sort().values
    reference = score_fn(reference_positions)
    trace: list[tuple[int, float]] = []
    while True:
        positions = select_coreset(
            selector, size, features=features, logits=logits, labels=labels, balance=balance,
            seed=seed, uncertainty=uncertainty, n_total=n_total,
        )
        fid = fidelity(reference, score_fn(positions), top_k)
        trace.append((size, fid["spearman"]))
        reached = fid["spearman"] >= target
        if reached or size == n_total:
            break
        size = min(n_total, math.ceil(size * growth))
    if not reached:
        warnings.warn(
            f"adaptive_coreset: Spearman {fid['spearman']:.3f} < target {target} even at {size}/{n_total} rows"
            f" (selector {selector!r}); the result is not stable under subsampling",
            stacklevel=2,
        )
    return AdaptiveResult(positions, size, fid, trace, reference_size, reached)
