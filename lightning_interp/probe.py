"""The data a callback evaluates, and the one way it is evaluated without disturbing training."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from .alerts import InterpretationWarning
from .capture import ActivationRecorder, HeadInputRecorder, resolve_head
from .isolation import evaluation_mode, preserved_rng

BatchToXY = Callable[[object], tuple[torch.Tensor, "torch.Tensor | None"]]

_INPUT_KEYS = ("x", "input", "inputs", "input_ids", "image", "images", "pixel_values", "features", "data")
_LABEL_KEYS = ("y", "label", "labels", "target", "targets", "class", "classes")
_UNLABELLED_KEY_SETS: set[tuple] = set()  # dict batches without a label key already warned about (once a process)


class ProbeDataError(ValueError):
    """The probe data cannot be used: empty, unlabeled where labels are needed, or of an unknown batch form."""


def default_batch_to_xy(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a batch into inputs and labels.

    Understands ``(x, y, ...)`` tuples and lists, dicts with a common input key (``x``, ``input``, ``image``,
    ``pixel_values``, ...) and label key (``y``, ``label``, ``target``, ...), and a bare input tensor (no
    labels). Anything else raises, asking for a ``batch_to_xy`` function.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        label = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], label
    if isinstance(batch, Mapping):
        x_key = next((k for k in _INPUT_KEYS if k in batch), None)
        if x_key is not None:
            y_key = next((k for k in _LABEL_KEYS if k in batch), None)
            if y_key is None and len(batch) > 1 and tuple(sorted(batch)) not in _UNLABELLED_KEY_SETS:
                _UNLABELLED_KEY_SETS.add(tuple(sorted(batch)))
                warnings.warn(
                    f"batch dict has keys {sorted(batch)}: {x_key!r} is read as the input, and none is a label key "
                    f"({', '.join(_LABEL_KEYS)}), so the probe has no labels; if one of them holds the labels, pass "
                    "batch_to_xy=<function batch -> (x, y)> to the callback", InterpretationWarning, stacklevel=2)
            return batch[x_key], (batch[y_key] if y_key is not None else None)
        raise ProbeDataError(
            f"batch dict has keys {sorted(batch)}; expected an input key among {list(_INPUT_KEYS)}. "
            "Pass batch_to_xy=<function batch -> (x, y)> to the callback."
        )
    raise ProbeDataError(
        f"cannot split a batch of type {type(batch).__name__} into (x, y); "
        "pass batch_to_xy=<function batch -> (x, y)> to the callback."
    )


def class_index_labels(y: torch.Tensor) -> torch.Tensor:
    """Integer or boolean labels as the ``[N]`` int64 class indices torch's indexing and losses expect (uint8/int16
    or bool labels, or one ``[N, 1]`` column, as datasets often store them); float labels are returned unchanged."""
    if y.is_floating_point() or y.is_complex():
        return y
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    return y.long()


@contextlib.contextmanager
def inputs_in_model_dtype(model: nn.Module) -> Iterator[None]:
    """Cast floating inputs of ``model``'s forward to its parameters' dtype (``precision="bf16-true"`` and
    ``"16-true"`` keep float32 data but bf16/fp16 weights). The hook exists only inside the block."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype == torch.float32:
        yield
        return

    def cast(_module, args):
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    handle = model.register_forward_pre_hook(cast)
    try:
        yield
    finally:
        handle.remove()


class UnreadableLayers(ProbeDataError):
    """Recorded layers that give no one row per sample: ``forward()`` never called them, called them more than
    once per sample, or fed them tensors whose first axis is not the samples."""

    def __init__(self, message: str, layers: list[str]) -> None:
        super().__init__(message)
        self.layers = layers


def output_tensor(model: nn.Module, output: object) -> torch.Tensor:
    """The forward pass's output as the one tensor the callbacks read, or a clear error naming what came back."""
    if isinstance(output, torch.Tensor):
        return output
    raise ProbeDataError(
        f"{type(model).__name__}.forward returned a {type(output).__name__}; lightning_interp reads the forward "
        "output as one tensor (class scores [batch, classes] for the classification callbacks). Return the "
        "logits from forward() and compute the other outputs elsewhere (e.g. in training_step)"
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameter-free model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class ProbeData:
    """A dataset, the dataset indices to evaluate, and how to split its batches into ``(x, y)``.

    Batches come from a private loader (no workers, no shuffling, its own generator), so the training
    dataloader and its sampler state are never touched. A ``TensorDataset`` is indexed directly.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: torch.Tensor | None = None,
        batch_size: int = 256,
        batch_to_xy: BatchToXY | None = None,
    ) -> None:
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise ProbeDataError(
                f"the probe dataset ({type(dataset).__name__}) has no len(); an iterable-style dataset cannot be "
                "indexed per sample. Pass a map-style Dataset."
            ) from err
        if n == 0:
            raise ProbeDataError(f"the probe dataset ({type(dataset).__name__}) is empty")
        self.dataset = dataset
        self.indices = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long).flatten()
        if len(self.indices) == 0:
            raise ProbeDataError("the probe selection is empty")
        if int(self.indices.max()) >= n or int(self.indices.min()) < 0:
            raise ProbeDataError(f"probe indices fall outside the dataset of {n} samples")
        self.batch_size = int(batch_size)
        self.batch_to_xy = batch_to_xy or default_batch_to_xy

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def subset(self, positions: torch.Tensor) -> ProbeData:
        """A probe over ``self.indices[positions]`` of the same dataset."""
        return ProbeData(self.dataset, self.indices[positions], self.batch_size, self.batch_to_xy)

    def _raw_batches(self) -> Iterator[object]:
        if isinstance(self.dataset, TensorDataset):
            for start in range(0, len(self.indices), self.batch_size):
                chunk = self.indices[start : start + self.batch_size]
                yield tuple(t[chunk] for t in self.dataset.tensors)
            return
        loader = DataLoader(
            Subset(self.dataset, self.indices.tolist()),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=default_collate,
            generator=torch.Generator(),
        )
        yield from loader

    def batches(
        self, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Yield ``(x, y or None, dataset indices)`` with ``x`` and ``y`` on ``device``.

        The global RNG streams and the generators the dataset holds itself are restored when the iteration
        ends, so a dataset with random augmentation never shifts the training run's shuffling, dropout or
        augmentation, wherever the batches are read.
        """
        with preserved_rng(self.dataset):
            start = 0
            for raw in self._raw_batches():
                x, y = self.batch_to_xy(raw)
                if not isinstance(x, torch.Tensor):
                    raise ProbeDataError(
                        f"the probe's inputs must be one tensor (the model called as model(x)), but batch_to_xy "
                        f"returned x of type {type(x).__name__}; models taking several inputs (a dict, a tuple) "
                        "are not supported yet: wrap the model so that it takes one tensor"
                    )
                idx = self.indices[start : start + len(x)]
                start += len(x)
                yield x.to(device), (class_index_labels(y).to(device) if y is not None else None), idx


@dataclass
class ProbeOutputs:
    """One forward pass over a probe set, on the CPU.

    ``outputs`` are the model's outputs ``[N, ...]``; ``labels`` the targets or ``None``; ``indices`` the dataset
    index of each row; ``activations`` per recorded layer ``[N, units]`` (conv maps averaged over space);
    ``features`` the penultimate features (input of the output head) when asked for.
    """

    outputs: torch.Tensor
    labels: torch.Tensor | None
    indices: torch.Tensor
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None

    def take(self, rows: torch.Tensor, layer_names, features: bool = True) -> ProbeOutputs:
        """Rows ``rows`` (positions, in that order) with only ``layer_names`` among the activations (and the
        features only with ``features``: every reader of one probe then gets the same fields, as DDP's gather
        of them needs)."""
        kept = self.features if features else None
        if len(rows) == len(self.indices) and torch.equal(rows, torch.arange(len(rows))):  # all of it, in order
            return ProbeOutputs(self.outputs, self.labels, self.indices, {n: self.activations[n] for n in layer_names},
                                kept)
        pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
        return ProbeOutputs(pick(self.outputs), pick(self.labels), self.indices[rows],
                            {n: pick(self.activations[n]) for n in layer_names}, pick(kept))

    def require_class_labels(self, who: str) -> torch.Tensor:
        """The integer labels, or a clear error saying that ``who`` needs a classification probe."""
        if self.labels is None:
            raise ProbeDataError(f"{who} needs class labels, but the probe batches carry none (inputs only)")
        if self.labels.is_floating_point() or self.labels.dim() != 1:
            raise ProbeDataError(
                f"{who} needs integer class labels of shape [N]; got {self.labels.dtype} labels of shape "
                f"{tuple(self.labels.shape)} (regression or multi-label targets are not supported)"
            )
        if self.outputs.dim() != 2 or self.outputs.shape[1] < 2:
            raise ProbeDataError(
                f"{who} needs class scores of shape [N, classes]; the model outputs shape {tuple(self.outputs.shape)}"
            )
        return self.labels


def run_probe(
    model: nn.Module,
    probe: ProbeData,
    layers: Mapping[str, nn.Module] | None = None,
    pool: bool = True,
    features: bool | str = False,
    optional_layers: Mapping[str, nn.Module] | None = None,
) -> ProbeOutputs:
    """Forward the whole probe set through ``model`` under :func:`evaluation_mode`, recording ``layers``.

    With ``features`` the input of the output head is recorded too: ``True`` takes the last Conv/Linear
    registered (:func:`~lightning_interp.capture.find_head`), a string names the head. ``optional_layers`` are
    recorded as well where they can be read (one row per sample) and left out silently where not; a layer in
    ``layers`` that cannot be read raises :class:`UnreadableLayers`. Inputs go to the model's device; results
    come back on the CPU.
    """
    device = model_device(model)
    outputs, labels, indices = [], [], []
    optional = {n: m for n, m in (optional_layers or {}).items() if n not in (layers or {})}
    recorders = [ActivationRecorder(model, {**(layers or {}), **optional}, pool=pool)]
    head = resolve_head(model, features if isinstance(features, str) else None) if features else None
    if head is not None:
        recorders.append(HeadInputRecorder(model, head))
    with evaluation_mode(model), contextlib.ExitStack() as stack:
        for rec in recorders:
            stack.enter_context(rec)
        for x, y, idx in probe.batches(device):
            outputs.append(output_tensor(model, model(x)).detach().cpu())
            labels.append(y.cpu() if y is not None else None)
            indices.append(idx)
    activations = recorders[0].stacked()
    n_samples = sum(len(i) for i in indices)
    for name in optional:
        if name in activations and pool and len(activations[name]) != n_samples:
            del activations[name]
    silent = [name for name in layers or {} if name not in activations]
    if silent:
        raise UnreadableLayers(
            f"layer(s) {silent} never ran in {type(model).__name__}.forward (their hooks saw no output); "
            f"choose layers the forward pass uses. Layers that ran: {sorted(activations) or 'none of those chosen'}",
            silent,
        )
    misread = {name: tuple(act.shape) for name, act in activations.items() if pool and len(act) != n_samples}
    if misread:
        raise UnreadableLayers(
            f"layer(s) {misread} recorded a number of rows other than the {n_samples} samples: forward() calls them "
            "more than once per sample (shared weights, a loop over time steps) or feeds them tensors whose first "
            "axis is not the samples (a module on [sequence, batch, features] outside a batch_first=False "
            "attention or recurrent layer); choose other layers with layers=[...]",
            list(misread),
        )
    head_inputs = recorders[1].stacked() if head is not None else {}
    if head is not None and head not in head_inputs:
        raise ProbeDataError(
            f"the output head was taken to be {head!r}"
            + ("" if isinstance(features, str) else f" (the last Conv/Linear registered in {type(model).__name__})")
            + ", but forward() never called it; name the real output layer with the callbacks' head= argument"
        )
    has_labels = all(label is not None for label in labels)
    return ProbeOutputs(
        outputs=torch.cat(outputs).float(),
        labels=torch.cat(labels) if has_labels else None,
        indices=torch.cat(indices),
        activations={name: act.float() for name, act in activations.items()},
        features=head_inputs[head].float() if head is not None else None,
    )


class WeightsFingerprint:
    """Identity, in-place version and value sum of every parameter and buffer: changes whenever a weight does,
    also through ``.data`` writes, which leave the version alone (how weight-averaging callbacks swap weights)."""

    def __init__(self, module: nn.Module) -> None:
        tensors = [*module.parameters(), *module.buffers()]
        self.identity = tuple((id(t), t._version) for t in tensors)
        with torch.no_grad():
            self.sums = torch.stack([t.detach().float().sum() for t in tensors]) if tensors else torch.zeros(0)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, WeightsFingerprint) and self.identity == other.identity
                and self.sums.device == other.sums.device and torch.equal(self.sums, other.sums))


class ProbeCache:
    """Share forward passes between callbacks that read the same dataset at the same training step.

    A request is served from any cached pass that covers its samples (a coreset is read out of a pass over the
    whole probe; with ``exact``, only from a pass over exactly its samples) and recorded its layers and, if
    asked, the output head's input. Entries live until the step changes or any weight or buffer does (a callback
    that prunes or swaps weights between two readers, a second ``fit`` that restarts the step count), and are
    kept per dataset and ``batch_to_xy``. On a miss one pass runs over the requested samples (or ``covering``, a
    probe over more of the same dataset that another reader will need), recording the union of the layers asked
    for, the layers of an earlier pass over the same samples, and what other readers due at this step asked for
    (``extra_layers``, ``extra_features``). What others asked for is best effort: a layer of theirs that cannot
    be read is left out, and if the pass fails with their additions it runs again without them.
    """

    def __init__(self) -> None:
        self._step: object = None
        self._weights: WeightsFingerprint | None = None
        self._entries: dict[tuple, list[tuple[ProbeOutputs, str | None]]] = {}  # per dataset: (pass, its head)
        self._failed_additions: set[tuple] = set()  # datasets whose passes others' additions broke at this step
        self.forward_passes = 0  # passes run (attempts included), for tests and profiling

    def get(
        self,
        model: nn.Module,
        probe: ProbeData,
        layers: Mapping[str, nn.Module],
        step: object,
        features: bool | str = False,
        extra_layers: Mapping[str, nn.Module] | None = None,
        extra_features: bool | str = False,
        covering: ProbeData | None = None,
        exact: bool = False,
    ) -> ProbeOutputs:
        weights = WeightsFingerprint(model)
        if step != self._step or weights != self._weights:
            self._step, self._weights, self._entries, self._failed_additions = step, weights, {}, set()
        key = (id(model), id(probe.dataset), id(probe.batch_to_xy))
        entries = self._entries.setdefault(key, [])
        head = resolve_head(model, features if isinstance(features, str) else None) if features else None
        for cached, cached_head in entries:
            if exact and not torch.equal(cached.indices, probe.indices):
                continue
            rows = _rows_of(cached.indices, probe)
            if rows is not None and set(layers) <= set(cached.activations) and head in (None, cached_head):
                return cached.take(rows, list(layers), features=head is not None)

        if key in self._failed_additions:  # what others added broke a pass at this step: not again
            covering, extra_layers, extra_features = None, None, False
        target = covering if covering is not None else probe
        same = next(((c, h) for c, h in entries if torch.equal(c.indices, target.indices)), None)
        plain = target is probe and not extra_layers and not extra_features and same is None
        try:
            optional = dict(extra_layers or {})
            pass_head = head
            if same is not None:  # a pass over these samples exists: the new one replaces it, recording its layers too
                optional.update({n: model.get_submodule(n) for n in same[0].activations})
                pass_head = pass_head or same[1]
            if pass_head is None and extra_features:
                pass_head = resolve_head(model, extra_features if isinstance(extra_features, str) else None)
            self.forward_passes += 1
            result = run_probe(model, target, layers, pool=True, features=pass_head or False, optional_layers=optional)
        except Exception:
            if plain:
                raise
            # what other readers added broke the pass (a head they guessed wrong, a layer they cannot read): run
            # the request alone, which raises if the request itself is the problem
            self._failed_additions.add(key)
            pass_head, same = head, None
            self.forward_passes += 1
            result = run_probe(model, probe, layers, pool=True, features=head or False)
        if same is not None:
            entries.remove(same)
        entries.append((result, pass_head))
        return result.take(_rows_of(result.indices, probe), list(layers), features=head is not None)


def _rows_of(cached_indices: torch.Tensor, probe: ProbeData) -> torch.Tensor | None:
    """Positions in ``cached_indices`` of every dataset index of ``probe``, in its order; ``None`` if one is missing."""
    lookup = torch.full((probe.dataset_size,), -1, dtype=torch.long)
    lookup[cached_indices] = torch.arange(len(cached_indices))
    rows = lookup[probe.indices]
    return None if bool((rows < 0).any()) else rows
