"""``ARMDrift``: how far each layer's representation moves during training, and how far shifted data sits.

Per scheduled epoch, ARM (Sangarya, Bradford, Kim 2024; :mod:`lightning_interp.methods.arm`) between the
probe set's activations now and at a reference epoch, per layer and aggregated; optionally ARM between the
probe and a second dataset of shifted / incoming data under the current model (data drift).
"""

from __future__ import annotations

import statistics
from typing import Any, Literal, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..capture import ActivationRecorder
from ..methods.arm import ARMResult, arm_from_activations, sort_samples
from ..probe import ProbeData, WeightsFingerprint
from ..report import markdown_table
from .base import InterpretationCallback, _source_name, loader_list

Reference = Union[Literal["previous", "first"], int]

#: Where an epoch's activations come from (only activations of the same source are compared).
VALIDATION_PASS, OWN_PASS = "validation pass", "own pass"


class ARMDrift(InterpretationCallback):
    """Representation drift per epoch with the Aggregate Representation Measure (ARM).

    ``ARM_l = mean_u W1(a_{l,u}(now), a_{l,u}(reference))`` over the units of layer ``l`` (conv maps averaged
    over space, output head excluded), ``ARM = mean_l ARM_l``; ``W1`` is the exact 1-D Wasserstein distance
    between the unit's activation samples on the probe set.

    Args:
        reference: what "now" is compared with: ``"previous"`` (the last analysed epoch: epoch-to-epoch drift),
            ``"first"`` (the first analysed epoch) or an epoch number (0-based, must be on the schedule).
        shift_data: a Dataset (or DataLoader, whose dataset is used) of shifted / incoming inputs; each time,
            ARM between the probe and it under the current model is logged under ``arm/shift/``.
        threshold: alert when the aggregate ARM exceeds it (``None``: off).
        layer_threshold: alert when a layer's ARM exceeds it (``None``: off).
        shift_threshold: alert when the data-shift ARM exceeds it (``None``: off).
        jump_factor: alert when the aggregate ARM exceeds ``jump_factor`` times the median of the last
            ``median_window`` values (needs 3 of them; ``None``: off).
        median_window: how many past values the running median spans.
        settle_tolerance: a layer has settled when its ARM stays at or below this fraction of the largest ARM
            it has shown in this run, for ``settle_epochs`` analyses in a row (made for ``reference="previous"``:
            its epoch-to-epoch drift has decayed to a small part of its peak).
        settle_epochs: see ``settle_tolerance``.
        plot_every_n_epochs: also log the layers x epochs heat map (each layer's ARM over its peak) every n
            analysed epochs (``None``: only at the end of training; a render costs ~10 ms).
        keep_reference_in_checkpoint: store the reference activations in ``state_dict`` (probe size x units
            floats per layer) so a resumed run continues drift against the same reference.
        reuse_validation: with ``probe="val"`` and no coreset, record the layers during the trainer's own
            validation pass of a scheduled epoch instead of running a second forward pass over the validation
            set (the eval-mode activations the model really sees, after the module's batch-transfer hooks and
            under the trainer's precision). Falls back to its own pass when the trainer did not validate that
            epoch, validated only part of the set (``limit_val_batches``, ``drop_last``), has several
            validation loaders, runs on several processes, uses ``shift_data``, or when the weights changed
            after validation (another callback swapping or pruning them, also through ``.data``). Activations of
            the two passes are never compared with each other: references are kept per source (a fixed reference
            taken from the validation pass is also read once with the own pass), an epoch is compared on a
            source its reference has, and an epoch that cannot be (one warning) becomes the new reference with
            ``reference="previous"``.
        **kwargs: the base options (``every_n_epochs``, ``probe``, ``probe_size``, ``layers``, ``alert_action``,
            ``strict``, ...), see :class:`~lightning_interp.callbacks.base.InterpretationCallback`.

    Attributes:
        history_: one record per analysed epoch with a reference: ``epoch``, ``reference_epoch``,
            ``aggregate``, ``per_layer`` (``{layer: ARM_l}``) and, with ``shift_data``, ``shift_aggregate`` and
            ``shift_per_layer``.
        settled_layers_: layers whose drift has stayed below ``settle_tolerance`` — candidates to freeze.
        reference_epoch_: the epoch the current reference activations come from (``None`` before any).
    """

    tag = "arm"
    chart_category = "drift"

    def __init__(
        self,
        reference: Reference = "previous",
        shift_data: Union[Dataset, DataLoader, None] = None,
        threshold: float | None = None,
        layer_threshold: float | None = None,
        shift_threshold: float | None = None,
        jump_factor: float | None = 3.0,
        median_window: int = 5,
        settle_tolerance: float = 0.25,
        settle_epochs: int = 3,
        plot_every_n_epochs: int | None = None,
        keep_reference_in_checkpoint: bool = True,
        reuse_validation: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (reference == "previous" and self.probe_size is not None and self.reselect_every_n_epochs is not None
                and self.reselect_every_n_epochs <= self.every_n_epochs):
            raise ValueError(
                f"ARMDrift(reference='previous') makes a re-selected coreset the new reference (two different samples "
                f"would add sampling noise to the drift), so reselect_every_n_epochs={self.reselect_every_n_epochs} "
                f"<= every_n_epochs={self.every_n_epochs} would never report drift; choose reselect_every_n_epochs "
                f"> every_n_epochs"
            )
        if (reference == "previous" and self.probe_size is not None and self.reselect_every_n_epochs is not None
                and self.max_overhead is not None):
            raise ValueError(
                f"ARMDrift(reference='previous') compares two analyses of one coreset, and max_overhead can space the "
                f"analyses further apart than reselect_every_n_epochs={self.reselect_every_n_epochs}: each would then "
                f"meet a new coreset and become the new reference, and no drift would be reported. Use max_overhead "
                f"or reselect_every_n_epochs, not both"
            )
        if isinstance(reference, bool) or not (reference in ("previous", "first") or isinstance(reference, int)):
            raise ValueError(f"reference must be 'previous', 'first' or an epoch number, got {reference!r}")
        if isinstance(reference, int):
            if reference < 0:
                raise ValueError(f"reference epoch must be >= 0, got {reference}")
            if self.every_n_epochs and (reference + 1) % self.every_n_epochs:
                raise ValueError(
                    f"reference={reference} is not an analysed epoch with every_n_epochs={self.every_n_epochs} "
                    f"(analysed: epochs {self.every_n_epochs - 1}, {2 * self.every_n_epochs - 1}, ...)"
                )
        for name, value in (("threshold", threshold), ("layer_threshold", layer_threshold),
                            ("shift_threshold", shift_threshold)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value!r}")
        if jump_factor is not None and not jump_factor > 1:
            raise ValueError(f"jump_factor must be > 1 or None, got {jump_factor!r}")
        if median_window < 1 or settle_epochs < 1:
            raise ValueError(f"median_window and settle_epochs must be >= 1, got {median_window}, {settle_epochs}")
        if not 0 <= settle_tolerance <= 1:
            raise ValueError(f"settle_tolerance must be a fraction in [0, 1], got {settle_tolerance!r}")
        if plot_every_n_epochs is not None and plot_every_n_epochs < 1:
            raise ValueError(f"plot_every_n_epochs must be >= 1 or None, got {plot_every_n_epochs}")
        if shift_data is not None and not isinstance(shift_data, (Dataset, DataLoader)):
            raise TypeError(f"shift_data must be a Dataset, a DataLoader or None, got {type(shift_data).__name__}")
        self.reference = reference
        self.shift_data = shift_data
        self.threshold = threshold
        self.layer_threshold = layer_threshold
        self.shift_threshold = shift_threshold
        self.jump_factor = jump_factor
        self.median_window = median_window
        self.settle_tolerance = settle_tolerance
        self.settle_epochs = settle_epochs
        self.plot_every_n_epochs = plot_every_n_epochs
        self.keep_reference_in_checkpoint = keep_reference_in_checkpoint
        self.reuse_validation = reuse_validation

        self.history_: list[dict[str, Any]] = []
        self.settled_layers_: list[str] = []
        self.reference_epoch_: int | None = None
        self._references: dict[str, dict[str, Tensor]] = {}  # source -> sorted [n, units] per layer
        self._reference_not_restored: int | None = None  # its epoch, after a resume without the activations
        self._reference_indices: Tensor | None = None  # the probe's dataset indices when it was recorded
        self._streaks: dict[str, int] = {}
        self._peaks: dict[str, float] = {}
        self._checked_shapes = False
        self._tap: tuple[ActivationRecorder, WeightsFingerprint] | None = None
        self._tapped: tuple[WeightsFingerprint, dict[str, Tensor]] | None = None  # (weights, activations)
        self._restored_tap: tuple[int, dict[str, Tensor]] | None = None  # (global step, activations), checkpoint

    def _state_key_fields(self) -> dict[str, Any]:
        return {**super()._state_key_fields(), "reference": self.reference, "shift_data": _source_name(self.shift_data)}

    def data_arguments(self) -> dict[str, Any]:
        return {**super().data_arguments(), "shift_data": self.shift_data}

    def _final_run_wanted(self, trainer) -> bool:
        """Only when it can report something: with ``shift_data``, or against a reference read by its own pass (the
        final model has no validation pass, so a reference from the trainer's cannot be compared with it)."""
        return super()._final_run_wanted(trainer) and (self.shift_data is not None or OWN_PASS in self._references)

    def _budget_exempt(self, epoch: int) -> bool:
        return isinstance(self.reference, int) and epoch == self.reference  # every later drift is measured from it

    # -- the analysis ---------------------------------------------------------------------------------------
    def compute(self, trainer, pl_module, probe: ProbeData) -> None:
        epoch = self.analysed_epoch(trainer)
        layers = self.select_layers(pl_module)
        # Sorted activations of this epoch by source. The trainer's validation pass sees the module's
        # batch-transfer hooks and precision, ARMDrift's own pass may not: only same-source views are compared.
        views: dict[str, dict[str, Tensor]] = {}
        tapped = self._take_tapped(trainer, pl_module, probe)
        if tapped is not None:
            views[VALIDATION_PASS] = {name: sort_samples(act) for name, act in tapped.items()}

        def own_pass() -> dict[str, Tensor]:
            if OWN_PASS not in views:
                acts = self.forward_probe(trainer, pl_module, probe, layers).activations
                views[OWN_PASS] = {name: sort_samples(act) for name, act in acts.items()}
            return views[OWN_PASS]

        if not views or self.shift_data is not None:
            own_pass()
        shift = self._shift_arm(trainer, pl_module, probe, layers, own_pass()) if self.shift_data is not None else None

        resampled = self._reference_indices is not None and not torch.equal(self._reference_indices, probe.indices)
        if self._references and resampled:
            if self.reference == "previous":  # a re-selected coreset: drift resumes from the next analysis
                self._set_reference(views, epoch, probe.indices)
                return
            self.warn_once(
                "reference:resampled",
                f"ARMDrift: the probe coreset was re-selected after the reference epoch {self.reference_epoch_}; "
                "ARM now compares two different samples of the data (their distributions, not the same points)",
            )
        if not self._references:
            if tapped is not None and self.reference != "previous" and self._reference_due(epoch):
                own_pass()  # a fixed reference is kept for both sources: later epochs may lack a validation pass
            self._take_reference_if_due(epoch, views, probe.indices)
            if shift is not None:
                self._log_shift(trainer, shift, record=None)
            return
        source = next((s for s in (VALIDATION_PASS, OWN_PASS) if s in views and s in self._references), None)
        if source is None and OWN_PASS in self._references:
            own_pass()
            source = OWN_PASS
        if source is None:  # an own-pass epoch against a validation-pass-only reference
            self.warn_once(
                "reference:source",
                f"ARMDrift: epoch {epoch} could only be read from its own pass but the reference (epoch "
                f"{self.reference_epoch_}) from the trainer's validation pass, which can see different inputs "
                "(batch-transfer hooks, precision); such epochs are not compared"
                + (" and become the new reference" if self.reference == "previous" else "")
                + ". reuse_validation=False always uses ARMDrift's own pass",
            )
            if self.reference == "previous":
                self._set_reference(views, epoch, probe.indices)
            return
        if set(self._references[source]) != set(views[source]):  # e.g. resumed with another head=
            self.warn_once(
                "reference:layers",
                f"ARMDrift: the reference (epoch {self.reference_epoch_}) holds layers "
                f"{sorted(self._references[source])} but epoch {epoch} reads {sorted(views[source])}; epoch {epoch} "
                "becomes the reference and drift is reported from the next analysis on",
            )
            self._set_reference(views, epoch, probe.indices)
            return
        result = arm_from_activations(self._references[source], views[source], warn_skipped=False, assume_sorted=True)
        self._warn_skipped(result, "the probe")
        record: dict[str, Any] = {
            "epoch": epoch,
            "reference_epoch": self.reference_epoch_,
            "aggregate": result.aggregate,
            "per_layer": dict(result.per_layer),
        }
        if shift is not None:
            self._log_shift(trainer, shift, record)
        self._check_alerts(trainer, record)
        self.history_.append(record)
        self._update_settled(trainer, record)
        self._log(record)
        if self.reference == "previous":
            self._set_reference(views, epoch, probe.indices)
        if self.plot_every_n_epochs and len(self.history_) % self.plot_every_n_epochs == 0:
            self._log_heatmap()

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        max_epochs = trainer.max_epochs
        analyses = max_epochs // self.every_n_epochs if max_epochs is not None and max_epochs >= 0 else None
        if (stage == "fit" and analyses == 1 and self.reference in ("previous", "first") and self.shift_data is None
                and not trainer.fast_dev_run):
            self.warn_once(
                "reference:single",
                f"ARMDrift: only one analysis fits in max_epochs={max_epochs} (every_n_epochs={self.every_n_epochs}); "
                "it becomes the reference and no drift can be reported. Train longer or give shift_data",
            )
        if isinstance(self.reference, int) and max_epochs is not None and 0 <= max_epochs <= self.reference:
            self.warn_once(
                "reference:unreachable",
                f"ARMDrift: reference epoch {self.reference} will never be reached (max_epochs={max_epochs}, epochs "
                f"are counted from 0); no drift will be reported. Use reference='first' or an epoch < {max_epochs}",
            )

    # -- reading the trainer's own validation pass ---------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._stop_tap()
        if (
            self.reuse_validation
            and self.probe == "val"
            and self.probe_size is None
            and self.shift_data is None  # the shifted data goes through the own pass: compare like with like
            and not trainer.sanity_checking
            and trainer.world_size == 1
            and self._is_due(trainer.current_epoch)
            and len(loader_list(trainer.val_dataloaders)) == 1
        ):
            try:
                layers = self.select_layers(pl_module)
            except Exception:
                return  # compute() reports it
            recorder = ActivationRecorder(pl_module, layers, pool=True, to_cpu=True)
            self._tap = (recorder.__enter__(), WeightsFingerprint(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._tap is None:
            return
        recorder, weights = self._tap
        self._stop_tap()
        activations = {name: act.float() for name, act in recorder.stacked().items()}
        complete = len(activations) == len(recorder.layers)
        unchanged = weights == WeightsFingerprint(pl_module)
        self._tapped = (weights, activations) if complete and unchanged else None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop_tap()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop_tap()
        self._tapped = None

    def upcoming_read(self, trainer, pl_module):
        return None if self._tapped is not None else super().upcoming_read(trainer, pl_module)  # the tap serves it

    def _stop_tap(self) -> None:
        if self._tap is not None:
            self._tap[0].remove()
            self._tap = None

    def _take_tapped(self, trainer, pl_module, probe: ProbeData) -> dict[str, Tensor] | None:
        """This epoch's activations from the validation pass, if they cover exactly the whole probe and the
        weights are still the ones validated (another callback may swap or prune them in between); after a
        resume, those kept in the checkpoint when no training step has run since it was saved."""
        tapped, self._tapped = self._tapped, None
        restored, self._restored_tap = self._restored_tap, None
        if self.probe != "val" or self.probe_size is not None:
            return None
        if tapped is None and restored is not None and restored[0] == trainer.global_step:
            # resumed from a checkpoint saved between this epoch's validation and its end, and no step trained
            # since (a mid-epoch validation, val_check_interval, would have been followed by more steps): the
            # weights are the checkpoint's, the ones validated
            tapped = (WeightsFingerprint(pl_module), restored[1])
        if tapped is None:
            return None
        weights, activations = tapped
        loaders = loader_list(trainer.val_dataloaders)
        covers_probe = (
            bool(loaders) and getattr(loaders[0], "dataset", None) is probe.dataset
            and len(probe) == probe.dataset_size
            and all(len(act) == len(probe) for act in activations.values())
        )
        return activations if covers_probe and weights == WeightsFingerprint(pl_module) else None

    def _set_reference(self, views: dict[str, dict[str, Tensor]], epoch: int, indices: Tensor) -> None:
        self._references, self.reference_epoch_, self._reference_indices = dict(views), epoch, indices

    def _reference_due(self, epoch: int) -> bool:
        return not isinstance(self.reference, int) or epoch == self.reference

    def _take_reference_if_due(self, epoch: int, views: dict[str, dict[str, Tensor]], indices: Tensor) -> None:
        target = self.reference
        if isinstance(target, int) and epoch < target:
            return  # drift is reported from the first analysis after the reference epoch
        if isinstance(target, int) and epoch > target:
            self.warn_once(
                "reference:missed",
                f"ARMDrift: reference epoch {target} has passed (current epoch {epoch}) but its activations were "
                "never recorded (resumed from a checkpoint without ARMDrift state?); no drift can be reported",
            )
            return
        if self._reference_not_restored is not None:
            self.warn_once(
                "reference:not_restored",
                f"ARMDrift: the reference activations of epoch {self._reference_not_restored} were not in the "
                f"checkpoint (keep_reference_in_checkpoint=False), so epoch {epoch} becomes the reference"
                + (" from now on" if target == "first" else " and its own drift is not reported"),
            )
            self._reference_not_restored = None
        self._set_reference(views, epoch, indices)

    def _shift_arm(self, trainer, pl_module, probe, layers, current) -> ARMResult:
        dataset = self.shift_data.dataset if isinstance(self.shift_data, DataLoader) else self.shift_data
        shift_probe = ProbeData(dataset, batch_size=self.batch_size, batch_to_xy=self.batch_to_xy)
        if not self._checked_shapes:
            probe_shape = _input_shape(probe)
            shift_shape = _input_shape(shift_probe)
            if probe_shape != shift_shape:
                raise ValueError(
                    f"shift_data inputs have shape {shift_shape} but the probe's inputs have shape {probe_shape}"
                )
            self._checked_shapes = True
        outs = self.forward_probe(trainer, pl_module, shift_probe, layers)
        shifted = {name: sort_samples(act) for name, act in outs.activations.items()}
        result = arm_from_activations(current, shifted, warn_skipped=False, assume_sorted=True)
        self._warn_skipped(result, "shift_data")
        return result

    # -- alerts and settled layers ------------------------------------------------------------------------
    def _check_alerts(self, trainer, record: dict[str, Any]) -> None:
        value = record["aggregate"]
        if self.threshold is not None and value > self.threshold:
            self.alert(trainer, "arm/aggregate", value, self.threshold,
                       f"representations moved by ARM {value:.4g} since epoch {record['reference_epoch']}")
        if self.jump_factor is not None:
            past = [r["aggregate"] for r in self.history_[-self.median_window:]]
            if len(past) >= 3:
                limit = self.jump_factor * statistics.median(past)
                if value > limit:
                    self.alert(trainer, "arm/aggregate", value, limit,
                               f"ARM jumped above {self.jump_factor:g}x its running median of the last "
                               f"{len(past)} analyses")
        if self.layer_threshold is not None:
            for name, layer_value in record["per_layer"].items():
                if layer_value > self.layer_threshold:
                    self.alert(trainer, f"arm/layer/{name}", layer_value, self.layer_threshold,
                               f"layer {name} moved by ARM {layer_value:.4g} since epoch {record['reference_epoch']}")

    def _update_settled(self, trainer, record: dict[str, Any]) -> None:
        for name, value in record["per_layer"].items():
            self._peaks[name] = max(self._peaks.get(name, 0.0), value)
            low = value <= self.settle_tolerance * self._peaks[name]
            self._streaks[name] = self._streaks.get(name, 0) + 1 if low else 0
        settled = [name for name in record["per_layer"] if self._streaks[name] >= self.settle_epochs]
        if settled != self.settled_layers_:
            self.reporter.log_text(
                f"{self.tag}/settled_layers",
                f"Epoch {record['epoch']}: settled (freeze candidates): "
                + (", ".join(f"`{n}`" for n in settled) or "none"),
            )
        self.settled_layers_ = settled

    def _warn_skipped(self, result: ARMResult, where: str) -> None:
        for name in result.skipped:
            self.warn_once(f"nonfinite:{where}:{name}",
                           f"ARMDrift skips layer {name!r}: its activations on {where} contain NaN or inf")

    # -- reporting -----------------------------------------------------------------------------------------
    def scalar_charts(self) -> dict[str, list[str]]:
        charts = {"ARM aggregate": [r"arm/aggregate"], "ARM per layer": [r"arm/layer/.*"],
                  "settled layers": [r"arm/settled_layers"]}
        if self.shift_data is not None:
            charts["data shift ARM"] = [r"arm/shift/.*"]
        return {**charts, **super().scalar_charts()}

    def _log(self, record: dict[str, Any]) -> None:
        scalars = {f"{self.tag}/aggregate": record["aggregate"],
                   f"{self.tag}/settled_layers": len(self.settled_layers_)}
        scalars.update({f"{self.tag}/layer/{n}": v for n, v in record["per_layer"].items()})
        self.reporter.log_scalars(scalars)

    def _log_shift(self, trainer, shift: ARMResult, record: dict[str, Any] | None) -> None:
        scalars = {f"{self.tag}/shift/aggregate": shift.aggregate}
        scalars.update({f"{self.tag}/shift/layer/{n}": v for n, v in shift.per_layer.items()})
        self.reporter.log_scalars(scalars)
        if record is not None:
            record["shift_aggregate"] = shift.aggregate
            record["shift_per_layer"] = dict(shift.per_layer)
        if self.shift_threshold is not None and shift.aggregate > self.shift_threshold:
            self.alert(trainer, f"{self.tag}/shift/aggregate", shift.aggregate, self.shift_threshold,
                       "shift_data's representations are far from the probe's (data drift)")

    def _log_heatmap(self) -> None:
        if not self.history_ or not self.reporter.active:
            return
        from ..plots import heatmap

        layers = list(dict.fromkeys(n for r in self.history_ for n in r["per_layer"]))
        matrix = torch.tensor(
            [[r["per_layer"].get(n, float("nan")) for r in self.history_] for n in layers], dtype=torch.float64
        )
        peaks = torch.nan_to_num(matrix, nan=0.0).amax(dim=1, keepdim=True).clamp_min(1e-30)
        image = heatmap(matrix / peaks, layers, [str(r["epoch"]) for r in self.history_],
                        title=f"ARM per layer / its peak (reference: {self.reference})", value_label="ARM_l / peak")
        self.reporter.log_image(f"{self.tag}/per_layer", image)
        last = self.history_[-1]["per_layer"]
        self.reporter.log_text(
            f"{self.tag}/summary",
            markdown_table(["layer", "last ARM_l", "peak ARM_l", "settled"],
                           [[n, last.get(n, float("nan")), self._peaks.get(n, float("nan")), n in self.settled_layers_]
                            for n in layers]),
        )

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)  # the final model, if training ended before the schedule
        try:
            self._log_heatmap()
        except Exception as err:  # a failing plot must not fail the end of training
            if self.strict:
                raise
            self.warn_once(f"plot:{type(err).__name__}", f"ARMDrift could not draw its heat map: {err}")

    def fidelity_scores(self, trainer, pl_module, probe: ProbeData) -> dict[str, Tensor]:
        """Per-unit mean and standard deviation of the activations: what the coreset must preserve for W1."""
        return self.activation_profile(trainer, pl_module, probe)

    # -- checkpoint state ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved after this epoch's validation pass but before its end (``ModelCheckpoint`` on a
        validation metric) keeps the activations read from that pass: a run resumed from it re-enters the end
        of the epoch without validating again."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None or self._tapped is None or not self.keep_reference_in_checkpoint:
            return
        weights, activations = self._tapped
        if weights == WeightsFingerprint(pl_module):
            state["tapped"] = {"step": trainer.global_step, "activations": dict(activations)}

    def _extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "history": [dict(r) for r in self.history_],
            "settled_layers": list(self.settled_layers_),
            "streaks": dict(self._streaks),
            "peaks": dict(self._peaks),
            "reference_epoch": self.reference_epoch_,
            "reference_indices": self._reference_indices,
        }
        if self.keep_reference_in_checkpoint and self._references:
            state["reference_activations"] = {
                source: {n: t.contiguous().clone() for n, t in acts.items()}
                for source, acts in self._references.items()
            }
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.history_ = [dict(r) for r in state.get("history", [])]
        self.settled_layers_ = list(state.get("settled_layers", []))
        self._streaks = dict(state.get("streaks", {}))
        self._peaks = dict(state.get("peaks", {}))
        self.reference_epoch_ = state.get("reference_epoch")
        self._reference_indices = state.get("reference_indices")
        reference = state.get("reference_activations") or {}
        if reference and all(isinstance(t, Tensor) for t in reference.values()):
            reference = {OWN_PASS: reference}  # saved before references were kept per source: the own pass
        self._references = {source: dict(acts) for source, acts in reference.items()}
        tapped = state.get("tapped")
        self._restored_tap = (tapped["step"], dict(tapped["activations"])) if tapped else None
        if not self._references:
            self._reference_not_restored, self.reference_epoch_ = self.reference_epoch_, None


def _input_shape(probe: ProbeData) -> tuple[int, ...]:
    x, _, _ = next(probe.batches())
    return tuple(x.shape[1:])
