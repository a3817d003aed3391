"""COAR and COAR-Edit: component attribution (Shah, Ilyas, Madry, "Decomposing and Editing Predictions by
Modeling Model Computation", arXiv 2404.11534, 2024).

A model is split into ``N`` components (conv output channels, Linear neurons, attention heads). A *keep mask*
``v in {0, 1}^N`` ablates the components with ``v_c = 0``. For every example ``z`` COAR fits a linear
surrogate of the correct-class margin under ablation (paper Eq. 1 and Sec. 3)::

    f_z(v) = logit_y(z; v) - max_{k != y} logit_k(z; v)          # margin of the ablated model
    g_z(v) = b_z + w_z^T v                                       # component attribution w_z in R^N

fitted by least squares on masks whose entries are ablated independently with probability ``alpha``.
All examples share the masks, so the fit is one multi-output least-squares problem ``[1, V] W = F``; it is
solved from the normal equations, accumulated mask chunk by mask chunk (memory ``O(N^2 + N n)`` whatever the
number of masks).

Quality is the paper's headline metric: on fresh masks, the Pearson correlation between ``g_z(v)`` and
``f_z(v)`` for each example, averaged over examples. The same measure is computed for two baselines
expressed as linear surrogates on the same masks: leave-one-component-out and gradient x parameter.

COAR-Edit (paper Sec. 5): with target examples ``T`` and reference examples ``R``, each component gets the
Welch t-statistic ``t_c = (mean_T w_c - mean_R w_c) / sqrt(var_T w_c / |T| + var_R w_c / |R|)``; ablating the
most negative ones raises the targets' margins relative to the reference set.

**Ablation** is defined at the component's output: a forward hook multiplies the module's output channel
(conv), feature (Linear) or head output (``nn.MultiheadAttention``, before ``out_proj``) by the keep mask.
That equals zeroing the component's weight *and* bias rows (for a head: the head's columns of ``out_proj``),
which is what :func:`ablated_copy` does. The paper zeroes weights only; for its bias-free ResNet convs the two
agree. Ablating the output keeps the definition meaningful when a BatchNorm follows: the conv's channel is
zero, the BN then adds its shift as it would for any zero input.

Several masks run in one forward pass: the examples are repeated once per mask and each hook reshapes the
batch ``[masks * examples, ...]`` to ``[masks, examples, ...]``. The model is evaluated in eval mode (the
masks' rows must not interact through batch statistics); hooks are always removed, modes and RNG restored.
Conv and Linear modules must take batch-first inputs.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import describe_layers, resolve_head, sequence_first_layers
from ..probe import evaluation_mode, output_tensor

__all__ = [
    "AblationError",
    "ComponentGroup",
    "Components",
    "COAR",
    "EditResult",
    "find_components",
    "silent_modules",
    "ablate",
    "ablated_copy",
    "copy_model",
    "margins",
    "sample_keep_masks",
    "iter_margins",
    "margins_under_masks",
    "NormalEquations",
    "solve_attributions",
    "fit_attributions",
    "leave_one_out_attributions",
    "grad_times_param_attributions",
    "heldout_correlation",
    "welch_t",
    "edit",
]

ComponentKind = Literal["channel", "neuron", "head"]
LAYER_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
    "attention": (nn.MultiheadAttention,),
}
_KIND_OF = {"conv": "channel", "linear": "neuron", "attention": "head"}
DEFAULT_MAX_BATCH = 8192


class AblationError(ValueError):
    """Components cannot be enumerated or ablated as asked (no eligible module, unsupported layout)."""


# ----------------------------------------------------------------------------------------------- components


@dataclass(frozen=True)
class ComponentGroup:
    """The components of one module: columns ``offset : offset + size`` of a keep mask."""

    name: str
    kind: ComponentKind
    size: int
    offset: int

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    def component_names(self) -> list[str]:
        stem = f"{self.name}.head" if self.kind == "head" else self.name
        return [f"{stem}[{i}]" for i in range(self.size)]


@dataclass(frozen=True)
class Components:
    """All components of a model, in module registration order; ``names[i]`` is column ``i`` of a keep mask."""

    groups: tuple[ComponentGroup, ...]

    def __len__(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.component_names()]

    def group_of(self) -> Tensor:
        """For every component, the index of its group (module) — ``[N]`` long."""
        return torch.repeat_interleave(torch.arange(len(self.groups)), torch.tensor([g.size for g in self.groups]))

    def without(self, modules: Sequence[str]) -> Components:
        """The same components minus those of ``modules``, columns renumbered."""
        kept, offset = [], 0
        for g in self.groups:
            if g.name not in modules:
                kept.append(ComponentGroup(g.name, g.kind, g.size, offset))
                offset += g.size
        return Components(tuple(kept))


def silent_modules(model: nn.Module, components: Components, x: Tensor, batch_size: int = 256) -> list[str]:
    """The component modules that no forward pass of ``model`` over the examples ``x`` calls (unused or auxiliary
    modules, or experts the router never picks on these examples: ablating them cannot change a margin here, so
    their attributions would only fit noise). Runs under :func:`~lightning_interp.probe.evaluation_mode`, batch by
    batch, and stops once every module has run."""
    called: set[str] = set()
    handles = [model.get_submodule(g.name).register_forward_hook(lambda *_, name=g.name: called.add(name))
               for g in components.groups]
    try:
        with evaluation_mode(model):
            for start in range(0, len(x), batch_size):
                model(x[start : start + batch_size])
                if len(called) == len(components.groups):
                    break
    finally:
        for handle in handles:
            handle.remove()
    return [g.name for g in components.groups if g.name not in called]


def _eligible_kind(module: nn.Module, layer_types: Sequence[str]) -> str | None:
    return next((k for k in layer_types if isinstance(module, LAYER_KINDS[k])), None)


def _component_count(module: nn.Module, kind: str) -> int:
    if kind == "conv":
        return module.out_channels
    if kind == "linear":
        return module.out_features
    if module.bias_k is not None or module.add_zero_attn:
        raise AblationError("head ablation does not support nn.MultiheadAttention with add_bias_kv or add_zero_attn")
    return module.num_heads


def find_components(
    model: nn.Module,
    include: Sequence[str] | None = None,
    layer_types: Sequence[str] = ("conv", "linear", "attention"),
    exclude_head: bool = True,
    head: str | None = None,
) -> Components:
    """Enumerate the components of ``model``: conv output channels, Linear neurons and attention heads.

    Args:
        include: ``fnmatch`` globs over module names (``"layer*.conv?"``); ``None`` takes every module of
            ``layer_types``. Matched modules of other types are ignored; a pattern that matches no module
            of those types raises.
        layer_types: subset of ``"conv"`` (Conv1d/2d/3d), ``"linear"``, ``"attention"``
            (``nn.MultiheadAttention``, one component per head).
        exclude_head: leave out the output layer, whose "components" are the logits.
        head: the output layer's name (default: the last Conv/Linear registered).

    Raises:
        AblationError: no eligible component; the message lists the model's layers.
    """
    unknown = [t for t in layer_types if t not in LAYER_KINDS]
    if unknown or not layer_types:
        raise ValueError(f"layer_types must be a non-empty subset of {sorted(LAYER_KINDS)}, got {list(layer_types)}")
    if isinstance(include, str):
        include = [include]
    head = resolve_head(model, head) if exclude_head else None
    inside_attention = {
        f"{name}.{sub}" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
        for sub, _ in m.named_modules() if sub
    }  # e.g. out_proj: called functionally by its parent, so a hook on it would never fire
    groups, offset, eligible = [], 0, []
    for name, module in model.named_modules():
        kind = _eligible_kind(module, layer_types)
        if kind is None or not name or name == head or name in inside_attention:
            continue
        eligible.append(name)
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        size = _component_count(module, kind)
        groups.append(ComponentGroup(name, _KIND_OF[kind], size, offset))
        offset += size
    wanted = ", ".join(t.__name__ for k in layer_types for t in LAYER_KINDS[k])
    head_note = f" (the output layer {head!r} is excluded)" if head else ""
    unmatched = [p for p in include or () if not any(fnmatch.fnmatchcase(name, p) for name in eligible)]
    if groups and unmatched:  # one misspelt name among good ones must not shrink the analysis silently
        raise AblationError(
            f"layer pattern(s) {unmatched} matched no {wanted} module of {type(model).__name__}{head_note}. "
            f"Eligible layers: {eligible}"
        )
    if not groups:
        where = f" matching {list(include)}" if include is not None else ""
        raise AblationError(
            f"{type(model).__name__} has no {wanted} module{where}{head_note}. "
            f"Available layers: {describe_layers(model)}"
        )
    return Components(tuple(groups))


# ------------------------------------------------------------------------------------------------- ablation


def _grouped(output: Tensor, n_groups: int, name: str) -> Tensor:
    """View a batch ``[groups * rows, ...]`` as ``[groups, rows, ...]``."""
    if output.dim() < 2 or output.shape[0] % n_groups:
        raise AblationError(
            f"cannot apply {n_groups} masks to {name!r}: its output has shape {tuple(output.shape)}, whose first "
            f"dimension is not a multiple of {n_groups}; ablation needs batch-first Conv/Linear modules"
        )
    return output.reshape(n_groups, output.shape[0] // n_groups, *output.shape[1:])


def _mask_channels(output: Tensor, keep: Tensor, channel_dim: int, name: str) -> Tensor:
    """Multiply channel ``channel_dim`` of ``output`` (batch-first; ``-1`` = last) by the rows of ``keep``."""
    grouped = _grouped(output, keep.shape[0], name)
    shape = [1] * grouped.dim()
    shape[0] = keep.shape[0]
    shape[channel_dim + 1 if channel_dim >= 0 else -1] = keep.shape[1]
    return (grouped * keep.reshape(shape).to(device=grouped.device, dtype=grouped.dtype)).reshape(output.shape)


_MHA_ARGS = (
    "query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal",
)


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """MultiheadAttention masks (bool: True = not allowed; float: added) as float masks to add to the scores."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _head_outputs(mha: nn.MultiheadAttention, call: dict) -> Tensor:
    """Per-head attention outputs ``[B, H, T, head_dim]`` of an eval-mode MultiheadAttention call."""
    query, key, value = call["query"], call["key"], call["value"]
    if query.dim() != 3:
        raise AblationError("head ablation needs batched inputs to nn.MultiheadAttention (3-D query)")
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    (b, t, _), s, h = query.shape, key.shape[1], mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, wq, bq).reshape(b, t, h, -1).transpose(1, 2)
    k = F.linear(key, wk, bk).reshape(b, s, h, -1).transpose(1, 2)
    v = F.linear(value, wv, bv).reshape(b, s, h, -1).transpose(1, 2)
    attn = _additive_mask(call.get("attn_mask"), q.dtype)
    if attn is not None:
        attn = attn.reshape(b, h, t, s) if attn.dim() == 3 else attn.reshape(1, 1, t, s)
    padding = _additive_mask(call.get("key_padding_mask"), q.dtype)
    if padding is not None:
        padding = padding.reshape(b, 1, 1, s)
        attn = padding if attn is None else attn + padding
    causal = bool(call.get("is_causal")) and attn is None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, is_causal=causal)


def _mask_heads(mha: nn.MultiheadAttention, call: dict, output: tuple, keep: Tensor, name: str) -> tuple:
    heads = _head_outputs(mha, call)
    b, h, t, d = heads.shape
    heads = _mask_channels(heads, keep, 1, name)
    merged = F.linear(heads.transpose(1, 2).reshape(b, t, h * d), mha.out_proj.weight, mha.out_proj.bias)
    if not mha.batch_first:
        merged = merged.transpose(0, 1)
    return (merged, *output[1:])


def _ablation_hook(group: ComponentGroup, keep: Tensor, sequence_first: bool) -> Callable:
    columns = keep[:, group.columns]
    if group.kind == "head":

        def hook(module, args, kwargs, output):
            call = dict(zip(_MHA_ARGS, args)) | kwargs
            return _mask_heads(module, call, output, columns, group.name)

        return hook
    channel_dim = 1 if group.kind == "channel" else -1

    def hook(module, args, output):
        if sequence_first and output.dim() == 3:  # [T, G * B, ...] inside a batch_first=False layer
            return _mask_channels(output.transpose(0, 1), columns, channel_dim, group.name).transpose(0, 1)
        return _mask_channels(output, columns, channel_dim, group.name)

    return hook


@contextlib.contextmanager
def ablate(model: nn.Module, components: Components, keep: Tensor) -> Iterator[nn.Module]:
    """Inside the context, forward passes of ``model`` run with components ablated by ``keep``.

    ``keep`` is ``[G, N]`` (or ``[N]``): row ``g`` applies to rows ``g * B : (g + 1) * B`` of a batch of
    ``G * B`` inputs (the examples repeated once per mask). Entries are multiplied into the component outputs,
    so ``0`` ablates, ``1`` keeps, and a float ``keep`` that requires grad gives gradients per component.
    Hooks are removed on exit, also after an error; the model's parameters are never touched. Run the model in
    eval mode: attention heads are recomputed without dropout, and batch statistics would mix the masks.
    """
    if keep.dim() == 1:
        keep = keep.unsqueeze(0)
    if keep.shape[-1] != len(components):
        raise AblationError(f"keep masks have {keep.shape[-1]} columns but there are {len(components)} components")
    handles = []
    sequence_first = sequence_first_layers(model)
    try:
        for group in components.groups:
            module = model.get_submodule(group.name)
            hook = _ablation_hook(group, keep, group.name in sequence_first)
            handles.append(
                module.register_forward_hook(hook, with_kwargs=True)
                if group.kind == "head" else module.register_forward_hook(hook)
            )
        yield model
    finally:
        for handle in handles:
            handle.remove()


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that does not drag along a Lightning ``Trainer`` or Fabric.

    A LightningModule attached to a trainer references it (``_trainer``); the copy gets ``None`` there instead
    (through deepcopy's memo, so the original is never modified). Plain modules are deep-copied as they are.
    """
    memo = {id(ref): None for attr in ("_trainer", "_fabric") if (ref := getattr(model, attr, None)) is not None}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def ablated_copy(model: nn.Module, components: Components, ablate_idx: Sequence[int] | Tensor) -> nn.Module:
    """A copy of ``model`` whose weights realise the ablation of ``ablate_idx`` permanently (no hooks).

    Conv channel / Linear neuron ``c``: weight row ``c`` and bias ``c`` zeroed. Head ``h``: the head's input
    columns of ``out_proj.weight`` zeroed. Equal to :func:`ablate` with those components' keep entries at 0.
    """
    edited = copy_model(model)
    ablate_idx = torch.as_tensor(ablate_idx, dtype=torch.long).flatten()
    if len(ablate_idx) and (int(ablate_idx.min()) < 0 or int(ablate_idx.max()) >= len(components)):
        raise IndexError(f"component indices must lie in [0, {len(components)}), got {ablate_idx.tolist()}")
    owner = components.group_of()[ablate_idx]
    for gi, group in enumerate(components.groups):
        local = ablate_idx[owner == gi] - group.offset
        if not len(local):
            continue
        module = edited.get_submodule(group.name)
        if group.kind == "head":
            cols = (local[:, None] * module.head_dim + torch.arange(module.head_dim)).flatten()
            module.out_proj.weight[:, cols.to(module.out_proj.weight.device)] = 0
            continue
        local = local.to(module.weight.device)
        module.weight[local] = 0
        if module.bias is not None:
            module.bias[local] = 0
    return edited


# ---------------------------------------------------------------------------------------------- margins


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """Correct-class margin: the true class's logit minus the largest other logit (``> 0`` iff correct)."""
    true = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return true - others.amax(-1)


def sample_keep_masks(
    n_masks: int, n_components: int, alpha: float, generator: torch.Generator | None = None
) -> Tensor:
    """``[n_masks, n_components]`` bool keep masks; each component is ablated independently with probability α."""
    _check_alpha(alpha)
    return torch.rand(n_masks, n_components, generator=generator) >= alpha


def _check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha (the fraction of components ablated per mask) must lie in (0, 1), got {alpha}")


def _model_device(model: nn.Module) -> torch.device:
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))


def _chunk_plan(n_examples: int, max_batch_size: int) -> tuple[int, int]:
    """(examples per pass, masks per pass) so that one forward holds at most ``max_batch_size`` rows."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    examples = min(n_examples, max_batch_size)
    return examples, max(1, max_batch_size // examples)


def _forward_masked(model: nn.Module, components: Components, x: Tensor, y: Tensor, keep: Tensor) -> Tensor:
    """Margins ``[G, B]`` of ``B`` examples under ``G`` keep masks, in one forward pass."""
    g = keep.shape[0]
    with ablate(model, components, keep):
        logits = output_tensor(model, model(x.repeat(g, *[1] * (x.dim() - 1))))
    if logits.dim() != 2:
        raise AblationError(f"margins need the model to return logits of shape [batch, classes], got "
                            f"{tuple(logits.shape)}")
    return margins(logits.reshape(g, x.shape[0], -1), y.expand(g, -1))


def iter_margins(
    model: nn.Module,
    components: Components,
    x: Tensor,
    y: Tensor,
    masks: Tensor | Callable[[int, int], Tensor],
    n_masks: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(keep [g, N], margins [g, n])`` chunk by chunk, each chunk's masks evaluated in batched passes.

    ``masks`` is a ``[m, N]`` tensor or a function ``(start, count) -> [count, N]`` that draws them lazily
    (then ``n_masks`` is required). Examples are split too when they alone exceed ``max_batch_size`` rows.
    ``progress`` is called with the number of masks finished in each chunk.
    """
    device = _model_device(model)
    x, y = x.to(device), y.to(device)
    total = len(masks) if isinstance(masks, Tensor) else n_masks
    if total is None:
        raise ValueError("n_masks is required when masks are drawn by a function")
    per_pass, masks_per_pass = _chunk_plan(len(x), max_batch_size)
    with evaluation_mode(model):
        for start in range(0, total, masks_per_pass):
            count = min(masks_per_pass, total - start)
            keep = masks[start : start + count] if isinstance(masks, Tensor) else masks(start, count)
            keep_f = keep.to(device=device, dtype=x.dtype if x.is_floating_point() else torch.float32)
            rows = [
                _forward_masked(model, components, x[i : i + per_pass], y[i : i + per_pass], keep_f)
                for i in range(0, len(x), per_pass)
            ]
            if progress is not None:
                progress(count)
            yield keep, torch.cat(rows, dim=1).float()


def margins_under_masks(
    model: nn.Module, components: Components, x: Tensor, y: Tensor, masks: Tensor,
    max_batch_size: int = DEFAULT_MAX_BATCH,
) -> Tensor:
    """Margins ``[m, n]`` of every example under every keep mask ``[m, N]`` (batched, chunked)."""
    return torch.cat([m for _, m in iter_margins(model, components, x, y, masks, max_batch_size=max_batch_size)])


def _mask_sampler(n_components: int, alpha: float, seed: int) -> Callable[[int, int], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda start, count: sample_keep_masks(count, n_components, alpha, generator)


# ------------------------------------------------------------------------------------------------------ fit


class NormalEquations:
    """Running ``X^T X`` and ``X^T F`` (float64) of the design ``X = [1, V]`` and margins ``F``, chunk by chunk.

    Memory is ``O(N^2 + N n)`` whatever the number of masks; :meth:`solve` gives the least-squares fit.
    """

    def __init__(self, n_components: int, n_examples: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(n_components + 1, n_components + 1, dtype=torch.float64, device=device)
        self.rhs = torch.zeros(n_components + 1, n_examples, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, keep: Tensor, margins: Tensor) -> None:
        """Fold in keep masks ``[m, N]`` and the margins ``[m, n]`` they produced."""
        design = torch.cat([torch.ones(len(keep), 1), keep.double().cpu()], dim=1).to(self.gram.device)
        self.gram += design.T @ design
        self.rhs += design.T @ margins.double().to(self.gram.device)
        self.count += len(keep)

    def solve(self, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
        """``(W [n, N], b [n])`` minimising ``mean_v (b + W v - f(v))^2 + ridge ||W||^2`` (min-norm if singular)."""
        gram = self.gram
        if ridge > 0:
            penalty = torch.full((gram.shape[0],), ridge * self.count, dtype=gram.dtype, device=gram.device)
            penalty[0] = 0  # the intercept is not shrunk
            gram = gram + torch.diag(penalty)
        solution = torch.linalg.pinv(gram, hermitian=True) @ self.rhs
        return solution[1:].T.float().cpu(), solution[0].float().cpu()


def solve_attributions(keep: Tensor, margins: Tensor, ridge: float = 0.0, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Least-squares attributions from already collected keep masks ``[m, N]`` and margins ``[m, n]``."""
    normal = NormalEquations(keep.shape[1], margins.shape[1], margins.device)
    for start in range(0, len(keep), chunk):
        normal.add(keep[start : start + chunk], margins[start : start + chunk])
    return normal.solve(ridge)


def fit_attributions(
    model: nn.Module,
    components: Components,
    x: Tensor,
    y: Tensor,
    n_masks: int,
    alpha: float = 0.1,
    seed: int = 0,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    ridge: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """COAR's fit: attributions ``W [n, N]`` and biases ``b [n]`` of the per-example linear surrogates.

    Minimises ``mean_v (b + W v - f(v))^2 + ridge * ||W||^2`` over ``n_masks`` masks. Masks are drawn and
    evaluated chunk by chunk and folded into the normal equations (float64) at once, so memory does not grow
    with ``n_masks``. ``ridge = 0`` is the paper's plain least squares; with fewer masks than components the
    minimum-norm solution is returned (a small ridge, e.g. 0.01, predicts better there).
    """
    _check_alpha(alpha)
    if n_masks < 2:
        raise ValueError(f"n_masks must be >= 2, got {n_masks}")
    normal = NormalEquations(len(components), len(x), _model_device(model))
    sampler = _mask_sampler(len(components), alpha, seed)
    for keep, marg in iter_margins(model, components, x, y, sampler, n_masks, max_batch_size, progress):
        normal.add(keep, marg)
    return normal.solve(ridge)


def leave_one_out_attributions(
    model: nn.Module, components: Components, x: Tensor, y: Tensor, max_batch_size: int = DEFAULT_MAX_BATCH,
) -> tuple[Tensor, Tensor]:
    """Leave-one-component-out as a linear surrogate: ``(W [n, N], b [n])``.

    With ``d_c = f(ablate c) - f(all kept)``, the additive prediction for a mask is
    ``f(all) + sum_{c ablated} d_c = (f(all) + sum_c d_c) + sum_c v_c (-d_c)``. Costs ``N + 1`` masks.
    """
    n_comp = len(components)
    masks = torch.cat([torch.ones(1, n_comp, dtype=torch.bool), ~torch.eye(n_comp, dtype=torch.bool)])
    marg = margins_under_masks(model, components, x, y, masks, max_batch_size)
    effect = marg[1:] - marg[:1]  # [N, n]
    return -effect.T, marg[0] + effect.sum(0)


def grad_times_param_attributions(
    model: nn.Module, components: Components, x: Tensor, y: Tensor, max_batch_size: int = DEFAULT_MAX_BATCH,
) -> tuple[Tensor, Tensor]:
    """Gradient x parameter as a linear surrogate: ``(W [n, N], b [n])``.

    Scaling component ``c``'s output by ``s_c`` scales its weight and bias rows, so
    ``d f / d s_c at s = 1`` equals ``sum_{theta in c} theta * d f / d theta`` (gradient x parameter summed
    over the component). First order: ``f(v) ~ f(1) + sum_c (v_c - 1) g_c``. Each example gets its own mask
    row, so one backward pass gives the per-example gradients of a whole batch.
    """
    device = _model_device(model)
    grads, full = [], []
    with evaluation_mode(model, grad=True):
        for start in range(0, len(x), max_batch_size):
            xb, yb = x[start : start + max_batch_size].to(device), y[start : start + max_batch_size].to(device)
            scale = torch.ones(len(xb), len(components), device=device, requires_grad=True)
            with ablate(model, components, scale):
                marg = margins(output_tensor(model, model(xb)), yb)
            (grad,) = torch.autograd.grad(marg.sum(), scale)
            grads.append(grad.detach().float().cpu())
            full.append(marg.detach().float().cpu())
    weights, at_full = torch.cat(grads), torch.cat(full)
    return weights, at_full - weights.sum(1)


def heldout_correlation(
    model: nn.Module,
    components: Components,
    x: Tensor,
    y: Tensor,
    predictors: Mapping[str, tuple[Tensor, Tensor]],
    n_masks: int = 200,
    alpha: float = 0.1,
    seed: int = 1,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Tensor]:
    """Per-example Pearson correlation between predicted and actual margins on fresh masks.

    ``predictors`` maps a name to linear surrogates ``(W [n, N], b [n])``; all are scored on the same masks
    (drawn with ``seed``, which should differ from the fit's). Returns per-example correlations ``[n]``
    per predictor (NaN where the actual margin did not vary); their ``nanmean`` is the paper's metric.
    """
    _check_alpha(alpha)
    sums = {name: torch.zeros(5, len(x), dtype=torch.float64) for name in predictors}
    sampler = _mask_sampler(len(components), alpha, seed)
    for keep, actual in iter_margins(model, components, x, y, sampler, n_masks, max_batch_size, progress):
        a = actual.double().cpu()
        for name, (weights, bias) in predictors.items():
            p = keep.double() @ weights.double().T + bias.double()
            sums[name] += torch.stack([p.sum(0), a.sum(0), (p * p).sum(0), (a * a).sum(0), (p * a).sum(0)])
    return {name: _pearson_from_sums(s, n_masks) for name, s in sums.items()}


def _pearson_from_sums(sums: Tensor, count: int) -> Tensor:
    sp, sa, spp, saa, spa = sums
    cov = spa - sp * sa / count
    var_p, var_a = spp - sp * sp / count, saa - sa * sa / count
    denom = (var_p * var_a).sqrt()
    ok = (var_p > 1e-12 * spp.clamp_min(1)) & (var_a > 1e-12 * saa.clamp_min(1))
    return torch.where(ok, cov / denom.clamp_min(1e-300), torch.full_like(cov, float("nan"))).float()


# -------------------------------------------------------------------------------------------- estimator


class COAR:
    """COAR estimator: component attributions of ``model``'s margins on a fixed set of examples.

    Args:
        alpha: fraction of components ablated per mask, in (0, 1). Default 0.1 (the paper's CIFAR value).
        n_masks: masks for the fit; should exceed the number of components (cost: ``n_masks x examples``
            forward rows).
        include, layer_types, exclude_head: component selection, see :func:`find_components`.
        max_batch_size: most rows (masks x examples) in one forward pass; larger requests are chunked.
        ridge: L2 penalty on the attributions, relative to the mean squared error (0 = the paper's least squares).
        seed: seed of the fit's masks (the evaluation draws from ``seed + 1`` unless told otherwise).

    Fitted attributes: ``components_`` (:class:`Components`), ``component_names_`` (list of ``N`` names),
    ``attributions_`` ``[n, N]`` (effect on each example's margin of keeping each component), ``bias_`` ``[n]``,
    after :meth:`score`: ``correlations_`` ``[n]`` and ``correlation_`` (their mean).
    """

    def __init__(
        self,
        alpha: float = 0.1,
        n_masks: int = 1000,
        include: Sequence[str] | None = None,
        layer_types: Sequence[str] = ("conv", "linear", "attention"),
        exclude_head: bool = True,
        max_batch_size: int = DEFAULT_MAX_BATCH,
        ridge: float = 0.0,
        seed: int = 0,
    ) -> None:
        _check_alpha(alpha)
        if n_masks < 2:
            raise ValueError(f"n_masks must be >= 2, got {n_masks}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.alpha, self.n_masks = float(alpha), int(n_masks)
        self.include, self.layer_types = include, tuple(layer_types)
        self.exclude_head, self.max_batch_size, self.ridge, self.seed = exclude_head, int(max_batch_size), ridge, seed

    def fit(self, model: nn.Module, x: Tensor, y: Tensor, progress: Callable[[int], None] | None = None) -> COAR:
        self.components_ = find_components(model, self.include, self.layer_types, self.exclude_head)
        self.component_names_ = self.components_.names
        self.attributions_, self.bias_ = fit_attributions(
            model, self.components_, x, y, self.n_masks, self.alpha, self.seed, self.max_batch_size, self.ridge,
            progress
        )
        return self

    def predict(self, keep: Tensor) -> Tensor:
        """Predicted margins ``[m, n]`` for keep masks ``[m, N]``."""
        return keep.float() @ self.attributions_.T + self.bias_

    def score(
        self, model: nn.Module, x: Tensor, y: Tensor, n_masks: int = 200, seed: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> float:
        """Mean per-example Pearson correlation on fresh masks (the examples must be those of :meth:`fit`)."""
        if len(x) != len(self.bias_):
            raise ValueError(
                f"score needs the {len(self.bias_)} examples the attributions were fitted on, got {len(x)}")
        corr = heldout_correlation(
            model, self.components_, x, y, {"coar": (self.attributions_, self.bias_)}, n_masks, self.alpha,
            self.seed + 1 if seed is None else seed, self.max_batch_size, progress,
        )["coar"]
        self.correlations_ = corr
        self.correlation_ = float(corr.nanmean())
        return self.correlation_


# --------------------------------------------------------------------------------------------------- edit


def welch_t(target: Tensor, reference: Tensor) -> Tensor:
    """Welch t-statistic per component between attribution rows of ``target [t, N]`` and ``reference [r, N]``.

    ``(mean_T - mean_R) / sqrt(var_T / |T| + var_R / |R|)``; a single target has no spread, its variance
    term is taken as 0 (the statistic then compares it with the reference distribution).
    """
    if len(target) == 0 or len(reference) < 2:
        raise ValueError(
            f"welch_t needs >= 1 target and >= 2 reference examples, got {len(target)} and {len(reference)}")
    var_t = target.var(0) if len(target) > 1 else torch.zeros_like(target[0])
    se = (var_t / len(target) + reference.var(0) / len(reference)).sqrt().clamp_min(1e-12)
    return (target.mean(0) - reference.mean(0)) / se


@dataclass
class EditResult:
    """What :func:`edit` did. ``model`` is the edited copy (the original is untouched)."""

    model: nn.Module
    ablated: list[str]
    ablated_index: Tensor
    scores: Tensor
    target_margins_before: Tensor
    target_margins_after: Tensor
    reference_accuracy_before: float
    reference_accuracy_after: float
    fixed: bool
    history: dict[str, Tensor] = field(default_factory=dict)


def edit(
    model: nn.Module,
    components: Components,
    attributions: Tensor,
    x: Tensor,
    y: Tensor,
    target: Tensor,
    reference: Tensor,
    max_components: int = 20,
    max_batch_size: int = DEFAULT_MAX_BATCH,
) -> EditResult:
    """COAR-Edit: ablate the components that most separate ``target`` from ``reference`` examples.

    Components are ranked by :func:`welch_t` (most negative first: keeping them lowers the targets' margins
    relative to the reference set). Prefixes of 1..``max_components`` of that ranking are all evaluated in one
    batched pass; the edit is the shortest prefix that makes every target margin positive, else the prefix
    that makes the most targets positive (earliest on ties). Accuracy on ``reference`` before/after is
    reported. Returns an edited copy (:func:`ablated_copy`); ``model`` is never modified.

    Args:
        attributions: ``[n, N]`` rows for the examples ``x [n, ...]``, ``y [n]``.
        target, reference: indices into those rows (disjoint).
    """
    target, reference = torch.as_tensor(target).flatten(), torch.as_tensor(reference).flatten()
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")
    if set(target.tolist()) & set(reference.tolist()):
        raise ValueError("target and reference sets overlap")
    scores = welch_t(attributions[target], attributions[reference]).cpu()  # the masks are built on the CPU
    order = scores.argsort()[: min(max_components, len(components))]
    rank = torch.full((len(components),), len(components), dtype=torch.long)
    rank[order] = torch.arange(len(order))
    prefixes = torch.arange(len(order) + 1)[:, None] <= rank[None, :]  # row k ablates order[:k]
    chosen = torch.cat([target, reference])
    marg = margins_under_masks(model, components, x[chosen], y[chosen], prefixes, max_batch_size)
    target_marg, reference_correct = marg[:, : len(target)], (marg[:, len(target):] > 0).float().mean(1)
    n_fixed = (target_marg > 0).sum(1)
    best = int(n_fixed.argmax())  # first prefix reaching the maximum: all fixed if any prefix does
    ablated_index = order[:best]
    return EditResult(
        model=ablated_copy(model, components, ablated_index),
        ablated=[components.names[i] for i in ablated_index.tolist()],
        ablated_index=ablated_index,
        scores=scores,
        target_margins_before=target_marg[0],
        target_margins_after=target_marg[best],
        reference_accuracy_before=float(reference_correct[0]),
        reference_accuracy_after=float(reference_correct[best]),
        fixed=bool(n_fixed[best] == len(target)),
        history={"targets_fixed": n_fixed[1:], "reference_accuracy": reference_correct[1:]},
    )
