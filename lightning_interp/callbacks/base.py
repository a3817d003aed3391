"""``InterpretationCallback``: what every lightning_interp callback shares.

A subclass sets :attr:`tag` and implements :meth:`compute`. The base decides when to run it, on which probe
data (optionally a coreset of it), runs it without disturbing training, keeps its alerts and state, and turns
failures into one warning unless ``strict=True``.
"""

from __future__ import annotations

import ast
import contextlib
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._lightning import Callback
from ..alerts import Alert, AlertPolicy, InterpretationAlert, InterpretationWarning, validate_action
from ..budget import OverheadBudget, check_max_overhead, within_budget
from ..capture import resolve_head, select_layers
from ..distributed import fail_together, gather_by_index, rank_zero_buffers, shard_positions
from ..probe import (
    BatchToXY,
    UnreadableLayers,
    ProbeCache,
    ProbeData,
    ProbeDataError,
    ProbeOutputs,
    default_batch_to_xy,
    inputs_in_model_dtype,
)
from ..report import Reporter, markdown_table

ProbeSource = Union[Literal["train", "val"], Dataset]

#: One forward-pass cache per LightningModule, shared by every callback of this package.
_CACHES: "weakref.WeakKeyDictionary[nn.Module, ProbeCache]" = weakref.WeakKeyDictionary()


def probe_cache(module: nn.Module) -> ProbeCache:
    """The forward-pass cache shared by all callbacks attached to ``module``."""
    cache = _CACHES.get(module)
    if cache is None:
        cache = _CACHES[module] = ProbeCache()
    return cache


def loader_list(loaders) -> list:
    """A trainer's dataloaders (one, a list or a dict of them, or ``None``) as a list."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


_WARNED_PER_TRAINER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainer -> warning keys given


def training_step_key(trainer) -> tuple:
    """Where training stands (step, epoch, stage): results computed at one key see the same weights."""
    return trainer.global_step, trainer.current_epoch, trainer.state.stage


def warn_once_per_trainer(trainer, key: str, message: str) -> None:
    """One warning per trainer for ``key`` (on rank zero), whichever of its callbacks meets the cause first."""
    given = _WARNED_PER_TRAINER.setdefault(trainer, set())
    if key not in given:
        given.add(key)
        if getattr(trainer, "is_global_zero", True):
            warnings.warn(message, InterpretationWarning, stacklevel=3)


_BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def _from_lightning(module_name: str) -> bool:
    return module_name in ("lightning", "pytorch_lightning") or module_name.startswith(
        ("lightning.", "pytorch_lightning."))


def overridden_batch_hooks(*owners) -> list[str]:
    """``Class.hook`` for each batch-transfer hook that one of ``owners`` (a LightningModule, a datamodule) defines
    itself, in its class or on the instance, rather than inheriting Lightning's default."""
    found = []
    for owner in owners:
        if owner is None:
            continue
        for name in _BATCH_HOOKS:
            defined_in = "" if name in vars(owner) else next(
                (c.__module__ for c in type(owner).__mro__ if name in c.__dict__), "lightning")
            if not _from_lightning(defined_in):
                found.append(f"{type(owner).__name__}.{name}")
    return found


def check_data_source(name: str, source: object, optional: bool = False) -> None:
    """Fail at construction on a data argument that is not ``"train"``, ``"val"``, a map-style Dataset (or
    ``None`` where ``optional``), saying how to turn what was given into one."""
    if source is None and optional:
        return
    if isinstance(source, str):
        if source not in ("train", "val"):
            raise ValueError(f"{name} must be 'train', 'val' or a Dataset, got {source!r}")
        return
    hint = {DataLoader: f"pass its dataset ({name}=loader.dataset): probes read samples by index with a loader "
                        "of their own",
            torch.Tensor: f"wrap it with its labels: {name}=TensorDataset(x, y)",
            np.ndarray: f"wrap it with its labels: {name}=TensorDataset(torch.as_tensor(x), torch.as_tensor(y))"}
    for kind, advice in hint.items():
        if isinstance(source, kind):
            raise TypeError(f"{name} got a {type(source).__name__}; {advice}")
    if not (isinstance(source, Dataset) or (hasattr(source, "__getitem__") and hasattr(source, "__len__"))):
        raise TypeError(f"{name} must be 'train', 'val'{', None' if optional else ''} or a map-style Dataset, "
                        f"got a {type(source).__name__}")


def resolve_dataset(trainer, source: ProbeSource, argument: str = "probe") -> Dataset:
    """The dataset behind ``"train"`` / ``"val"`` for this trainer, or ``source`` itself if it is a dataset.

    ``argument`` names the callback argument that asked, for the error message.
    """
    map_style = hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, str)
    if isinstance(source, Dataset) or map_style:
        return source  # type: ignore[return-value]
    if source not in ("train", "val"):
        raise ValueError(f"{argument} must be 'train', 'val' or a Dataset, got {source!r}")
    loaders = trainer.train_dataloader if source == "train" else trainer.val_dataloaders
    if loaders is None:
        loaders = declared_loaders(trainer, source)
    loaders = loader_list(loaders)
    if len(loaders) > 1:
        warn_once_per_trainer(trainer, f"loaders:{source}", f"the trainer has {len(loaders)} {source} dataloaders; "
                              f"{source!r} here means the first one's dataset (pass a Dataset to analyse another)")
    dataset = getattr(next(iter(loaders), None), "dataset", None)
    if dataset is None:
        raise ProbeDataError(
            f"{argument}={source!r} but the trainer has no {source} dataloader with a dataset; "
            f"pass {argument}='train', {argument}='val' (with validation data) or {argument}=<a Dataset>"
        )
    return dataset


def _declared_source(trainer, source: str):
    """Lightning's record of where the fit's ``source`` loaders come from (``None`` in another Lightning layout)."""
    try:
        return (trainer.fit_loop if source == "train" else trainer.fit_loop.epoch_loop.val_loop)._data_source
    except AttributeError:
        return None


def has_val_source(trainer) -> bool:
    """Whether the trainer was given validation data (dataloaders, a datamodule or the module's hook)."""
    data_source = _declared_source(trainer, "val")
    return True if data_source is None else bool(data_source.is_defined())  # unknown layout: the analysis decides


def declared_loaders(trainer, source: str):
    """The ``source`` loaders the user gave the trainer (to ``fit``, in a datamodule or as the module's hook), asked
    for before Lightning loads them itself: the val loaders are loaded at the first validation, which comes later
    than an epoch's end with ``check_val_every_n_epoch > 1`` and never with ``limit_val_batches=0``."""
    data_source = _declared_source(trainer, source)
    if data_source is not None and data_source.is_defined():
        return data_source.dataloader()
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader() if source == "train" else trainer.datamodule.val_dataloader()
    return None


@dataclass(frozen=True)
class PendingRead:
    """What a callback's coming analysis reads: ``layers`` (pooled) and, with ``features``, the output head's
    input, from ``dataset`` split by ``batch_to_xy``, all of it (``whole``) or a coreset."""

    dataset: Dataset
    batch_to_xy: BatchToXY
    whole: bool
    layers: dict[str, nn.Module]
    features: bool | str  # the head whose input is read (``head or True``), or False


class InterpretationCallback(Callback):
    """Base of the plugin's callbacks.

    Args:
        every_n_epochs: run :meth:`compute` at the end of every n-th training epoch (0 only for callbacks
            driven by other events such as checkpoints: it disables the schedule).
        max_overhead: a budget, as a share of the fit's wall time (0.05 = 5%): an analysis that comes due (on the
            epoch schedule, or at a checkpoint for ComponentAttribution) is postponed while running it, at the last
            one's cost, would lift this callback's analyses above that share; it runs at the first epoch end (or
            checkpoint) where it fits. The first analysis always runs. ``None`` (default): every one runs.
        probe: the data analysed — ``"val"``, ``"train"`` or a map-style ``Dataset``.
        probe_size: analyse a coreset of the probe: a fraction in (0, 1] or a number of samples; ``None`` uses
            all of it.
        probe_selector: how the coreset is chosen: ``"random"``, ``"kcenter"``, ``"uncertainty"``, ``"herding"``.
        probe_balance: choose the coreset class-balanced.
        probe_fidelity: when a coreset is chosen, also compute the result once on the full probe (or a 2,048
            sample of it) and log their agreement (Spearman, top-k Jaccard).
        reselect_every_n_epochs: choose the coreset again every n epochs (``None``: once).
        layers: ``fnmatch`` globs of layer names; ``None`` takes every Conv/Linear layer but the output head.
        head: name of the output layer (its input is the penultimate feature vector; it is left out of the default
            layers); ``None`` takes the last Conv/Linear registered, which is wrong when an unused or auxiliary
            layer is registered after the real head.
        batch_size: batch size of the probe's own loader.
        alert_action: ``"warn"``, ``"stop"`` (end training, DDP-safe) or ``"raise"``.
        strict: re-raise errors inside the callback instead of warning once and letting training go on.
        seed: seed of every random choice the callback makes (coresets, masks).
        batch_to_xy: a function ``batch -> (x, y)`` when batches are not ``(x, y, ...)`` or a common dict.
        alert_hooks: functions called with each :class:`~lightning_interp.Alert`.

    Attributes:
        alerts_: every alert raised so far (kept in checkpoints).
        probe_: the resolved probe (dataset and indices) last analysed.
        coreset_: the last coreset selection: epoch, probe_size, selector, balance, size, of (probe length),
            indices and fidelity.
        skipped_: ``{"epoch", "error"}`` of every analysis that failed and was skipped (one warning per cause).
        cost_: what the analyses cost in this fit: ``runs``, ``seconds`` (wall time inside them), ``last_seconds``,
            ``share`` (``seconds`` over the fit's wall time so far) and ``postponed`` (scheduled analyses
            ``max_overhead`` postponed); logged as ``<tag>/cost/seconds`` and ``<tag>/cost/share`` at every run (and
            ``<tag>/cost/postponed`` at every postponement), so the overhead on your own training shows in
            TensorBoard.
    """

    tag: ClassVar[str] = "interp"
    chart_category: ClassVar[str] = "probes"  # the callback's category in TensorBoard's Custom Scalars tab
    fidelity_reference_size: ClassVar[int] = 2048

    def __init__(
        self,
        *,
        every_n_epochs: int = 1,
        max_overhead: float | None = None,
        probe: ProbeSource = "val",
        probe_size: Union[int, float, None] = None,
        probe_selector: str = "random",
        probe_balance: bool = False,
        probe_fidelity: bool = True,
        reselect_every_n_epochs: int | None = None,
        layers: list[str] | None = None,
        head: str | None = None,
        batch_size: int = 256,
        alert_action: str = "warn",
        strict: bool = False,
        seed: int = 0,
        batch_to_xy: BatchToXY | None = None,
        alert_hooks: Sequence[Callable[[Alert], None]] = (),
    ) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be an int >= 0, got {every_n_epochs!r}")
        if every_n_epochs == 0 and self.runs_on_epoch_schedule:
            raise ValueError(f"every_n_epochs=0 would never run {type(self).__name__} (it runs on the epoch "
                             "schedule only); use every_n_epochs >= 1, or leave the callback out")
        check_max_overhead(max_overhead)
        check_data_source("probe", probe)
        if probe_size is not None:
            if isinstance(probe_size, bool) or not isinstance(probe_size, (int, float)):
                raise ValueError(
                    f"probe_size must be a fraction in (0, 1], a sample count, or None; got {probe_size!r}")
            if isinstance(probe_size, float) and not 0.0 < probe_size <= 1.0:
                raise ValueError(f"probe_size as a fraction must be in (0, 1], got {probe_size}")
            if isinstance(probe_size, int) and probe_size < 1:
                raise ValueError(f"probe_size as a count must be >= 1, got {probe_size}")
        from ..methods.coreset import SELECTORS

        if probe_selector not in SELECTORS:
            raise ValueError(f"probe_selector must be one of {SELECTORS}, got {probe_selector!r}")
        if reselect_every_n_epochs is not None and reselect_every_n_epochs < 1:
            raise ValueError(f"reselect_every_n_epochs must be >= 1 or None, got {reselect_every_n_epochs}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(layers, str):
            layers = [layers]
        ignored = [f"{name}={value!r}" for name, value, default in [
            ("probe_selector", probe_selector, "random"), ("reselect_every_n_epochs", reselect_every_n_epochs, None),
        ] if value != default]
        if probe_size is None and ignored:
            warnings.warn(f"{type(self).__name__}: {', '.join(ignored)} only apply to a coreset, and probe_size=None "
                          "analyses the whole probe; set probe_size to use them", InterpretationWarning, stacklevel=2)
        self.every_n_epochs = every_n_epochs
        self.max_overhead = max_overhead
        self._budget = OverheadBudget(max_overhead) if max_overhead is not None else None
        self.probe = probe
        self.probe_size = probe_size
        self.probe_selector = probe_selector
        self.probe_balance = probe_balance
        self.probe_fidelity = probe_fidelity
        self.reselect_every_n_epochs = reselect_every_n_epochs
        self.layers = list(layers) if layers is not None else None
        if head is not None and (not isinstance(head, str) or not head):
            raise ValueError(f"head must be a module name or None, got {head!r}")
        self.head = head
        self.batch_size = batch_size
        self.alert_action = validate_action(alert_action)
        self.strict = strict
        self.seed = seed
        self.batch_to_xy = batch_to_xy
        self.policy = AlertPolicy(alert_action, alert_hooks)

        self.alerts_: list[Alert] = []
        self.probe_: ProbeData | None = None
        self.coreset_: dict[str, Any] | None = None
        self._stage: str | None = None  # the trainer stage being set up: checkpoints rewind history only in "fit"
        self._smoke_test = False  # Trainer(fast_dev_run=...): every scheduled analysis runs on its one epoch
        self._holds_history = False
        self._history_trainer: weakref.ref | None = None  # the Trainer whose fit the history comes from
        self._restored_this_fit = False
        self._probe_indices: torch.Tensor | None = None
        self._selected_epoch: int | None = None
        self._warned: set[str] = set()
        self._silent_layers: set[str] = set()  # default layers found not to run in forward()
        self._last_run_step: tuple | None = None  # training_step_key of the latest run
        self._after_training = False  # the final-model run of on_train_end
        self._fit_start = (0, 0)  # (global step, epoch) the fit's training started from (a resumed fit: later)
        self.skipped_: list[dict[str, Any]] = []
        self.cost_: dict[str, float] = _fresh_cost()
        self._fit_clock: float | None = None
        self._restored_pending = False  # a checkpoint saved while an analysis waited for the budget
        self._reporter: Reporter | None = None
        self._state_key: str | None = None

    # -- what subclasses implement ------------------------------------------------------------------------
    def compute(self, trainer, pl_module, probe: ProbeData) -> None:
        """Analyse ``probe`` now; log through :attr:`reporter`, raise alerts through :meth:`alert`."""
        raise NotImplementedError

    def fidelity_scores(self, trainer, pl_module, probe: ProbeData) -> torch.Tensor | None:
        """The callback's result on ``probe`` as a score vector (or ``{layer: vector}``, compared layer by layer),
        to compare a coreset with the full probe.

        ``None`` (the default) means the callback has no such vector; no fidelity is then reported.
        """
        return None

    def activation_profile(self, trainer, pl_module, probe: ProbeData) -> dict[str, torch.Tensor]:
        """``{"<layer>/mean": per-unit means, "<layer>/std": per-unit stds}`` of the analysed layers' pooled
        activations over ``probe``, from its finite rows (layers with fewer than two are left out): the
        distribution a coreset must keep for results computed from activation distributions. ``coreset.fidelity``
        compares each vector on its own (means and stds in one ranking would agree through their offset alone)."""
        outs = self.forward_probe(trainer, pl_module, probe, self.select_layers(pl_module))
        profile = {}
        for name, act in outs.activations.items():
            rows = act.flatten(1)
            rows = rows[rows.isfinite().all(1)]
            if len(rows) >= 2:
                profile[f"{name}/mean"], profile[f"{name}/std"] = rows.mean(0), rows.std(0)
        return profile

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- Lightning hooks ----------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Names this callback's state in checkpoints (computed once: Lightning reads it at every hook call)."""
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self._state_key_fields())
        return self._state_key

    def _state_key_fields(self) -> dict[str, Any]:
        """What tells two instances apart in one Trainer: the data they analyse, not their hyper-parameters
        (so a resumed run with, say, another schedule still finds its history; two instances that differ only
        in hyper-parameters make Lightning raise at once instead of mixing their states)."""
        return {"tag": self.tag, "probe": _source_name(self.probe), "layers": self.layers}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage
        self._smoke_test = bool(getattr(trainer, "fast_dev_run", False))
        if stage == "fit":
            self._restored_this_fit = False
        self._state_key = None  # settings changed since construction count (the key is frozen from here on)
        self._reporter = Reporter(trainer, strict=self.strict)
        if stage == "fit":
            self._check_not_empty()
        if stage == "fit" and isinstance(self.probe, str) and self.probe == "val" and not has_val_source(trainer):
            raise ProbeDataError(
                f"{type(self).__name__}(probe='val') needs validation data, but the trainer has none; pass "
                "val_dataloaders / a datamodule with val_dataloader(), or probe='train' or probe=<a Dataset>"
            )
        start_method = getattr(trainer.strategy, "_start_method", "popen")
        if stage == "fit" and start_method != "popen":
            warn_once_per_trainer(
                trainer, "spawned_workers",
                f"strategy with start_method={start_method!r} ({type(trainer.strategy).__name__}): the fit runs in "
                "worker processes, and Lightning sends back only the weights, so the callbacks' results (history_, "
                "scores_, results_, ...) stay empty in this process; they are in the logs and in checkpoints. "
                "Use strategy='ddp' to read them here",
            )
        hooks = overridden_batch_hooks(pl_module, getattr(trainer, "datamodule", None))
        if hooks and self.batch_to_xy is None:
            warn_once_per_trainer(
                trainer, "batch_hooks",
                f"{', '.join(hooks)}: lightning_interp's probes read batches straight from the dataset and do not "
                "run batch-transfer hooks (Lightning runs them on training batches too, with any augmentation). If "
                "they normalise or reshape inputs, pass batch_to_xy= doing the same, or move that step into "
                "forward(); otherwise the analyses see different inputs than the model does",
            )
        weights_only = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "save_weights_only", False)]
        if weights_only and "weights_only" not in self._warned:
            self._warned.add("weights_only")
            warnings.warn(
                f"{type(self).__name__}: ModelCheckpoint(save_weights_only=True) does not save callback state, so "
                "this callback's history and alerts will be lost on resume",
                InterpretationWarning,
                stacklevel=2,
            )

        if self.runs_on_epoch_schedule:
            self._warn_if_schedule_unreachable(trainer, stage)

    def on_fit_start(self, trainer, pl_module) -> None:
        # here, not at setup: Lightning builds layers in configure_model() (and the module's setup()) after that
        self._check_layers(pl_module)
        self._fit_clock = time.perf_counter()
        self.cost_ = _fresh_cost()
        if self._budget is not None:
            self._budget.reset(pending=self._restored_pending)
        self._restored_pending = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._fit_start = (trainer.global_step, trainer.current_epoch)  # restored by now, unlike at on_fit_start
        earlier = self._history_trainer() if self._history_trainer is not None else None
        if self._holds_history and not self._restored_this_fit and earlier is not None and earlier is not trainer:
            self.warn_once(
                "reused",
                f"{type(self).__name__} holds the history of a fit by another Trainer: this fit appends to it and "
                "its schedule continues from it (in a k-fold or sweep loop, create one callback per Trainer)",
            )
        if self._restored_this_fit:
            self._history_trainer = weakref.ref(trainer)

    def data_arguments(self) -> dict[str, Any]:
        """The callback's data arguments by name (``"train"``, ``"val"``, a Dataset, a DataLoader or ``None``);
        subclasses with more than the probe add theirs."""
        return {"probe": self.probe}

    def _check_not_empty(self) -> None:
        """Fail at setup on a dataset argument without samples (an analysis of it could only fail, every time)."""
        for name, source in self.data_arguments().items():
            dataset = source.dataset if isinstance(source, DataLoader) else source
            if dataset is None or isinstance(dataset, str) or not hasattr(dataset, "__len__"):
                continue
            if len(dataset) == 0:
                raise ProbeDataError(f"{type(self).__name__}({name}=...) got an empty {type(dataset).__name__}: "
                                     "there is nothing to analyse; pass a dataset with samples")

    def _warn_if_schedule_unreachable(self, trainer, stage: str) -> None:
        max_epochs = trainer.max_epochs
        unreachable = max_epochs is not None and 0 <= max_epochs < self.every_n_epochs and not self._smoke_test
        if stage == "fit" and self.every_n_epochs > 0 and unreachable:
            self.warn_once(
                "schedule:unreachable",
                f"{type(self).__name__}(every_n_epochs={self.every_n_epochs}) never comes due within "
                f"max_epochs={max_epochs}: it will not run in this fit. Lower every_n_epochs to at most {max_epochs}",
            )

    #: Whether the epoch schedule is this callback's only trigger (a subclass with other triggers sets False).
    runs_on_epoch_schedule: ClassVar[bool] = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        """Under ``max_overhead``, decide whether this epoch's analysis (scheduled or postponed) runs."""
        budget = self._budget
        if budget is None or self._smoke_test or self._fit_clock is None:
            return
        epoch = trainer.current_epoch
        scheduled = self._scheduled(epoch)
        allowed = True
        if budget.wants(scheduled) and not self._budget_exempt(epoch):
            epochs_done = epoch - self._fit_start[1]
            training = time.perf_counter() - self._fit_clock - self.cost_["seconds"]
            allowed = self._within_budget(trainer, ahead=training / epochs_done if epochs_done else 0.0)
        if budget.decide(epoch, scheduled, allowed):
            self._report_postponed(epoch)

    def _budget_exempt(self, epoch: int) -> bool:
        """Whether the analysis of ``epoch`` runs whatever the budget (one the rest depends on, e.g. a reference)."""
        return False

    def _within_budget(self, trainer, ahead: float = 0.0) -> bool:
        """Whether one more analysis, at the last one's cost, keeps this callback within ``max_overhead`` once
        ``ahead`` more seconds of training (the coming epoch, at the fit's average) have passed; decided on rank
        zero and broadcast: the ranks' clocks differ, and a rank running an analysis alone would hang."""
        elapsed = time.perf_counter() - self._fit_clock + ahead
        allowed = within_budget(self.cost_["seconds"], self.cost_["last_seconds"], elapsed, self._budget.share)
        return bool(trainer.strategy.broadcast(allowed, src=0))

    def _report_postponed(self, epoch: int) -> None:
        spent, elapsed = self.cost_["seconds"], time.perf_counter() - self._fit_clock
        self.cost_["postponed"] = self._budget.postponed
        self.reporter.log_scalars({f"{self.tag}/cost/postponed": self._budget.postponed})
        self.warn_once(
            "budget:postponed",
            f"{type(self).__name__} postponed its analysis of epoch {epoch}: its analyses have taken {spent:.2f} s, "
            f"{spent / max(elapsed, 1e-9):.0%} of the fit's wall time so far, and one more would pass "
            f"max_overhead={self.max_overhead}. It runs as soon as it fits (one still postponed when training "
            f"ends does not run); cost_['postponed'] and {self.tag}/cost/postponed count them",
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._is_due(trainer.current_epoch):
            self.run_now(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._final_run_wanted(trainer):
            with self.after_training():
                self.run_now(trainer, pl_module)

    def _final_run_wanted(self, trainer) -> bool:
        """Whether training ended (EarlyStopping, ``max_steps``) before the first analysis its schedule had in reach
        in this fit: the final model is analysed then, so such a fit does not end without a result. A schedule that
        could not come due before ``max_epochs`` (named at setup for a fresh fit) stays silent, as does a fit that
        trained no step."""
        start_step, start_epoch = self._fit_start
        n, max_epochs = self.every_n_epochs, trainer.max_epochs
        first_due = -(-(start_epoch + 1) // n) * n - 1 if n > 0 else None  # the first scheduled epoch >= start_epoch
        reachable = first_due is not None and (max_epochs is None or max_epochs < 0 or first_due < max_epochs)
        trained = trainer.global_step > start_step
        return reachable and trained and self.cost_["runs"] == 0 and not self._smoke_test

    @contextlib.contextmanager
    def after_training(self) -> Iterator[None]:
        """Inside: analyses read the final model, and record it under the last trained epoch."""
        self._after_training = True
        try:
            yield
        finally:
            self._after_training = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "alerts": [a.to_dict() for a in self.alerts_],
            "probe_indices": self._probe_indices,
            "selected_epoch": self._selected_epoch,
            "coreset": self.coreset_,
            "budget_pending": self._budget is not None and self._budget.pending,
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history of a checkpoint: always when resuming a fit; for ``validate``/``test``/``predict``
        from a checkpoint (``ckpt_path="best"``) only into a callback that holds none, since its own history
        already runs past that checkpoint and Lightning loads callback state in every stage."""
        if self._stage not in (None, "fit") and self._holds_history:
            return
        self._holds_history = self._restored_this_fit = True
        state = dict(state_dict)
        self.alerts_ = [Alert.from_dict(a) for a in state.pop("alerts", [])]
        self._probe_indices = state.pop("probe_indices", None)
        self._restored_pending = bool(state.pop("budget_pending", False))
        self._selected_epoch = state.pop("selected_epoch", None)
        self.coreset_ = state.pop("coreset", None)
        self._load_extra_state(state)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Say why a history in the checkpoint is not restored: it was saved under other identifying settings
        (Lightning itself only lists the unmatched state keys)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        claimed = {getattr(cb, "state_key", None) for cb in trainer.callbacks}
        mine = self._state_key_fields()
        for key in states:
            theirs = _state_key_settings(key, type(self).__qualname__)
            if key in claimed or theirs is None:
                continue
            differences = ", ".join(f"{name}={theirs.get(name)!r} there, {value!r} here"
                                    for name, value in mine.items() if theirs.get(name) != value)
            self.warn_once(
                f"history:unmatched:{key}",
                f"{type(self).__name__}: the checkpoint holds a history of this callback saved with other settings "
                f"({differences}); a callback's history is matched on {sorted(mine)}, so it is not restored and "
                "this run starts a new one. Use the checkpoint's settings to continue that history",
            )

    # -- scheduling and error policy ------------------------------------------------------------------------
    def _scheduled(self, epoch: int) -> bool:
        """On the schedule; under ``fast_dev_run`` (one short epoch, Lightning's smoke test) on that epoch."""
        return self.every_n_epochs > 0 and (self._smoke_test or (epoch + 1) % self.every_n_epochs == 0)

    def _is_due(self, epoch: int) -> bool:
        """Whether an analysis runs at the end of ``epoch``: the schedule, as ``max_overhead`` decided it."""
        scheduled = self._scheduled(epoch)
        if self._budget is None or self._smoke_test:
            return scheduled
        return self._budget.due(epoch, scheduled)

    def run_now(self, trainer, pl_module) -> None:
        """Run :meth:`compute` now, under the callback's error policy and with the DDP-safe stop."""
        self.policy.stop_requested = False
        self.policy.hook_errors = []
        self._holds_history = True
        self._history_trainer = weakref.ref(trainer)
        self._last_run_step = training_step_key(trainer)
        started = time.perf_counter()
        try:
            with inputs_in_model_dtype(pl_module), rank_zero_buffers(pl_module, self._last_run_step):
                try:
                    self.compute(trainer, pl_module, self.resolve_probe(trainer, pl_module))
                except UnreadableLayers as err:
                    if self.layers is not None or not set(err.layers) - self._silent_layers:
                        raise  # the user named them, or leaving them out did not help
                    self._silent_layers.update(err.layers)  # an unused or auxiliary module: analyse the rest
                    self.warn_once("layers:silent", f"{type(self).__name__} leaves out {err.layers}: {err} "
                                   "(name the layers with layers=[...] to choose yourself)")
                    self.compute(trainer, pl_module, self.resolve_probe(trainer, pl_module))
        except InterpretationAlert:
            raise
        except Exception as err:  # a failing analysis must never end the user's training run
            if self.strict:
                raise
            self.skipped_.append({"epoch": self.analysed_epoch(trainer), "error": f"{type(err).__name__}: {err}"})
            self.warn_once(
                f"error:{type(err).__name__}:{err}",
                f"{type(self).__name__} skipped epoch {self.analysed_epoch(trainer)}: {str(err).rstrip('.')}. Training "
                "continues (strict=True raises instead); later analyses failing the same way are listed in skipped_ "
                "without another warning.",
            )
        self._record_cost(time.perf_counter() - started)
        if self.strict and trainer.strategy.reduce_boolean_decision(bool(self.policy.hook_errors), all=False):
            # hooks run on rank zero only: every rank raises, so none is left waiting in a collective
            raise self.policy.hook_errors[0] if self.policy.hook_errors else RuntimeError(
                f"{type(self).__name__}: an alert hook failed on global rank zero (strict=True)")
        if self.alert_action == "stop":
            should_stop = trainer.strategy.reduce_boolean_decision(self.policy.stop_requested, all=False)
            trainer.should_stop = trainer.should_stop or should_stop

    def _record_cost(self, seconds: float) -> None:
        """Add one run's wall time to :attr:`cost_` and log it with the share of the fit's wall time so far."""
        cost = self.cost_
        cost["runs"] += 1
        cost["seconds"] += seconds
        cost["last_seconds"] = seconds
        scalars = {f"{self.tag}/cost/seconds": seconds}
        if self._fit_clock is not None:
            cost["share"] = cost["seconds"] / max(time.perf_counter() - self._fit_clock, 1e-9)
            scalars[f"{self.tag}/cost/share"] = cost["share"]
        if self._reporter is not None:
            self.reporter.log_scalars(scalars)

    def warn_once(self, key: str, message: str) -> None:
        """Emit ``message`` once per callback instance for ``key`` (on rank zero)."""
        if key in self._warned:
            return
        self._warned.add(key)
        if self._is_global_zero():
            warnings.warn(message, InterpretationWarning, stacklevel=3)

    def _is_global_zero(self) -> bool:
        return self._reporter is None or self._reporter.trainer.is_global_zero

    # -- shared services for subclasses --------------------------------------------------------------------
    @property
    def reporter(self) -> Reporter:
        if self._reporter is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer yet")
        return self._reporter

    def alert(self, trainer, metric: str, value: float, threshold: float, message: str) -> Alert:
        """Record an alert, log it (text + counters under ``alerts/``) and apply ``alert_action``."""
        record = Alert(
            source=type(self).__name__,
            metric=metric,
            value=float(value),
            threshold=float(threshold),
            epoch=int(self.analysed_epoch(trainer)),
            step=int(trainer.global_step),
            message=message,
        )
        self.alerts_.append(record)
        self.reporter.log_scalars({f"alerts/{self.tag}": len(self.alerts_)})
        self.reporter.log_text("alerts/log", f"**{record.source}** · `{metric}` = {value:.4g} "
                               f"(threshold {threshold:.4g}) — {message}")
        self.policy.apply(record, is_global_zero=trainer.is_global_zero)
        return record

    def select_layers(self, pl_module) -> dict[str, nn.Module]:
        """The layers this callback analyses: its ``layers`` globs, or every Conv/Linear but the output head and
        those found not to run in ``forward()``."""
        chosen = select_layers(pl_module, include=self.layers, head=self.head)
        return chosen if self.layers is not None else {n: m for n, m in chosen.items() if n not in self._silent_layers}

    def _check_layers(self, pl_module) -> None:
        self.select_layers(pl_module)  # fails fast, before training, with the available layer names
        resolve_head(pl_module, self.head)

    def forward_probe(
        self, trainer, pl_module, probe: ProbeData, layers: dict[str, nn.Module] | None = None, features: bool = False
    ) -> ProbeOutputs:
        """One forward pass over ``probe`` recording ``layers``, shared with the other callbacks at this step.

        Under DDP each rank evaluates its share of the probe and all ranks receive the whole result, sorted by
        dataset index, so every rank computes (and decides) the same thing.
        """
        cache = probe_cache(pl_module)
        features = (self.head or True) if features else False
        step = training_step_key(trainer)
        world = trainer.world_size
        if world <= 1:
            extra_layers, extra_features, covering = self._reads_alongside(trainer, pl_module, probe,
                                                                           bool(layers or features))
            return cache.get(pl_module, probe, layers or {}, step, features=features, covering=covering,
                             extra_layers=extra_layers, extra_features=extra_features)
        # Under DDP every rank must hit or miss alike (a forward pass can itself be a collective, e.g. FSDP):
        # only a pass over exactly the same shard serves, and passes record only what was asked for.
        shard = probe.subset(shard_positions(len(probe), trainer.global_rank, world))
        with fail_together(trainer.strategy, f"{type(self).__name__}'s forward pass over the probe"):
            local = cache.get(pl_module, shard, layers or {}, step, features=features, exact=True)
        return gather_outputs(trainer.strategy, local)

    def upcoming_read(self, trainer, pl_module) -> PendingRead | None:
        """What this callback's analysis due at the end of the current epoch will read through
        :meth:`forward_probe`, while it has not run yet (``None``: nothing). A callback due at the same step that
        reads the same dataset first records it in its own pass, so both are served by one."""
        if not (self.runs_on_epoch_schedule and self._is_due(trainer.current_epoch)):
            return None
        if self._last_run_step == training_step_key(trainer):
            return None
        try:
            return PendingRead(resolve_dataset(trainer, self.probe), self.batch_to_xy or default_batch_to_xy,
                               self.probe_size is None, self.select_layers(pl_module), False)
        except Exception:  # its own run reports it
            return None

    def _reads_alongside(self, trainer, pl_module, probe: ProbeData, records: bool
                         ) -> tuple[dict[str, nn.Module], bool | str, ProbeData | None]:
        """What a pass over ``probe`` should also record for the other callbacks about to read its dataset (the same
        way) at this step: their layers, their head input (``head or True``), and the whole dataset to pass over
        when one of them reads all of it (else ``None``).

        Memory: no pass of more than ``fidelity_reference_size`` samples (the most a coreset reader records
        itself, its fidelity reference) records a coreset reader's layers — neither another's, nor this request's
        own (``records``) by widening its pass to the whole set for a peer.
        """
        reads = [read for peer in trainer.callbacks if peer is not self and isinstance(peer, InterpretationCallback)
                 for read in [peer.upcoming_read(trainer, pl_module)]
                 if read is not None and read.dataset is probe.dataset and read.batch_to_xy is probe.batch_to_xy]
        cap = self.fidelity_reference_size
        widen = (any(read.whole for read in reads) and len(probe) < probe.dataset_size
                 and (probe.dataset_size <= cap or not records))
        covering = ProbeData(probe.dataset, None, probe.batch_size, probe.batch_to_xy) if widen else None
        rows = probe.dataset_size if widen else len(probe)
        layers: dict[str, nn.Module] = {}
        features: bool | str = False
        for read in reads:
            if read.whole or rows <= cap:
                layers.update(read.layers)
                features = features or read.features
        return layers, features, covering

    def resolve_probe(self, trainer, pl_module) -> ProbeData:
        """The probe to analyse now: the whole probe set, or its coreset (chosen on schedule)."""
        dataset = resolve_dataset(trainer, self.probe)
        full = ProbeData(dataset, batch_size=self.batch_size, batch_to_xy=self.batch_to_xy)
        whole = self.probe_size is None
        if isinstance(self.probe_size, int) and self.probe_size >= len(full):
            whole = True
            if self.probe_size > len(full):
                self.warn_once("probe_size:larger", f"{type(self).__name__}: probe_size={self.probe_size} exceeds the "
                               f"probe's {len(full)} samples; the whole probe is analysed")
        if whole:
            self.probe_ = full
            return full
        epoch = self.analysed_epoch(trainer)
        settings_changed = self._probe_indices is not None and self.coreset_ is not None and any(
            self.coreset_.get(key, value) != value for key, value in self._coreset_settings().items())
        if settings_changed:
            self.warn_once("coreset:settings", f"{type(self).__name__}: the coreset restored from the checkpoint was "
                           f"chosen with {_settings_text(self.coreset_)}, the callback now asks for "
                           f"{_settings_text(self._coreset_settings())}; it is chosen again")
        due = (
            self._probe_indices is None
            or settings_changed
            or (
                self.reselect_every_n_epochs is not None
                and self._selected_epoch is not None
                and epoch - self._selected_epoch >= self.reselect_every_n_epochs
            )
        )
        if due:
            self._select_coreset(trainer, pl_module, full)
        self.probe_ = ProbeData(dataset, self._probe_indices, self.batch_size, self.batch_to_xy)
        return self.probe_

    def _coreset_fidelity(self, trainer, pl_module, full: ProbeData, coreset: ProbeData) -> dict[str, Any] | None:
        """Agreement of :meth:`fidelity_scores` on the coreset with those on the full probe (or a sample of it)."""
        from ..methods.coreset import fidelity

        full_scores = self.fidelity_scores(trainer, pl_module, _reference_sample(full, self.fidelity_reference_size,
                                                                                  self.seed))
        if full_scores is None:
            self.warn_once("fidelity:none", f"{type(self).__name__} has no fidelity measure "
                           "(fidelity_scores returns None): the coreset's fidelity is not reported")
            return None
        return fidelity(full_scores, self.fidelity_scores(trainer, pl_module, coreset))

    def scalar_charts(self) -> dict[str, list[str]]:
        """Charts of the "Custom Scalars" tab (title -> tag regexes) for what this callback, as configured,
        logs; subclasses add theirs. Charts that could stay empty (no shift data, no coreset) are left out."""
        if self.probe_size is None:
            return {}
        charts = {f"{self.tag}: coreset size": [rf"{self.tag}/coreset/size"]}
        if self.probe_fidelity:
            charts[f"{self.tag}: coreset fidelity"] = [rf"{self.tag}/coreset/(spearman|jaccard_top_k)"]
        return charts

    def analysed_epoch(self, trainer) -> int:
        """The epoch whose weights an analysis reads: once training has ended Lightning counts the last epoch as
        completed (``current_epoch`` is one past it, also when ``max_steps`` stopped it midway)."""
        return max(0, trainer.current_epoch - 1) if self._after_training else trainer.current_epoch

    def _coreset_settings(self) -> dict[str, Any]:
        return {"probe_size": self.probe_size, "selector": self.probe_selector, "balance": self.probe_balance}

    def _select_coreset(self, trainer, pl_module, full: ProbeData) -> None:
        from ..methods.coreset import resolve_size, select_coreset

        epoch = self.analysed_epoch(trainer)
        size = resolve_size(len(full), self.probe_size)
        if self.probe_selector == "random" and not self.probe_balance:  # needs no forward pass
            positions = select_coreset("random", size, n_total=len(full), seed=self.seed + epoch)
        else:
            outs = self.forward_probe(trainer, pl_module, full, features=True)
            try:
                positions = select_coreset(
                    self.probe_selector,
                    size,
                    features=outs.features,
                    logits=outs.outputs,
                    labels=outs.labels,
                    balance=self.probe_balance,
                    seed=self.seed + epoch,
                )
            except ValueError as err:  # name the callback's own arguments, not the selector's
                settings = ", ".join(f"probe_{k}={v!r}" if k != "selector" else f"probe_selector={v!r}"
                                     for k, v in self._coreset_settings().items() if k != "probe_size")
                raise ValueError(f"{type(self).__name__}(probe_size={self.probe_size!r}, {settings}) cannot choose "
                                 f"its coreset of {size} from {len(full)} probe samples: {err}") from err
        self._probe_indices = full.indices[positions].sort().values
        self._selected_epoch = epoch  # before the fidelity check, which may fail
        coreset = full.subset(positions)
        record: dict[str, Any] = {
            "epoch": epoch,
            **self._coreset_settings(),
            "size": int(size),
            "of": len(full),
            "indices": self._probe_indices,
        }
        scalars = {f"{self.tag}/coreset/size": float(size)}
        if self.probe_fidelity:
            try:
                agreement = self._coreset_fidelity(trainer, pl_module, full, coreset)
            except (UnreadableLayers, ProbeDataError):  # run_now leaves those layers out and runs again, or the
                self._probe_indices = self._selected_epoch = None  # analysis fails alike (one warning): choose again
                raise
            except Exception as err:  # the coreset stays usable: its analysis goes on without the measure
                if self.strict:
                    raise
                agreement = None
                self.warn_once(f"fidelity:{type(err).__name__}",
                               f"{type(self).__name__}: the coreset's fidelity could not be measured: {err}")
            if agreement is not None:
                record["fidelity"] = agreement
                scalars[f"{self.tag}/coreset/spearman"] = agreement["spearman"]
                scalars[f"{self.tag}/coreset/jaccard_top_k"] = agreement["jaccard_top_k"]
        self.coreset_ = record
        self.reporter.log_scalars(scalars)
        fid = record.get("fidelity", {})
        self.reporter.log_text(
            f"{self.tag}/coreset",
            markdown_table(
                ["selector", "size", "of", "spearman", "jaccard top-k"],
                [[self.probe_selector, size, len(full), fid.get("spearman", "n/a"), fid.get("jaccard_top_k", "n/a")]],
            ),
        )


def _fresh_cost() -> dict[str, float]:
    return {"runs": 0, "seconds": 0.0, "last_seconds": 0.0, "share": 0.0, "postponed": 0}


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={settings.get(key)!r}" for key in ("probe_size", "selector", "balance"))


def _reference_sample(full: ProbeData, size: int, seed: int) -> ProbeData:
    if len(full) <= size:
        return full
    return full.subset(torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:size])


def _state_key_settings(key: object, qualname: str) -> dict[str, Any] | None:
    """The settings a state key of class ``qualname`` was made from (see ``Callback._generate_state_key``)."""
    if not isinstance(key, str) or not key.startswith(qualname + "{"):
        return None
    try:
        settings = ast.literal_eval(key[len(qualname):])
    except (ValueError, SyntaxError):
        return None
    return settings if isinstance(settings, dict) else None


def _source_name(source) -> str | None:
    """``"val"``/``"train"``/``None`` as they are, a dataset by its class name (for state keys)."""
    return source if source is None or isinstance(source, str) else type(source).__name__


def gather_outputs(strategy, local: ProbeOutputs) -> ProbeOutputs:
    """Every rank's :class:`ProbeOutputs` joined in dataset-index order (the same on all ranks)."""
    outputs, indices = gather_by_index(strategy, local.outputs, local.indices)
    labels = gather_by_index(strategy, local.labels, local.indices)[0] if local.labels is not None else None
    activations = {n: gather_by_index(strategy, a, local.indices)[0] for n, a in local.activations.items()}
    features = gather_by_index(strategy, local.features, local.indices)[0] if local.features is not None else None
    return ProbeOutputs(outputs, labels, indices, activations, features)
