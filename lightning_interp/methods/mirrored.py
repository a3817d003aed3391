"""Mirrored influence (Forward-INF): mislabeled and leaked training samples from forward passes.

Ko, Kang, Shi, Jin, Yu, Jia, "The Mirrored Influence Hypothesis: Efficient Data Influence Estimation
by Harnessing Forward Passes", CVPR 2024 (arXiv 2402.08922).

The influence of a training point z_i on a query z_q (train→test) correlates with the *mirrored*
quantity (test→train): how much the loss on z_i changes when the model takes a few update steps on
z_q. With θ the trained parameters and θ'_q = θ ± η·u(∇_θ ℓ(z_q; θ)) after ``steps`` updates
(u: plain gradient for SGD, the Adam direction for Adam),

    I_mirror(z_q → z_i) = ℓ(z_i; θ'_q) − ℓ(z_i; θ)                                    (paper, Eq. 4)

which needs one small update on the query side and then only forward passes over the training set.

Two uses are implemented:

* :func:`mislabel_scores` — the group form on a *trusted* set T (e.g. the validation set): descend on
  T, score every training point by the increase of its loss, ``ℓ(z_i; θ'_T) − ℓ(z_i; θ)``. Points
  whose label conflicts with clean data get worse when the model moves towards the clean data.
* :func:`leak_scores` — the per-query form: which training point does each query influence most (its
  copy, when the query leaked into training)? ``rule="reference"`` follows the authors' leakage code (one
  Adam *ascent* step on the query, ``|ℓ(z_i; θ'_q) − ℓ(z_i; θ)|``; in eval mode on one copy of the query,
  where the notebook steps in train mode on two, see docs/mirrored.md); ``rule="relative"`` (default,
  measured far better on digits, docs/mirrored.md) is the first-order mirrored influence of a head step
  on a tempered loss, normalised by self-influence, computed in closed form from forward passes, and for
  images maximised over small translations of the query.

Everything runs on a cloned parameter/buffer dict through :func:`torch.func.functional_call` with
the model in eval mode; the model, its buffers and its train/eval flags are left as they were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from ..probe import ProbeData, evaluation_mode, model_device, run_probe

Optimizer = Literal["sgd", "adam"]
OPTIMIZERS = ("sgd", "adam")
Batches = Iterable[tuple[Tensor, Tensor]]
Params = dict[str, Tensor]

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UpdateRule:
    """``steps`` updates of ``optimizer`` at learning rate ``lr`` on a copy of the parameters."""

    steps: int
    lr: float
    optimizer: Optimizer

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


# Defaults measured on digits (benchmarks/mirrored.py, docs/mirrored.md): see the docs for the sweep.
MISLABEL_RULE = UpdateRule(steps=5, lr=3e-3, optimizer="adam")
LEAK_RULE = UpdateRule(steps=1, lr=5e-3, optimizer="adam")  # the reference code's choice


# --------------------------------------------------------------------------------------------------
# Functional model copies
# --------------------------------------------------------------------------------------------------
def parameter_copy(model: nn.Module) -> tuple[Params, Params]:
    """Detached clones of the model's parameters and buffers (the "copy of the model")."""
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return params, buffers


def split_trainable(model: nn.Module, params: Params) -> tuple[Params, Params]:
    """``params`` split into (trainable, frozen) by the model's ``requires_grad`` flags: updates and gradients
    act on the parameters training moves, so a frozen backbone stays where fine-tuning keeps it."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return ({n: p for n, p in params.items() if n in trainable},
            {n: p for n, p in params.items() if n not in trainable})


def logits_of(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> Tensor:
    """Class logits ``[N, C]`` of the functional model; a clear error for anything else."""
    out = functional_call(model, (params, buffers), (x,))
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            "mirrored influence needs a classifier whose forward returns class logits of shape "
            f"[batch, classes >= 2]; the model returned {shape}"
        )
    return out


def per_sample_loss(model: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of every sample, ``ℓ(z; θ)`` with θ = ``params``."""
    return F.cross_entropy(logits_of(model, params, buffers, x), y.long(), reduction="none")


def check_class_labels(y: Tensor | None, what: str) -> None:
    """Mirrored influence is defined through a classification loss: integer class labels only."""
    if y is None:
        raise ValueError(f"{what} has no labels; mirrored influence needs integer class labels")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(
            f"{what} labels must be a 1-D tensor of integer class indices (classification); got "
            f"dtype {y.dtype} and shape {tuple(y.shape)}. Regression targets, multi-label targets and float 0/1 "
            "targets of a one-logit (BCE) model are not supported: the model must output one logit per class"
        )


def tensor_batches(x: Tensor, y: Tensor, batch_size: int = 512) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` chunks of two aligned tensors, the batches the scoring functions consume."""
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


# --------------------------------------------------------------------------------------------------
# Update rules on parameter dicts (work unchanged under vmap, with a leading query dimension)
# --------------------------------------------------------------------------------------------------
def _initial_state(params: Params, optimizer: Optimizer) -> dict[str, tuple[Tensor, Tensor]]:
    if optimizer == "sgd":
        return {}
    return {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in params.items()}


def _step(params: Params, grads: Params, state: dict, step: int, rule: UpdateRule, sign: float):
    """One SGD or Adam update (``sign`` −1 descends, +1 ascends) of every parameter in ``params``; returns
    (params, state)."""
    if rule.optimizer == "sgd":
        return {n: p + sign * rule.lr * grads[n] for n, p in params.items()}, state
    beta1, beta2 = _ADAM_BETAS
    new_params, new_state = {}, {}
    for name, p in params.items():
        m, v = state[name]
        m = beta1 * m + (1 - beta1) * grads[name]
        v = beta2 * v + (1 - beta2) * grads[name] ** 2
        m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
        new_params[name] = p + sign * rule.lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
        new_state[name] = (m, v)
    return new_params, new_state


def _mean_loss_gradient(model, params: Params, frozen: Params, buffers: Params, x: Tensor, y: Tensor,
                        chunk: int) -> Params:
    """∇ of the mean cross-entropy over (x, y) with respect to ``params`` (``frozen`` held fixed), accumulated
    over chunks to bound memory."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for xb, yb in tensor_batches(x, y, chunk):
        loss = per_sample_loss(model, {**frozen, **leaves}, buffers, xb, yb).sum() / len(x)
        for name, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)):
            if g is not None:
                total[name] += g
    return total


def trained_copy(model: nn.Module, x: Tensor, y: Tensor, rule: UpdateRule, *, ascent: bool = False,
                 chunk: int = 1024) -> tuple[Params, Params, Params]:
    """Full-batch ``rule`` updates on (x, y) applied to a copy: returns (θ, θ', buffers). Parameters with
    ``requires_grad=False`` are not updated (θ' keeps them)."""
    params, buffers = parameter_copy(model)
    updated, frozen = split_trainable(model, params)
    state = _initial_state(updated, rule.optimizer)
    with evaluation_mode(model, grad=None):
        for step in range(1, rule.steps + 1):
            grads = _mean_loss_gradient(model, updated, frozen, buffers, x, y, chunk)
            updated, state = _step(updated, grads, state, step, rule, 1.0 if ascent else -1.0)
    return params, {**frozen, **{n: p.detach() for n, p in updated.items()}}, buffers


# --------------------------------------------------------------------------------------------------
# Mislabeled samples: trusted set → every training point
# --------------------------------------------------------------------------------------------------
class MislabelPass(NamedTuple):
    """Per-training-sample results of one :func:`mislabel_scores` call, in batch order."""

    scores: Tensor      # ℓ(z_i; θ'_T) − ℓ(z_i; θ): larger = more likely mislabeled
    loss: Tensor        # ℓ(z_i; θ), the model's current loss
    predicted: Tensor   # argmax class of the current model
    labels: Tensor      # the given labels


@torch.no_grad()
def _score_batches(model, params, updated, buffers, batches: Batches, device) -> MislabelPass:
    parts: list[tuple[Tensor, ...]] = []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        check_class_labels(y, "the training data")
        logits = logits_of(model, params, buffers, x)
        before = F.cross_entropy(logits, y.long(), reduction="none")
        after = per_sample_loss(model, updated, buffers, x, y)
        parts.append((after - before, before, logits.argmax(1), y))
    if not parts:
        raise ValueError("the training data is empty: nothing to score")
    return MislabelPass(*(torch.cat(column).cpu() for column in zip(*parts)))


def mislabel_scores(model: nn.Module, trusted_x: Tensor, trusted_y: Tensor, train_batches: Batches, *,
                    steps: int = MISLABEL_RULE.steps, lr: float = MISLABEL_RULE.lr,
                    optimizer: Optimizer = MISLABEL_RULE.optimizer, chunk: int = 1024) -> MislabelPass:
    """Mirrored influence of a trusted set on every training point (group form of Eq. 4).

    θ'_T = ``steps`` full-batch descent steps of ``optimizer`` (lr ``lr``) on the mean cross-entropy
    of the trusted set T, taken on a copy; the score of training point z_i is
    ``ℓ(z_i; θ'_T) − ℓ(z_i; θ)`` — positive when learning the clean data makes z_i's label less
    likely. Cost: ``steps`` forward+backward passes over T, two forward passes over the training set.

    ``train_batches`` yields ``(x, y)`` batches (any device); results are on CPU in that order.
    """
    check_class_labels(trusted_y, "the trusted set")
    if len(trusted_x) == 0:
        raise ValueError("the trusted set is empty")
    rule = UpdateRule(steps, lr, optimizer)
    device = model_device(model)
    params, updated, buffers = trained_copy(model, trusted_x.to(device), trusted_y.to(device), rule,
                                            chunk=chunk)
    with evaluation_mode(model, grad=None):
        return _score_batches(model, params, updated, buffers, train_batches, device)


# --------------------------------------------------------------------------------------------------
# Leaked samples: every query → every training point
# --------------------------------------------------------------------------------------------------
class LeakResult(NamedTuple):
    """Per-query results of the leak search (positions index the training rows given)."""

    train_index: Tensor  # [Q] the most influenced training point
    top_k: Tensor        # [Q, k] the k most influenced training points, best first
    score: Tensor        # [Q] leak score (higher = more likely a copy of a training point)
    influence: Tensor    # [Q, k] influence of the top_k points
    radius: Tensor       # [Q] L2 radius the query was moved on (0 = used as is; reference rule only)


# ---- the cheap rule: relative mirrored influence of a head step, from one forward pass -------------------
#: Temperature of the loss whose head gradient the relative rule compares (see :func:`head_gradient_directions`).
LEAK_TEMPERATURE = 10.0


def head_gradient_directions(logits: Tensor, features: Tensor, y: Tensor,
                             temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Unit factors of the head's gradient of the tempered log-loss ``ℓ_T = CE(softmax(logits / T), y)``.

    ``∇_{W,b} ℓ_T = (1/T) r_T ⊗ [f, 1]`` with ``r_T = softmax(logits / T) − onehot(y)``, formed from the
    non-target probabilities (``r_y = −Σ_{c≠y} p_c``) so it keeps its direction where ``p_y`` rounds to 1.
    A model that memorises its training set fits most points to a loss of ~0, where the direction of
    ``r_1`` is set by tiny runner-up probabilities that a little input noise reshuffles; at ``T ≈ 10`` the
    gradient leaves that saturated regime (the job the reference code's L2-sphere perturbation does).
    ``T = inf`` keeps only the label: ``r = 1/C − onehot(y)``.
    """
    if temperature == float("inf"):
        logits, temperature = torch.zeros_like(logits, dtype=torch.float32), 1.0
    probs = (logits.float() / temperature).log_softmax(-1).exp()
    other = probs.scatter(-1, y[..., None], 0.0)
    residual = other.scatter(-1, y[..., None], -other.sum(-1, keepdim=True))
    flat = features.float().flatten(-1) if features.dim() <= 2 else features.float().flatten(features.dim() - 1)
    augmented = torch.cat([flat, flat.new_ones(*flat.shape[:-1], 1)], dim=-1)
    return F.normalize(residual, dim=-1), F.normalize(augmented, dim=-1)


def translation_orbit(x: Tensor, radius: int) -> Tensor:
    """``[(2r+1)^2, N, C, H, W]``: every integer translation ``|dy|, |dx| <= radius`` of images ``x``, zero-filled.

    The identity is the middle element, ``orbit[len(orbit) // 2]``. Images are ``[N, C, H, W]`` (channels
    first, as torch's convolutions take them).
    """
    if x.dim() != 4:
        raise ValueError(f"translations need images [N, C, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if not 0 <= radius < min(h, w):
        raise ValueError(f"shift radius must be in [0, {min(h, w)}) for {h}x{w} images, got {radius}")
    shifted = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
            shifted.append(padded[..., max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w])
    return torch.stack(shifted)


def relative_head_influence(query_logits: Tensor, query_features: Tensor, query_y: Tensor, train_logits: Tensor,
                            train_features: Tensor, train_y: Tensor, *, top_k: int = 5, chunk: int = 256,
                            temperature: float = LEAK_TEMPERATURE) -> tuple[Tensor, Tensor]:
    """Each query's ``top_k`` training points by relative mirrored influence of a head step.

    A plain gradient-ascent step of size η on the query's loss, applied to the classifier head, moves
    training point i's loss by ``η ⟨g_i, g_q⟩`` to first order (Eq. 4 with the head's gradients
    ``g = r_T ⊗ [f, 1]`` of the tempered loss, :func:`head_gradient_directions`). Dividing by the two
    self-influences ``‖g_i‖ ‖g_q‖`` (the relative influence of Barshan et al., AISTATS 2020) removes the
    pull of training points that move for any query:

        I_rel(q, i) = max_{t ∈ G} cos(r_T(t z_q), r_T(z_i)) · cos([f(t z_q), 1], [f_i, 1])   ∈ [−1, 1]

    1 for an exact copy of some ``t z_q``. ``G`` is given by the leading axis of ``query_logits [G, Q, C]``
    and ``query_features [G, Q, F]`` (the outputs of transformed copies of each query, e.g.
    :func:`translation_orbit`); ``[Q, C]`` / ``[Q, F]`` means ``G = {identity}``.
    Needs only logits and penultimate features; memory ``[chunk, N]`` per step.
    """
    if query_logits.dim() == 2:
        query_logits, query_features = query_logits[None], query_features.flatten(1)[None]
    g, q = query_logits.shape[:2]
    rq, fq = head_gradient_directions(query_logits, query_features.reshape(g, q, -1), query_y.expand(g, q),
                                      temperature)
    rt, ft = head_gradient_directions(train_logits, train_features.flatten(1), train_y, temperature)
    return top_relative_influence(rq, fq, rt, ft, top_k=top_k, chunk=chunk)


def top_relative_influence(rq: Tensor, fq: Tensor, rt: Tensor, ft: Tensor, *, top_k: int,
                           chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Top-k of ``max_g (rq[g] @ rt.T) * (fq[g] @ ft.T)`` per query, from unit gradient factors
    (:func:`head_gradient_directions`): queries ``[G, Q, ·]``, training points ``[N, ·]``. The maximum over
    ``G`` is kept running, so memory stays ``[chunk, N]``."""
    top_k = min(top_k, len(rt))
    values, indices = [], []
    for start in range(0, rq.shape[1], chunk):
        rows = slice(start, start + chunk)
        influence = None
        for r_view, f_view in zip(rq[:, rows], fq[:, rows]):
            view = (r_view @ rt.T) * (f_view @ ft.T)
            influence = view if influence is None else torch.maximum(influence, view)
        best = influence.topk(top_k, dim=1)
        values.append(best.values)
        indices.append(best.indices)
    return torch.cat(values), torch.cat(indices)


@torch.no_grad()
def logits_and_head_inputs(model: nn.Module, x: Tensor, *, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Logits and penultimate features (the input of the output head, as the callback reads them) of ``x``, on
    CPU: one :func:`~lightning_interp.probe.run_probe` pass (eval mode, no grad, modes and RNG restored)."""
    outs = run_probe(model, ProbeData(TensorDataset(x), batch_size=chunk), features=True)
    return outs.outputs, outs.features


# ---- the reference rule: full-model ascent per query, |Δloss| (after the authors' leakage code) ---------
def sphere_perturb_fit_queries(model: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor,
                               *, fit_threshold: float = 1e-2, radius: float = 3.0, growth: float = 1.1,
                               max_tries: int = 100, generator: torch.Generator | None = None,
                               ) -> tuple[Tensor, Tensor]:
    """Move queries the model already fits (loss < ``fit_threshold``) onto an L2 sphere around them.

    The reference procedure: a fit query has a near-zero gradient, so the ascent step would not move the
    model. Draw a point at L2 distance ``radius`` in a random direction; while it is still fit, grow the
    radius ×``growth`` and draw again (at most ``max_tries``). Returns (inputs, radius used; 0 = unchanged).
    """
    x, original = x.clone(), x.clone()
    used = torch.zeros(len(x), device=x.device)
    current = torch.full((len(x),), float(radius), device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    with torch.no_grad():
        pending = per_sample_loss(model, params, buffers, x, y) < fit_threshold
        for _ in range(max_tries):
            if not pending.any():
                break
            rows = pending.nonzero().squeeze(1)
            direction = torch.randn(original[rows].shape, generator=generator).to(x.device)
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            x[rows] = original[rows] + current[rows].view(shape) * direction
            used[rows] = current[rows]
            still_fit = per_sample_loss(model, params, buffers, x[rows], y[rows]) < fit_threshold
            current[rows[still_fit]] *= growth
            pending[rows[~still_fit]] = False
    return x, used


def _per_query_updates(model, params: Params, buffers: Params, xq: Tensor, yq: Tensor, rule: UpdateRule) -> Params:
    """θ'_q for every query at once: ``rule`` ascent steps on each query alone (vmap over queries). Frozen
    parameters (``requires_grad=False``) are shared by all queries and not updated."""
    trainable, frozen = split_trainable(model, params)

    def query_loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, ({**frozen, **p}, buffers), (x[None],)), y[None].long())

    per_query_grad = vmap(grad(query_loss), in_dims=(0, 0, 0))
    updated = {n: p.expand(len(xq), *p.shape) for n, p in trainable.items()}
    state = _initial_state(updated, rule.optimizer)
    for step in range(1, rule.steps + 1):
        updated, state = _step(updated, per_query_grad(updated, xq, yq), state, step, rule, 1.0)
    return {n: p.detach() for n, p in updated.items()}


def leak_scores(model: nn.Module, query_x: Tensor, query_y: Tensor, train_x: Tensor, train_y: Tensor, *,
                rule: Literal["relative", "reference"] = "relative", top_k: int = 5,
                steps: int = LEAK_RULE.steps, lr: float = LEAK_RULE.lr, optimizer: Optimizer = LEAK_RULE.optimizer,
                candidates: int | None = 256, fit_threshold: float = 1e-2, sphere_radius: float = 3.0,
                sphere_growth: float = 1.1, query_chunk: int = 32, seed: int = 0,
                temperature: float = LEAK_TEMPERATURE, shift_radius: int = 1) -> LeakResult:
    """For every query, the training points it influences most: which training point is its copy.

    ``rule="relative"`` (default): :func:`relative_head_influence` of the tempered loss (``temperature``)
    from forward passes only; for image queries ``[N, C, H, W]`` each query is also evaluated translated
    by up to ``shift_radius`` pixels (:func:`translation_orbit`, ``(2r+1)^2`` forward passes per query)
    and its influence on a training point is the best over those translations, so a copy that was shifted
    before it entered training is found (0 turns it off; other inputs are compared as they are). The leak
    score is the top influence (1 for an exact copy).

    ``rule="reference"``: the authors' procedure, Eq. 4 per query (in eval mode on one copy of the query; their
    notebook steps in train mode on two copies, docs/mirrored.md) — ``steps`` *ascent* steps of
    ``optimizer`` (default one Adam step, lr 5e-3) on the query alone, on a copy, then
    ``|ℓ(z_i; θ'_q) − ℓ(z_i; θ)|`` for the training points; a query the model already fits is first moved
    onto an L2 sphere (:func:`sphere_perturb_fit_queries`, radius 3 growing ×1.1). Queries are batched with
    ``vmap`` over per-query parameter copies (``query_chunk`` at a time); with ``candidates=K`` only each
    query's K best points under the relative rule are re-scored by the full model (Q·K forward passes
    instead of Q·N). The leak score is ``log(|Δ|_(1) / |Δ|_(2))``.
    """
    check_class_labels(query_y, "the queries")
    check_class_labels(train_y, "the training data")
    if rule not in ("relative", "reference"):
        raise ValueError(f"rule must be 'relative' or 'reference', got {rule!r}")
    if shift_radius < 0:
        raise ValueError(f"shift_radius must be >= 0, got {shift_radius}")
    if rule == "relative" and shift_radius and query_x.dim() == 4:  # fail before any forward pass
        translation_orbit(query_x[:1], shift_radius)
    t_logits, t_features = logits_and_head_inputs(model, train_x)
    query_y, train_y = query_y.cpu(), train_y.cpu()
    if rule == "relative":
        orbit = translation_orbit(query_x, shift_radius) if shift_radius and query_x.dim() == 4 else query_x[None]
        q_logits, q_features = logits_and_head_inputs(model, orbit.flatten(0, 1))
        g, q = orbit.shape[:2]
        values, index = relative_head_influence(q_logits.view(g, q, -1), q_features.view(g, q, -1), query_y,
                                                t_logits, t_features, train_y, top_k=top_k, temperature=temperature)
        return LeakResult(index[:, 0], index, values[:, 0], values, torch.zeros(len(index)))
    q_logits, q_features = logits_and_head_inputs(model, query_x)
    pool = None
    if candidates is not None and candidates < len(train_x):
        pool = relative_head_influence(q_logits, q_features, query_y, t_logits, t_features, train_y,
                                       top_k=min(max(candidates, top_k, 2), len(train_x)),
                                       temperature=temperature)[1]
    result = _reference_leak_scores(model, query_x, query_y, train_x, train_y, UpdateRule(steps, lr, optimizer),
                                    pool, min(max(top_k, 2), len(train_x)), fit_threshold, sphere_radius,
                                    sphere_growth, query_chunk, seed)  # the score needs the runner-up
    return result._replace(top_k=result.top_k[:, :top_k], influence=result.influence[:, :top_k])


def _reference_leak_scores(model, query_x, query_y, train_x, train_y, rule, pool, top_k, fit_threshold,
                           sphere_radius, sphere_growth, query_chunk, seed) -> LeakResult:
    device = model_device(model)
    query_x, query_y = query_x.to(device), query_y.to(device)
    train_x, train_y = train_x.to(device), train_y.to(device)
    pool = pool.to(device) if pool is not None else None
    generator = torch.Generator().manual_seed(seed)  # never the global RNG
    params, buffers = parameter_copy(model)
    frozen = split_trainable(model, params)[1]
    with evaluation_mode(model, grad=None):
        query_x, radius = sphere_perturb_fit_queries(
            model, params, buffers, query_x, query_y, fit_threshold=fit_threshold, radius=sphere_radius,
            growth=sphere_growth, generator=generator)
        with torch.no_grad():
            loss_before = torch.cat([per_sample_loss(model, params, buffers, xb, yb)
                                     for xb, yb in tensor_batches(train_x, train_y, 1024)])
        values, index = [], []
        for start in range(0, len(query_x), query_chunk):
            rows = slice(start, start + query_chunk)
            updated = _per_query_updates(model, params, buffers, query_x[rows], query_y[rows], rule)
            delta = _loss_change(model, updated, frozen, buffers, train_x, train_y, loss_before,
                                 None if pool is None else pool[rows])
            best = delta.topk(top_k, dim=1)
            values.append(best.values)
            index.append(best.indices if pool is None else pool[rows].gather(1, best.indices))
    values, index = torch.cat(values).cpu(), torch.cat(index).cpu()
    score = torch.log(values[:, 0].clamp_min(1e-30) / values[:, min(1, top_k - 1)].clamp_min(1e-30))
    return LeakResult(index[:, 0], index, score, values, radius.cpu())


@torch.no_grad()
def _loss_change(model, updated: Params, frozen: Params, buffers: Params, train_x, train_y, loss_before,
                 pool) -> Tensor:
    """``|ℓ(z_i; θ'_q) − ℓ(z_i; θ)|`` for every query's model: all training points, or its pooled ones."""

    def losses(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return per_sample_loss(model, {**frozen, **p}, buffers, x, y)

    if pool is None:
        after = torch.cat([vmap(losses, in_dims=(0, None, None))(updated, xb, yb)
                           for xb, yb in tensor_batches(train_x, train_y, 256)], dim=1)
        return (after - loss_before[None]).abs()
    after = vmap(losses, in_dims=(0, 0, 0))(updated, train_x[pool], train_y[pool])
    return (after - loss_before[pool]).abs()


# --------------------------------------------------------------------------------------------------
# Second look: TracIn self-influence
# --------------------------------------------------------------------------------------------------
def self_influence(model: nn.Module, x: Tensor, y: Tensor, *, chunk: int = 64) -> Tensor:
    """TracIn self-influence at the current checkpoint: ``‖∇_θ ℓ(z; θ)‖²`` per sample.

    Pruthi et al. 2020 (TracInCP): summed over checkpoints (times their learning rate) it is the
    gradient-based second look at flagged samples; this is one checkpoint's term, computed with
    per-sample gradients (vmap over ``grad``) in eval mode on a parameter copy. The same quantity
    captum's ``TracInCP.self_influence`` computes over all layers for one checkpoint with lr 1.
    """
    check_class_labels(y, "the samples")
    device = model_device(model)
    params, buffers = parameter_copy(model)
    params, frozen = split_trainable(model, params)

    def sample_loss(p: Params, xs: Tensor, ys: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, ({**frozen, **p}, buffers), (xs[None],)), ys[None].long())

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    norms = []
    with evaluation_mode(model, grad=None):
        for xb, yb in tensor_batches(x.to(device), y.to(device), chunk):
            grads = per_sample_grad(params, xb, yb)
            norms.append(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    return torch.cat(norms).cpu() if norms else torch.zeros(0)
