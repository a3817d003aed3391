"""ARM — the Aggregate Representation Measure (Sangarya, Bradford, Kim, arXiv 2405.09600, 2024).

One model, two datasets ``d1`` (reference) and ``d2`` (shifted). For every Conv / Linear layer ``l`` except
the output head, each unit ``u`` (a conv filter's map averaged over height and width) gives one scalar per
sample. With ``W1`` the 1-D Wasserstein distance between the two empirical activation distributions::

    ARM_l = (1 / U_l) * sum_u W1(a_{l,u}(d1), a_{l,u}(d2))        # per layer: mean over its units
    ARM   = (1 / L)   * sum_l ARM_l                               # aggregate: plain mean over layers

``W1`` is computed exactly from the quantile functions (no histograms)::

    W1(P, Q) = integral_0^1 | F_P^{-1}(q) - F_Q^{-1}(q) | dq

For empirical samples of sizes ``n`` and ``m`` both quantile functions are step functions with breakpoints
``i/n`` and ``j/m``; on every interval of the union of those breakpoints the integrand is constant, so the
integral is a finite weighted sum of differences of sorted samples. The breakpoints depend only on
``(n, m)``, so one set of gather indices and weights serves all units: the whole layer is two sorts, one
gather and one matrix-vector product.

The module also holds the retraining-cost side of the paper: :func:`measure_retraining_costs` retrains
copies of a model on shifted data until a target accuracy and records the cost; :class:`ARMCostModel` fits
cost against ARM and predicts the cost of a new shift.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..capture import ActivationRecorder, pool_spatial, select_layers
from ..probe import ProbeData, default_batch_to_xy, evaluation_mode, model_device, preserved_rng

Data = Union[Tensor, Dataset, DataLoader]

__all__ = [
    "ARMResult",
    "ARMCostModel",
    "CodeCarbonMeter",
    "EnergyMeter",
    "RetrainingCost",
    "wasserstein_1d",
    "arm_from_activations",
    "aggregate_representation_measure",
    "gaussian_noise_shift",
    "measure_retraining_costs",
    "record_activations",
    "resolve_energy_meter",
    "sort_samples",
]


# --------------------------------------------------------------------------------------------- Wasserstein


def _as_samples_by_units(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [samples, units], got {type(x).__name__}")
    if x.ndim == 1:
        x = x.unsqueeze(1)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [samples, units] (or [samples]), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no samples")
    return x if x.is_floating_point() else x.float()


def _quantile_merge(n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Gather indices into the sorted samples and interval widths over the union of breakpoints.

    Quantile levels are exact integers on the grid ``1 / lcm(n, m)``: breakpoints ``i * step_a`` (sample a,
    ``step_a = lcm / n``) and ``j * step_b`` (sample b). On the interval ``(t_{k-1}, t_k]`` the quantile
    functions take the sorted values with 0-based index ``t_{k-1} // step_a`` and ``t_{k-1} // step_b``.
    """
    g = math.gcd(n, m)
    step_a, step_b, total = m // g, n // g, n * m // g  # total = lcm(n, m)
    breaks = torch.cat(
        [
            torch.arange(0, total + 1, step_a, device=device),
            torch.arange(step_b, total, step_b, device=device),
        ]
    )
    breaks = torch.unique(breaks)  # sorted
    left = breaks[:-1]
    widths = (breaks[1:] - left).double() / total
    return left // step_a, left // step_b, widths


_SORT_POOL: ThreadPoolExecutor | None = None


def _forget_sort_pool() -> None:
    global _SORT_POOL
    _SORT_POOL = None  # a forked child inherits the pool object but not its threads


os.register_at_fork(after_in_child=_forget_sort_pool)


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread inside (restored after): its idle OpenMP workers would otherwise keep spinning on
    the cores the sorting threads need (measured: the first sort after a 2-thread torch op took 11 ms, not 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sort_by_unit(samples: Sequence[Tensor], then: Callable[..., Tensor] | None = None,
                  min_units_per_thread: int = 64) -> list[Tensor]:
    """Every ``[n_i, units]`` sample as ``[units, n_i]`` rows sorted ascending (each unit's quantile function).

    On CPU the sort goes through NumPy (``numpy.sort`` took 10-17 ms for 512 x 2,000 float32 values on the
    2-core machine of docs/benchmarks.md, ``torch.sort`` 30-150 ms), and the units are split into blocks over
    ``torch.get_num_threads()`` threads, each sorting its block of every transposed sample (NumPy and torch
    release the GIL). Other devices and dtypes use ``torch.sort``. Results are detached and contiguous.
    With ``then``, each block's sorted rows are passed to it in the same thread and the per-block results
    are concatenated and returned instead (a one-element list).
    """
    samples = [x.detach() for x in samples]
    units = samples[0].shape[1]
    if samples[0].device.type != "cpu" or any(x.dtype not in (torch.float32, torch.float64) for x in samples):
        rows = [x.t().sort(dim=1).values.contiguous() for x in samples]
        return [then(*rows)] if then is not None else rows

    def transpose(x: Tensor) -> Tensor:
        # Whole samples: torch copies a full [n, units] transpose 3x faster than a column block of it
        # (measured: 0.55 ms for 2,000 x 512 float32, 1.6 ms for half its columns).
        return torch.empty(x.shape[1], x.shape[0], dtype=x.dtype).copy_(x.t())

    def sort_block(bounds: tuple[int, int]) -> Tensor | None:
        lo, hi = bounds
        blocks = [rows[lo:hi] for rows in out]
        for block in blocks:
            block.numpy().sort(axis=1)
        return then(*blocks) if then is not None else None

    workers = max(1, min(torch.get_num_threads(), units // min_units_per_thread))
    bounds = [(i * units // workers, (i + 1) * units // workers) for i in range(workers)]
    with _one_torch_thread():
        if workers == 1:
            out = [transpose(x) for x in samples]
            results = [sort_block(bounds[0])]
        else:
            global _SORT_POOL
            if _SORT_POOL is None or _SORT_POOL._max_workers < workers:
                _SORT_POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="arm-sort")
            out = list(_SORT_POOL.map(transpose, samples))
            results = list(_SORT_POOL.map(sort_block, bounds))
    return [torch.cat(results)] if then is not None else out


def sort_samples(x: Tensor) -> Tensor:
    """Sort ``[n, units]`` samples along the sample axis (each unit's empirical quantile function).

    Returns a detached ``[n, units]`` view of a ``[units, n]`` contiguous tensor on ``x``'s device (see
    :func:`_sort_by_unit` for how).
    """
    return _sort_by_unit([x])[0].t()


def wasserstein_1d(a: Tensor, b: Tensor, assume_sorted: bool = False) -> Tensor:
    """Exact 1-D Wasserstein-1 distance between two samples, for every unit (column) at once.

    ``W1 = integral_0^1 |F_a^{-1}(q) - F_b^{-1}(q)| dq`` over the union of both samples' quantile breakpoints
    (ARM paper, per-unit distance; the same value as :func:`scipy.stats.wasserstein_distance`).

    Args:
        a: ``[n, units]`` (or ``[n]``) samples from the first distribution.
        b: ``[m, units]`` (or ``[m]``) samples from the second; ``m`` may differ from ``n``.
        assume_sorted: both are already sorted along the sample axis (e.g. by :func:`sort_samples`, to sort
            a reference once and compare it with many samples).

    Returns:
        ``[units]`` distances in the promoted float dtype of the inputs (a 0-d tensor for 1-D inputs).
        Non-finite samples give non-finite distances for their unit; callers decide what to do with them.
        The result is detached (this is a measurement, not a training loss).
    """
    squeeze = isinstance(a, Tensor) and isinstance(b, Tensor) and a.ndim == 1 and b.ndim == 1
    a, b = _as_samples_by_units(a, "a"), _as_samples_by_units(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same number of units, got {a.shape[1]} and {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} and b on {b.device}; put both on one device")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    # One temporary, made absolute in place: a second fresh [units, n] buffer cost 4-6 ms (page faults) when
    # glibc served it from new pages, more than the distance itself.
    if a.shape[0] == b.shape[0]:
        distance = lambda a_rows, b_rows: (a_rows - b_rows).abs_().sum(dim=1).div_(a_rows.shape[1])  # noqa: E731
    else:
        idx_a, idx_b, widths = _quantile_merge(a.shape[0], b.shape[0], a.device)
        widths = widths.to(dtype)
        def distance(a_rows: Tensor, b_rows: Tensor) -> Tensor:  # index_select: 3x faster than a_rows[:, idx]
            return (a_rows.index_select(1, idx_a) - b_rows.index_select(1, idx_b)).abs_() @ widths
    if assume_sorted:  # contiguous [units, n] rows when they come from sort_samples
        with _one_torch_thread() if a.device.type == "cpu" else contextlib.nullcontext():
            dist = distance(a.t(), b.t())
    else:  # sorted and compared block by block in the sorting threads
        dist = _sort_by_unit([a, b], then=distance)[0]
    return dist.squeeze(0) if squeeze else dist


# ------------------------------------------------------------------------------------------------ ARM math


@dataclass
class ARMResult:
    """ARM between two activation sets.

    Attributes:
        aggregate: ARM, the plain mean of ``per_layer`` (NaN when every layer was skipped).
        per_layer: ``{layer: ARM_l}``, the mean per-unit Wasserstein distance of each layer.
        per_unit: ``{layer: Tensor[units]}``, the per-unit distances (on CPU).
        skipped: layers left out because their activations held NaN/inf.
    """

    aggregate: float
    per_layer: dict[str, float]
    per_unit: dict[str, Tensor] = field(default_factory=dict, repr=False)
    skipped: list[str] = field(default_factory=list)


def _units_view(acts: Tensor) -> Tensor:
    """``[N, units]``; conv maps ``[N, C, *spatial]`` are averaged over space (one scalar per filter)."""
    return acts.unsqueeze(1) if acts.ndim == 1 else pool_spatial(acts)


def arm_from_activations(
    acts_a: Mapping[str, Tensor],
    acts_b: Mapping[str, Tensor],
    warn_skipped: bool = True,
    assume_sorted: bool = False,
) -> ARMResult:
    """ARM from recorded activations (ARM paper: ``ARM_l`` mean over units, ``ARM`` mean over layers).

    Args:
        acts_a: ``{layer: [n, units]}`` on the reference data (``[n, C, H, W]`` maps are averaged over space).
        acts_b: ``{layer: [m, units]}`` on the other data, same layers.
        warn_skipped: one warning naming the layers whose activations contain NaN/inf (they are skipped
            either way; ``ARMResult.skipped`` lists them).
        assume_sorted: every ``[n, units]`` tensor is already sorted along the samples (:func:`sort_samples`).
    """
    missing = sorted(set(acts_a) ^ set(acts_b))
    if missing:
        raise ValueError(
            f"acts_a and acts_b must hold the same layers; only in one of them: {missing} "
            f"(acts_a has {sorted(acts_a)}, acts_b has {sorted(acts_b)})"
        )
    if not acts_a:
        raise ValueError("no layers given: acts_a and acts_b are empty")
    per_layer: dict[str, float] = {}
    per_unit: dict[str, Tensor] = {}
    skipped: list[str] = []
    for name in acts_a:
        a, b = _units_view(acts_a[name]), _units_view(acts_b[name])
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"layer {name!r}: {a.shape[1]} units on data a but {b.shape[1]} on data b")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            skipped.append(name)
            continue
        dist = wasserstein_1d(a, b, assume_sorted=assume_sorted)
        per_unit[name] = dist.detach().cpu()
        per_layer[name] = float(dist.mean())
    if skipped and warn_skipped:
        warnings.warn(
            f"ARM skipped layer(s) {skipped}: their activations contain NaN or inf", RuntimeWarning, stacklevel=2
        )
    aggregate = sum(per_layer.values()) / len(per_layer) if per_layer else float("nan")
    return ARMResult(aggregate, per_layer, per_unit, skipped)


# ---------------------------------------------------------------------------------------- ARM on a model


def _input_batches(data: Data, batch_size: int, name: str) -> Iterator[Tensor]:
    """The input part of every batch of ``data`` (a Tensor of inputs, a Dataset or a DataLoader)."""
    if isinstance(data, Tensor):
        if data.ndim == 0 or len(data) == 0:
            raise ValueError(f"{name} is an empty tensor (shape {tuple(data.shape)})")
        yield from data.split(batch_size)
    elif isinstance(data, DataLoader):
        for batch in data:
            yield default_batch_to_xy(batch)[0]
    elif isinstance(data, Dataset):
        for x, _, _ in ProbeData(data, batch_size=batch_size).batches():
            yield x
    else:
        raise TypeError(f"{name} must be a Tensor of inputs, a Dataset or a DataLoader, got {type(data).__name__}")


def _input_shape(data: Data, batch_size: int, name: str) -> tuple[int, ...]:
    first = next(_input_batches(data, batch_size, name), None)
    if first is None:
        raise ValueError(f"{name} is empty: it yields no batch")
    return tuple(first.shape[1:])


def record_activations(
    model: nn.Module, data: Data, layers: Mapping[str, nn.Module], batch_size: int = 256, name: str = "data"
) -> dict[str, Tensor]:
    """``{layer: [N, units]}`` over ``data`` (conv maps averaged over space), on the CPU.

    The model runs under :func:`~lightning_interp.probe.evaluation_mode` (eval, no grad; modes and RNG
    restored); hooks are removed on exit.
    """
    device = model_device(model)
    with evaluation_mode(model), ActivationRecorder(model, layers, pool=True) as recorder:
        for x in _input_batches(data, batch_size, name):
            model(x.to(device))
    acts = recorder.stacked()
    if not acts:
        raise ValueError(f"{name} is empty: it yields no batch")
    return {layer: act.float() for layer, act in acts.items()}


def aggregate_representation_measure(
    model: nn.Module,
    data_a: Data,
    data_b: Data,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
) -> ARMResult:
    """ARM of ``model`` between reference data ``data_a`` (d1) and shifted data ``data_b`` (d2).

    ``ARM = mean_l mean_u W1(a_{l,u}(d1), a_{l,u}(d2))`` over the Conv/Linear layers, output head excluded
    (ARM paper). Cost: two forward passes (one per dataset) and two sorts of ``[N, units]`` per layer.

    Args:
        model: any ``nn.Module`` (a ``LightningModule`` too); weights, buffers, modes and RNG are left as found.
        data_a, data_b: a Tensor of inputs, a Dataset (inputs first in each item) or a DataLoader (batches
            ``(x, ...)``, a dict with an input key, or bare inputs). Input shapes must match; sizes may differ.
        layers: ``fnmatch`` globs over module names; default: every Conv/Linear layer but the output head.
        batch_size: batch size for Tensor and Dataset inputs.

    Returns:
        :class:`ARMResult`. Layers whose activations hold NaN/inf are skipped with one warning naming them.
    """
    shape_a, shape_b = _input_shape(data_a, batch_size, "data_a"), _input_shape(data_b, batch_size, "data_b")
    if shape_a != shape_b:
        raise ValueError(f"data_a and data_b have different input shapes: {shape_a} vs {shape_b}")
    chosen = select_layers(model, include=list(layers) if layers is not None else None)
    acts_a = record_activations(model, data_a, chosen, batch_size, "data_a")
    acts_b = record_activations(model, data_b, chosen, batch_size, "data_b")
    return arm_from_activations(acts_a, acts_b)


# ------------------------------------------------------------------------------------- retraining cost


def gaussian_noise_shift(x: Tensor, level: float, generator: torch.Generator) -> Tensor:
    """``x + level * N(0, 1)`` — the paper's noise shift (one fresh draw per call, from ``generator``)."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return x + level * noise.to(x.device)


class EnergyMeter(Protocol):
    """What :func:`measure_retraining_costs` needs from an energy tracker."""

    def start(self) -> None: ...

    def stop(self) -> tuple[float | None, float | None]:
        """Energy in kWh and emissions in kg CO2-eq since :meth:`start`."""


class CodeCarbonMeter:
    """:class:`EnergyMeter` over CodeCarbon's ``OfflineEmissionsTracker`` (no network, no files)."""

    def __init__(self, country_iso_code: str = "USA") -> None:
        codecarbon = importlib.import_module("codecarbon")
        self._tracker = codecarbon.OfflineEmissionsTracker(
            country_iso_code=country_iso_code, save_to_file=False, log_level="error"
        )

    def start(self) -> None:
        self._tracker.start()

    def stop(self) -> tuple[float | None, float | None]:
        co2_kg = self._tracker.stop()
        energy = getattr(getattr(self._tracker, "final_emissions_data", None), "energy_consumed", None)
        return (float(energy) if energy is not None else None, float(co2_kg) if co2_kg is not None else None)


def resolve_energy_meter(tracker: str | Callable[[], EnergyMeter] | None) -> Callable[[], EnergyMeter] | None:
    """``"auto"``: CodeCarbon when installed, else none; ``"codecarbon"``: required; ``None``/``"none"``: none;
    or a factory returning an :class:`EnergyMeter`."""
    if tracker is None or tracker == "none":
        return None
    if callable(tracker):
        return tracker
    available = importlib.util.find_spec("codecarbon") is not None
    if tracker == "auto":
        return CodeCarbonMeter if available else None
    if tracker == "codecarbon":
        if not available:
            raise ImportError("tracker='codecarbon' but codecarbon is not installed (pip install codecarbon)")
        return CodeCarbonMeter
    raise ValueError(f"tracker must be 'auto', 'codecarbon', 'none', None or a factory; got {tracker!r}")


@dataclass
class RetrainingCost:
    """The cost of adapting a model to one shift (ARM paper's protocol: retrain until a target accuracy).

    ``epochs`` is the first epoch at which the retrained copy reached ``target_accuracy`` (0: the model already
    did before retraining); when it never did, the epochs run (``reached=False``, a censored value).
    ``seconds`` is the wall time of those epochs (training and the per-epoch evaluation). ``energy_kwh`` and
    ``co2_kg`` cover the whole retraining run and are ``None`` when no tracker was available: never estimated.
    ``accuracy_curve[e]`` is the shifted-test accuracy after ``e`` epochs.
    """

    shift: float
    arm: float
    arm_per_layer: dict[str, float]
    accuracy_before: float
    best_accuracy: float
    target_accuracy: float
    epochs: int
    reached: bool
    seconds: float
    energy_kwh: float | None = None
    co2_kg: float | None = None
    accuracy_curve: list[float] = field(default_factory=list, repr=False)


def _accuracy(model: nn.Module, state: dict[str, Tensor], x: Tensor, y: Tensor, batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            logits = torch.func.functional_call(model, state, (xb,))
            correct += int((logits.argmax(dim=1) == yb).sum())
    return correct / len(y)


def _retraining_curve(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    should_stop: Callable[[list[float]], bool],
    max_epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[list[float], list[float]]:
    """Retrain a functional copy of ``model`` (cloned parameters and buffers through
    ``torch.func.functional_call``; the model's own tensors are never updated) with Adam on ``train``.

    Returns the test accuracy after each epoch (index 0: before retraining) and the cumulative seconds.
    The caller restores the modules' train/eval flags.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    state = {**params, **{k: v.detach().clone() for k, v in model.named_buffers()}}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    x_train, y_train = train
    started = time.perf_counter()
    model.eval()
    accuracies, seconds = [_accuracy(model, state, *test, batch_size)], [0.0]
    while len(accuracies) <= max_epochs and not should_stop(accuracies):
        model.train()
        for batch in torch.randperm(len(y_train), generator=generator, device=generator.device).split(batch_size):
            loss = F.cross_entropy(torch.func.functional_call(model, state, (x_train[batch],)), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        accuracies.append(_accuracy(model, state, *test, batch_size))
        seconds.append(time.perf_counter() - started)
    return accuracies, seconds


def _plateaued(patience: int, min_delta: float) -> Callable[[list[float]], bool]:
    """Early-stopping rule: the last gain of at least ``min_delta`` over the best so far is ``patience`` epochs old."""

    def stop(accuracies: list[float]) -> bool:
        best, best_at = accuracies[0], 0
        for epoch, accuracy in enumerate(accuracies):
            if accuracy >= best + min_delta:
                best, best_at = accuracy, epoch
        return len(accuracies) - 1 - best_at >= patience

    return stop


def measure_retraining_costs(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    shifts: Sequence[float],
    shift_fn: Callable[[Tensor, float, torch.Generator], Tensor] = gaussian_noise_shift,
    target_accuracy: float | None = None,
    plateau_fraction: float = 0.95,
    patience: int = 5,
    min_delta: float = 0.01,
    max_epochs: int = 40,
    lr: float = 1e-3,
    batch_size: int = 128,
    layers: Sequence[str] | None = None,
    tracker: Literal["auto", "codecarbon", "none"] | Callable[[], EnergyMeter] | None = "auto",
    seed: int = 0,
) -> list[RetrainingCost]:
    """(ARM, retraining cost) pairs, one per shift level: the data for :class:`ARMCostModel`.

    For each level: shift the training and test inputs with ``shift_fn(x, level, generator)``; ARM of ``model``
    between the clean and the shifted test inputs; then retrain a copy of ``model`` on the shifted training
    set and count the epochs until its accuracy on the shifted test set reaches the target (ARM paper's cost
    protocol: "until a target accuracy, or a plateau"), with wall seconds and, when a tracker is available,
    energy and CO2.

    Two targets:

    * ``target_accuracy`` given: a fixed accuracy; retraining stops when it is reached (or at ``max_epochs``,
      then ``reached=False``). A fixed target that a strong shift cannot reach turns the cost into ``max_epochs``.
    * ``target_accuracy=None`` (default): retraining runs to its plateau (no gain of ``min_delta`` for
      ``patience`` epochs, or ``max_epochs``) and the target is ``plateau_fraction`` of the best accuracy it
      attained: the epochs needed to recover most of what retraining can recover on that shift.

    Args:
        model: a trained classifier returning logits; left exactly as found (weights, buffers, modes, RNG).
        train, test: ``(x, y)`` tensors of the clean data.
        shifts: shift levels, e.g. Gaussian noise standard deviations.
        max_epochs: cap per level (cost: up to ``len(shifts) * max_epochs`` training epochs).
        tracker: ``"auto"`` uses CodeCarbon when installed; without a tracker energy/CO2 stay ``None``.
        seed: per level, the training inputs are shifted with a generator seeded ``seed`` (which then shuffles),
            the test inputs with one seeded ``seed + 1``; dropout is seeded with ``seed``.
    """
    if not shifts:
        raise ValueError("shifts is empty: give at least one shift level")
    if max_epochs < 1 or patience < 1:
        raise ValueError(f"max_epochs and patience must be >= 1, got {max_epochs} and {patience}")
    if target_accuracy is not None and not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1] or None, got {target_accuracy}")
    if not 0.0 < plateau_fraction <= 1.0:
        raise ValueError(f"plateau_fraction must be in (0, 1], got {plateau_fraction}")
    meter_factory = resolve_energy_meter(tracker)
    device = model_device(model)
    x_train, y_train = (t.to(device) for t in train)
    x_test, y_test = (t.to(device) for t in test)
    if target_accuracy is None:
        should_stop = _plateaued(patience, min_delta)
    else:
        def should_stop(accuracies: list[float]) -> bool:
            return accuracies[-1] >= target_accuracy

    records = []
    for level in shifts:
        generator = torch.Generator(device=device).manual_seed(seed)
        shifted_train = shift_fn(x_train, float(level), generator)
        shifted_test = shift_fn(x_test, float(level), torch.Generator(device=device).manual_seed(seed + 1))
        arm = aggregate_representation_measure(model, x_test, shifted_test, layers=layers, batch_size=batch_size)
        meter = meter_factory() if meter_factory is not None else None
        modes = [(m, m.training) for m in model.modules()]
        with preserved_rng():
            torch.manual_seed(seed)
            if meter is not None:
                meter.start()
            try:
                curve, seconds = _retraining_curve(
                    model, (shifted_train, y_train), (shifted_test, y_test), should_stop, max_epochs, lr,
                    batch_size, generator,
                )
            finally:
                energy, co2 = meter.stop() if meter is not None else (None, None)
                for module, mode in modes:
                    module.training = mode
        target = target_accuracy if target_accuracy is not None else plateau_fraction * max(curve)
        epochs = next((e for e, acc in enumerate(curve) if acc >= target), len(curve) - 1)
        records.append(
            RetrainingCost(
                shift=float(level),
                arm=arm.aggregate,
                arm_per_layer=arm.per_layer,
                accuracy_before=curve[0],
                best_accuracy=max(curve),
                target_accuracy=float(target),
                epochs=epochs,
                reached=curve[epochs] >= target,
                seconds=seconds[epochs],
                energy_kwh=energy,
                co2_kg=co2,
                accuracy_curve=curve,
            )
        )
    return records


class ARMCostModel:
    """Retraining cost as a function of ARM: least squares ``cost = intercept_ + coef_ * ARM`` (or a polynomial
    of ``degree`` in ARM), fit on measured pairs (ARM paper: ARM predicts retraining epochs / time / energy).

    Predictions are clipped at 0 (a cost is never negative).

    Attributes (after :meth:`fit`):
        coef_: ``[degree]`` coefficients of ARM, ARM², ...
        intercept_: cost at ARM = 0.
        n_samples_: pairs used (pairs with a missing cost are dropped).
        spearman_, pearson_: rank and linear correlation of ARM with the cost on the fitted pairs.
        target_: the cost that was fitted (``"epochs"``, ``"seconds"``, ``"energy_kwh"``, ... or ``"cost"``).
    """

    def __init__(self, degree: int = 1) -> None:
        if not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be an int >= 1, got {degree!r}")
        self.degree = degree

    def _design(self, arm: Tensor) -> Tensor:
        return torch.stack([arm**power for power in range(self.degree + 1)], dim=1)

    def fit(self, arm: Sequence[float] | Tensor, cost: Sequence[float | None] | Tensor, target: str = "cost"):
        """Fit on pairs; entries whose cost is ``None`` or NaN (e.g. energy without a tracker) are dropped."""
        arm_t = torch.as_tensor(list(arm) if not isinstance(arm, Tensor) else arm, dtype=torch.float64).flatten()
        cost_values = cost.tolist() if isinstance(cost, Tensor) else list(cost)
        cost_t = torch.tensor([math.nan if c is None else float(c) for c in cost_values], dtype=torch.float64)
        if arm_t.shape != cost_t.shape:
            raise ValueError(f"arm and cost need one value per pair; got {arm_t.numel()} and {cost_t.numel()}")
        keep = torch.isfinite(arm_t) & torch.isfinite(cost_t)
        if int(keep.sum()) < self.degree + 1:
            raise ValueError(
                f"ARMCostModel(degree={self.degree}) needs at least {self.degree + 1} pairs with a measured "
                f"{target}; got {int(keep.sum())} of {len(cost_t)} (energy/CO2 are None without a tracker)"
            )
        arm_t, cost_t = arm_t[keep], cost_t[keep]
        solution = torch.linalg.lstsq(self._design(arm_t), cost_t.unsqueeze(1)).solution.squeeze(1)
        self.intercept_ = float(solution[0])
        self.coef_ = solution[1:].clone()
        self.n_samples_ = int(keep.sum())
        self.target_ = target
        self.pearson_ = _pearson(arm_t, cost_t)
        self.spearman_ = _pearson(_ranks(arm_t), _ranks(cost_t))
        return self

    def fit_records(self, records: Sequence[RetrainingCost], target: str = "epochs"):
        """Fit on :func:`measure_retraining_costs` output; ``target`` is a cost field of :class:`RetrainingCost`."""
        fields = ("epochs", "seconds", "energy_kwh", "co2_kg")
        if target not in fields:
            raise ValueError(f"target must be one of {fields}, got {target!r}")
        return self.fit([r.arm for r in records], [getattr(r, target) for r in records], target=target)

    def predict(self, arm: float | Sequence[float] | Tensor) -> Tensor:
        """Predicted cost for each ARM value (clipped at 0)."""
        if not hasattr(self, "coef_"):
            raise RuntimeError("ARMCostModel is not fitted yet: call fit() or fit_records() first")
        arm_t = torch.as_tensor(arm, dtype=torch.float64).flatten()
        weights = torch.cat([torch.tensor([self.intercept_], dtype=torch.float64), self.coef_])
        return (self._design(arm_t) @ weights).clamp_min(0.0)


def _ranks(values: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), as in Spearman's correlation."""
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    unique, inverse = torch.unique(values, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, torch.ones_like(values))
    return (sums / counts)[inverse]


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a @ b) / denominator) if denominator > 0 else math.nan
