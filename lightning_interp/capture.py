"""Choose layers and record their activations with forward hooks that are always removed."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import nn

#: The layers analysed when the user names none: every Conv and Linear (the output head is excluded).
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class LayerSelectionError(ValueError):
    """A layer selection matched nothing, or named a layer that does not exist."""


def find_head(model: nn.Module, layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES) -> str | None:
    """Name of the output layer: the last module of ``layer_types`` in registration order (``None`` if none)."""
    names = [name for name, module in model.named_modules() if isinstance(module, tuple(layer_types))]
    return names[-1] if names else None


def resolve_head(model: nn.Module, head: str | None = None,
                 layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES) -> str | None:
    """The output layer's name: ``head`` when given (checked to exist), else :func:`find_head`'s guess."""
    if head is None:
        return find_head(model, layer_types)
    if head not in dict(model.named_modules()) or not head:
        raise LayerSelectionError(f"head={head!r} is not a module of {type(model).__name__}; "
                                  f"available layers: {describe_layers(model)}")
    return head


def describe_layers(model: nn.Module) -> str:
    """``"conv1 (Conv2d), fc1 (Linear), ..."``: every leaf module, for error messages that say what exists."""
    named = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if name and not list(m.children())]
    return ", ".join(named) if named else "(the model has no submodules)"


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    exclude_head: bool = True,
    head: str | None = None,
) -> dict[str, nn.Module]:
    """The layers to analyse, in registration order, keyed by their ``named_modules()`` name.

    ``include`` is a list of ``fnmatch`` globs (``"encoder.*"``, ``"conv?"``); when it is given, any module type
    matches and the output head is kept if a pattern names it. Without it, every module of ``layer_types`` is
    taken, minus the output head when ``exclude_head`` is set (``head``, or the last one registered).

    Raises:
        LayerSelectionError: nothing matched; the message lists the available layer names.
    """
    if include is not None and isinstance(include, str):
        include = [include]
    modules = [(name, m) for name, m in model.named_modules() if name]
    if include:
        chosen = {name: m for name, m in modules if any(fnmatch.fnmatchcase(name, p) for p in include)}
        unmatched = [p for p in include if not any(fnmatch.fnmatchcase(name, p) for name, _ in modules)]
        if unmatched:
            raise LayerSelectionError(
                f"layer pattern(s) {unmatched} matched no module of {type(model).__name__}; "
                f"available layers: {describe_layers(model)}"
            )
        return chosen
    head = resolve_head(model, head, layer_types) if exclude_head else None
    inside_attention = {  # e.g. out_proj: MultiheadAttention calls its weights directly, so no hook would fire
        f"{name}.{sub}" for name, m in modules if isinstance(m, nn.MultiheadAttention) for sub, _ in m.named_modules()
        if sub
    }
    chosen = {name: m for name, m in modules
              if isinstance(m, tuple(layer_types)) and name != head and name not in inside_attention}
    if not chosen:
        kinds = ", ".join(t.__name__ for t in layer_types)
        raise LayerSelectionError(
            f"{type(model).__name__} has no {kinds} layer besides its output head {head!r}; "
            f"name layers with a glob instead. Available layers: {describe_layers(model)}"
        )
    return chosen


#: Modules whose units are the *last* axis of their output (a Linear on ``[N, T, D]`` has D units, not T); the
#: modules of torch's attention, transformer and recurrent layers are channels-last too (:func:`sequence_layout`).
CHANNELS_LAST_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding)


def pool_spatial(activation: torch.Tensor) -> torch.Tensor:
    """One value per sample and unit: feature maps ``[N, C, *spatial]`` are averaged over space (ARM's rule)."""
    if activation.dim() <= 2:
        return activation
    return activation.flatten(2).mean(dim=2)


_SEQUENCE_MODULES = (nn.MultiheadAttention, nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                     nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def _batch_first_flag(module: nn.Module) -> bool | None:
    """``batch_first`` of torch's attention, recurrent and transformer modules (``None`` for any other module:
    a user's module with a ``batch_first`` or ``self_attn`` attribute says nothing about its own tensors)."""
    if not isinstance(module, _SEQUENCE_MODULES):
        return None
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return module.self_attn.batch_first  # the layer keeps the flag on its attention
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return _batch_first_flag(module.layers[0]) if len(module.layers) else None
    return module.batch_first


def sequence_layout(model: nn.Module) -> dict[str, bool]:
    """``{name: batch_first}`` for torch's attention, transformer and recurrent modules and the torch modules
    inside them (their Linear, Dropout, LayerNorm, activations): these all see token tensors, ``[N, T, E]`` or,
    with ``batch_first=False``, ``[T, N, E]``. A user's module inside one (a ``custom_decoder``) is not assumed
    to follow it, and a nested torch sequence module keeps its own flag."""
    layout: dict[str, bool] = {}

    def visit(name: str, module: nn.Module, inherited: bool | None) -> None:
        own = _batch_first_flag(module)
        if own is None and not (inherited is not None and type(module).__module__.startswith("torch.nn")):
            inherited = None  # a user's module: its layout is its own business
        flag = own if own is not None else inherited
        if flag is not None:
            layout[name] = flag
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, flag)

    visit("", model, None)
    return layout


def sequence_first_layers(model: nn.Module) -> set[str]:
    """Names of the modules that see sequence-first tensors ``[T, N, ...]`` (see :func:`sequence_layout`)."""
    return {name for name, batch_first in sequence_layout(model).items() if not batch_first}


def samples_first(tensor: torch.Tensor, sequence_first: bool) -> torch.Tensor:
    """``tensor`` with the sample axis first; ``sequence_first`` says it is ``[T, N, E]``."""
    return tensor.transpose(0, 1) if sequence_first and tensor.dim() == 3 else tensor


def pool_units(module: nn.Module, activation: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``[N, units]`` for ``module``'s sample-first activation: conv maps ``[N, C, *spatial]`` averaged over
    space (ARM's rule, C units); for layers acting on the last axis (:data:`CHANNELS_LAST_TYPES`, e.g. a Linear
    on tokens ``[N, T, D]``, or ``channels_last``: any module inside a transformer) the positions are averaged
    instead (D units)."""
    if activation.dim() <= 2:
        return activation
    if channels_last or isinstance(module, CHANNELS_LAST_TYPES):
        return activation.flatten(1, -2).mean(dim=1)
    return pool_spatial(activation)


class ActivationRecorder:
    """Record the outputs of ``layers`` during forward passes; a context manager.

    Hooks are registered on ``__enter__`` and removed on ``__exit__``, also when the forward pass raises.
    Recorded tensors are detached; with ``pool=True`` conv maps are averaged over space as they arrive, so
    memory stays at ``N x units`` per layer. ``to_cpu`` moves each batch off the accelerator.

    Example:
        >>> with ActivationRecorder(model, select_layers(model)) as rec:
        ...     model(x)
        >>> rec.stacked()["conv1"].shape      # [N, channels]
    """

    def __init__(
        self, model: nn.Module, layers: Mapping[str, nn.Module], pool: bool = True, to_cpu: bool = True
    ) -> None:
        self.model = model
        self.layers = dict(layers)
        layout = sequence_layout(model)
        self.tokens = set(layout) & set(self.layers)  # channels last
        self.sequence_first = {name for name in self.tokens if not layout[name]}
        self.pool = pool
        self.to_cpu = to_cpu
        self.store: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def record(module: nn.Module, _inputs, output) -> None:
            if isinstance(output, (tuple, list)):  # e.g. MultiheadAttention returns (output, weights)
                output = output[0]
            out = samples_first(output.detach(), name in self.sequence_first)
            if self.pool:
                out = pool_units(module, out, name in self.tokens)
            self.store[name].append(out.cpu() if self.to_cpu else out)

        return record

    def __enter__(self) -> ActivationRecorder:
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stacked(self) -> dict[str, torch.Tensor]:
        """Per layer, the recorded batches concatenated along the sample axis."""
        return {name: torch.cat(chunks) for name, chunks in self.store.items() if chunks}

    def clear(self) -> None:
        for chunks in self.store.values():
            chunks.clear()


class HeadInputRecorder(ActivationRecorder):
    """Record the *input* of the output head: the penultimate features (for coresets and embeddings)."""

    def __init__(self, model: nn.Module, head_name: str, to_cpu: bool = True) -> None:
        super().__init__(model, {head_name: model.get_submodule(head_name)}, pool=True, to_cpu=to_cpu)

    def __enter__(self) -> HeadInputRecorder:
        (name, module), = self.layers.items()

        def record(module: nn.Module, inputs) -> None:
            out = samples_first(inputs[0].detach(), name in self.sequence_first)
            out = pool_units(module, out, name in self.tokens).flatten(1)
            self.store[name].append(out.cpu() if self.to_cpu else out)

        self._handles.append(module.register_forward_pre_hook(record))
        return self
