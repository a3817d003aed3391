"""``ComponentAttribution``: COAR component attributions at checkpoints (Shah, Ilyas, Madry 2024)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Union

import torch

from ..capture import describe_layers
from ..methods.coar import (
    LAYER_KINDS,
    AblationError,
    Components,
    fit_attributions,
    find_components,
    heldout_correlation,
    silent_modules,
)
from ..probe import ProbeData, ProbeDataError, model_device
from ..report import markdown_table, run_dir
from .base import InterpretationCallback, ProbeSource


class ComponentAttribution(InterpretationCallback):
    """Fit COAR's linear model of the margins under component ablation, at checkpoints, on a probe set.

    For each probe example ``z`` and component ``c`` (conv channel, Linear neuron, attention head), the
    attribution ``w_zc`` is the coefficient of a least-squares fit ``f_z(v) ~ b_z + w_z^T v`` of the
    correct-class margin against random keep masks ``v`` (each component ablated with probability
    ``alpha``; paper Eq. 1). The fit's quality is the mean per-example Pearson correlation on fresh masks.

    Args:
        alpha: fraction of components ablated per mask, in (0, 1).
        n_masks: masks for the fit (cost: ``n_masks x probe examples`` forward rows). Below the number of
            components the fit leans on ``ridge``.
        n_eval_masks: fresh masks for the held-out correlation (cost as above).
        ridge: L2 penalty relative to the mean squared error (0 is the paper's plain least squares).
        layer_types: component kinds: ``"conv"`` (output channels), ``"linear"`` (neurons), ``"attention"`` (heads).
        at_checkpoints: run when a checkpoint is saved (a ``ModelCheckpoint`` save or ``trainer.save_checkpoint``),
            at most once every ``every_n_epochs`` epochs (if none was due by the end of training, the final model
            is analysed then); ``False`` runs at the end of every n-th epoch instead. Without a
            ``ModelCheckpoint`` that saves full checkpoints (none, or only ``save_weights_only=True`` ones, for
            which Lightning calls no callback hook): one warning, then the epoch schedule.
        every_n_epochs: spacing of the runs (see ``at_checkpoints``).
        min_correlation: alert when the held-out correlation falls below it (the linear model no longer
            explains the network).
        dominance_threshold: alert when one component holds more than this share of a class's total
            absolute (class-mean) attribution.
        top_k: components per class in the logged table.
        plot_every_n_runs: heat map of the class-mean attributions every n runs; ``None``: once, at the end of
            training (a render costs ~10 ms).
        max_batch_size: most rows (masks x examples) in one forward pass; more is chunked.
        save_attributions: write the attributions next to the checkpoint (``<checkpoint>.components.pt``),
            or under ``<log_dir>/component_attributions/`` for runs without a checkpoint. When a
            ``ModelCheckpoint`` later deletes a checkpoint (``save_top_k``), its attribution file goes too.
        progress_bar: show a tqdm bar over the ablation passes (only when the trainer shows its own).
        probe, probe_size, probe_selector, probe_balance, layers, ...: see
            :class:`~lightning_interp.callbacks.base.InterpretationCallback`; ``layers`` globs choose the
            modules whose components are attributed (default: every eligible module but the output layer).
            Chosen modules that ``forward()`` calls on none of the probe examples are left out with one warning.

    Attributes:
        attributions_: ``[probe examples, components]`` effect on each margin of keeping each component.
        bias_: ``[probe examples]`` intercepts.
        component_names_: readable names, e.g. ``conv2[17]``, ``encoder.attn.head[3]``.
        correlation_: mean held-out Pearson correlation; ``correlations_`` per example.
        class_attributions_: ``[classes, components]`` class means of the attributions; ``classes_``.
        probe_indices_: dataset index of each row; ``labels_``: their labels.
        history_: one record per run: ``epoch``, ``step``, ``correlation``, ``n_components``, ``files`` (the
            attribution files written).
    """

    tag = "components"
    chart_category = "components"
    runs_on_epoch_schedule = False  # checkpoints, and the final model when nothing was due

    def __init__(
        self,
        *,
        alpha: float = 0.1,
        n_masks: int = 128,
        n_eval_masks: int = 24,
        ridge: float = 0.01,
        layer_types: list[str] | None = None,
        at_checkpoints: bool = True,
        every_n_epochs: int = 10,
        min_correlation: float = 0.5,
        dominance_threshold: float = 0.5,
        top_k: int = 5,
        plot_every_n_runs: int | None = None,
        max_batch_size: int = 8192,
        save_attributions: bool = True,
        progress_bar: bool = True,
        probe: ProbeSource = "val",
        probe_size: Union[int, float, None] = 12,
        probe_balance: bool = True,
        probe_fidelity: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs, probe=probe, probe_size=probe_size, probe_balance=probe_balance,
            probe_fidelity=probe_fidelity, **kwargs,
        )
        layer_types = ["conv", "linear", "attention"] if layer_types is None else list(layer_types)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha (the fraction of components ablated per mask) must lie in (0, 1), got {alpha}")
        if n_masks < 2 or n_eval_masks < 2:
            raise ValueError(f"n_masks and n_eval_masks must be >= 2, got {n_masks} and {n_eval_masks}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if unknown := [t for t in layer_types if t not in LAYER_KINDS]:
            raise ValueError(f"layer_types {unknown} unknown; choose among {sorted(LAYER_KINDS)}")
        if not -1.0 <= min_correlation <= 1.0:
            raise ValueError(f"min_correlation must lie in [-1, 1], got {min_correlation}")
        if not 0.0 < dominance_threshold <= 1.0:
            raise ValueError(f"dominance_threshold must lie in (0, 1], got {dominance_threshold}")
        if top_k < 1 or max_batch_size < 1:
            raise ValueError(f"top_k and max_batch_size must be >= 1, got {top_k} and {max_batch_size}")
        if plot_every_n_runs is not None and plot_every_n_runs < 1:
            raise ValueError(f"plot_every_n_runs must be >= 1 or None, got {plot_every_n_runs}")
        self.alpha, self.n_masks, self.n_eval_masks, self.ridge = float(alpha), n_masks, n_eval_masks, float(ridge)
        self.layer_types = layer_types
        self.at_checkpoints = at_checkpoints
        self.min_correlation, self.dominance_threshold = float(min_correlation), float(dominance_threshold)
        self.top_k, self.max_batch_size, self.plot_every_n_runs = top_k, max_batch_size, plot_every_n_runs
        self.save_attributions, self.progress_bar = save_attributions, progress_bar

        self.history_: list[dict[str, Any]] = []
        self._use_epoch_schedule = not at_checkpoints
        self._last_run: tuple[int, int] | None = None  # (epoch, global step)
        self._postponed_step: int | None = None  # the step whose checkpoint run max_overhead postponed
        self._pending: dict[str, Any] | None = None  # a result computed during a checkpoint save, file unwritten
        self._written_next_to: dict[Path, Path] = {}  # attribution file -> the checkpoint it belongs to
        self._plotted_run: int | None = None  # len(history_) when the heat map was last drawn

    # -- schedule ------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        full_checkpoints = [cb for cb in trainer.checkpoint_callbacks if not getattr(cb, "save_weights_only", False)]
        if self.at_checkpoints and not full_checkpoints:
            # Lightning calls on_save_checkpoint only for full checkpoints, so weights-only ones never trigger it.
            self._use_epoch_schedule = True
            found = "only weights-only ModelCheckpoints" if trainer.checkpoint_callbacks else "no ModelCheckpoint"
            self.warn_once(
                "no_checkpoint",
                f"ComponentAttribution(at_checkpoints=True) found {found}; it runs at the end of every "
                f"{self.every_n_epochs}-th epoch instead",
            )
        if self._use_epoch_schedule:
            self._warn_if_schedule_unreachable(trainer, stage)

    def _check_layers(self, pl_module) -> None:
        find_components(pl_module, self.layers, self.layer_types, head=self.head)  # fails fast, naming the layers found

    def _scheduled(self, epoch: int) -> bool:
        return self._use_epoch_schedule and super()._scheduled(epoch)

    def _checkpoint_due(self, epoch: int) -> bool:
        if self._last_run is None:
            return epoch + 1 >= self.every_n_epochs
        return epoch - self._last_run[0] >= self.every_n_epochs

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._pending is not None and self._pending["step"] != trainer.global_step:
            self._flush_pending(trainer)
        if self._use_epoch_schedule or trainer.sanity_checking:
            return
        if self._last_run is not None and self._last_run[1] == trainer.global_step:
            return  # a second file at the same step (e.g. top-k and last): same weights, one analysis
        if not self._checkpoint_due(trainer.current_epoch):
            return
        if self._budget is not None and self._fit_clock is not None:
            if self._postponed_step == trainer.global_step:
                return  # a second file at the same step: postponed once
            if not self._within_budget(trainer):
                self._postponed_step = trainer.global_step
                self._budget.note_postponed()  # the next checkpoint is due again
                self._report_postponed(trainer.current_epoch)
                return
        started = time.time()
        self.run_now(trainer, pl_module)
        if self._last_run is not None and self._last_run[1] == trainer.global_step:
            self._pending = {"since": started, "step": trainer.global_step}
            if self.state_key in checkpoint.get("callbacks", {}):  # the state was captured before this run
                checkpoint["callbacks"][self.state_key] = self.state_dict()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._flush_pending(trainer)
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush_pending(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush_pending(trainer)
        # No checkpoint came when one was due (e.g. the monitored metric stopped improving), or training ended
        # before the epoch schedule came due: analyse the final model rather than end the run without a result.
        final = self._final_run_wanted(trainer) if self._use_epoch_schedule else (
            self._last_run is None and self.cost_["runs"] == 0  # runs that failed are not tried once more
            and trainer.global_step > self._fit_start[0])  # a resumed fit that trained nothing has nothing new
        if final:
            runs_before = len(self.history_)
            with self.after_training():
                self.run_now(trainer, pl_module)
                # on the epoch schedule compute() has saved it; a failed run (or a resumed _last_run) has nothing
                if self.save_attributions and not self._use_epoch_schedule and len(self.history_) > runs_before:
                    self._save([self._epoch_file(trainer)], trainer)
        unplotted = hasattr(self, "class_attributions_") and self._plotted_run != len(self.history_)
        if self.plot_every_n_runs is None and unplotted:
            try:
                self._plot()
            except Exception as err:  # never fail the end of a finished run over a picture
                if self.strict:
                    raise
                self.warn_once(f"plot:{err}", f"ComponentAttribution could not draw its heat map: {err}")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._flush_pending(trainer, final=True)

    # -- the analysis --------------------------------------------------------------------------------------
    def compute(self, trainer, pl_module, probe: ProbeData) -> None:
        x, y, indices = _probe_tensors(probe, model_device(pl_module))
        components = self._components(pl_module, x)
        seed = self.seed + self.analysed_epoch(trainer)
        with self._progress(trainer, self.n_masks + self.n_eval_masks) as advance:
            weights, bias = fit_attributions(
                pl_module, components, x, y, self.n_masks, self.alpha, seed, self.max_batch_size, self.ridge, advance
            )
            correlations = heldout_correlation(
                pl_module, components, x, y, {"coar": (weights, bias)}, self.n_eval_masks, self.alpha,
                seed + 1_000_003, self.max_batch_size, advance,
            )["coar"]
        self.attributions_, self.bias_, self.correlations_ = weights, bias, correlations
        self.correlation_ = float(correlations.nanmean())
        self.component_names_ = components.names
        self.probe_indices_, self.labels_ = indices, y.cpu()
        self.classes_ = self.labels_.unique()
        self.class_attributions_ = torch.stack([weights[self.labels_ == k].mean(0) for k in self.classes_])
        self._last_run = (self.analysed_epoch(trainer), trainer.global_step)
        self.history_.append({
            "epoch": self.analysed_epoch(trainer), "step": trainer.global_step, "correlation": self.correlation_,
            "n_components": len(components), "files": [],
        })
        self._report(trainer)
        self._check_alerts(trainer)
        if self._use_epoch_schedule and self.save_attributions:
            self._save([self._epoch_file(trainer)], trainer)

    def fidelity_scores(self, trainer, pl_module, probe: ProbeData) -> torch.Tensor:
        """Per-component attribution averaged over ``probe`` (the class-agnostic summary of a run).

        Both the coreset and the reference are fitted with the same seed, hence the same masks, and COAR's
        per-example least squares are independent: a coreset example gets the attribution it gets in the
        reference fit, and only the averaging differs. Every chosen component is fitted here, also one that
        forward() skips on these examples, so the two vectors always have the same components.
        """
        x, y, _ = _probe_tensors(probe, model_device(pl_module))
        components = find_components(pl_module, self.layers, self.layer_types, head=self.head)
        weights, _ = fit_attributions(pl_module, components, x, y, self.n_masks, self.alpha,
                                      self.seed + self.analysed_epoch(trainer), self.max_batch_size, self.ridge)
        return weights.mean(0)

    def upcoming_read(self, trainer, pl_module) -> None:
        return None  # ablated forward passes of its own: nothing another callback's pass could serve

    def _components(self, pl_module, x: torch.Tensor) -> Components:
        """The components to attribute: those of the chosen layers that ``forward()`` calls on the probe examples
        ``x``. The others (unused modules, or experts the router picks for none of these examples) are left out
        with one warning: ablating them cannot change a margin here, so their attributions would only fit noise."""
        components = find_components(pl_module, self.layers, self.layer_types, head=self.head)
        silent = silent_modules(pl_module, components, x, self.max_batch_size)
        if not silent:
            return components
        ran = [g.name for g in components.groups if g.name not in silent]
        if not ran:
            raise AblationError(
                f"forward() calls none of the chosen layers {silent} on the {len(x)} probe examples, so no ablation "
                f"can change a margin; choose layers the forward pass uses. Available layers: "
                f"{describe_layers(pl_module)}")
        self.warn_once(f"components:silent:{silent}", f"ComponentAttribution leaves out {silent}: forward() calls "
                       f"them on none of the {len(x)} probe examples, so ablating them could not change a margin "
                       "(unused modules, or experts the router picks for none of these examples)")
        return components.without(silent)

    def _progress(self, trainer, total: int):
        trainer_shows_bars = getattr(trainer, "progress_bar_callback", None) is not None
        show = self.progress_bar and trainer.is_global_zero and trainer_shows_bars
        if not show:
            return contextlib.nullcontext(None)
        from tqdm.auto import tqdm

        @contextlib.contextmanager
        def bar():
            with tqdm(total=total, desc="COAR ablation masks", leave=False, dynamic_ncols=True) as pbar:
                yield pbar.update

        return bar()

    def _dominance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class, the largest share of the total absolute class-mean attribution held by one component."""
        magnitude = self.class_attributions_.abs()
        share, top = (magnitude / magnitude.sum(1, keepdim=True).clamp_min(1e-12)).max(1)
        return share, top

    def _report(self, trainer) -> None:
        share, _ = self._dominance()
        self.reporter.log_scalars({
            f"{self.tag}/correlation": self.correlation_,
            f"{self.tag}/correlation_p10": float(self.correlations_.nan_to_num(0.0).quantile(0.1)),
            f"{self.tag}/dominance_max": float(share.max()),
            f"{self.tag}/n_components": float(len(self.component_names_)),
        })
        self.reporter.log_histogram(f"{self.tag}/attributions", self.attributions_)
        k = min(self.top_k, len(self.component_names_))
        values, top = self.class_attributions_.topk(k, dim=1)
        rows = [
            [int(c), ", ".join(f"`{self.component_names_[i]}` {v:+.3g}" for i, v in zip(t.tolist(), vals.tolist()))]
            for c, t, vals in zip(self.classes_, top, values)
        ]
        header = f"held-out correlation {self.correlation_:.3f} (alpha {self.alpha}, {self.n_masks} masks)\n\n"
        table = markdown_table(["class", f"top {k} components (attribution)"], rows)
        self.reporter.log_text(f"{self.tag}/top_per_class", header + table)
        if self.plot_every_n_runs is not None and len(self.history_) % self.plot_every_n_runs == 0:
            self._plot()

    def _plot(self) -> None:
        """Heat map classes x (each class's 3 strongest components, at most 24 columns) of class-mean attributions."""
        from ..plots import heatmap

        top = self.class_attributions_.topk(min(3, len(self.component_names_)), dim=1).indices
        columns = top.flatten().unique()[:24]
        image = heatmap(
            self.class_attributions_[:, columns], [f"class {int(c)}" for c in self.classes_],
            [self.component_names_[i] for i in columns.tolist()],
            title=f"COAR attribution (class mean), epoch {self.history_[-1]['epoch']}",
            cmap="RdBu_r", value_label="margin effect of keeping",
        )
        self.reporter.log_image(f"{self.tag}/class_heatmap", image, step=self.history_[-1]["step"])
        self._plotted_run = len(self.history_)

    def _check_alerts(self, trainer) -> None:
        if self.correlation_ < self.min_correlation:
            self.alert(
                trainer, f"{self.tag}/correlation", self.correlation_, self.min_correlation,
                "the linear component model no longer explains the network's margins under ablation; its "
                "attributions are unreliable (raise n_masks or lower alpha)",
            )
        share, top = self._dominance()
        worst = int(share.argmax())
        if float(share[worst]) > self.dominance_threshold:
            self.alert(
                trainer, f"{self.tag}/dominance", float(share[worst]), self.dominance_threshold,
                f"class {int(self.classes_[worst])} depends on a single component, "
                f"{self.component_names_[int(top[worst])]} ({float(share[worst]):.0%} of its attribution)",
            )

    def scalar_charts(self) -> dict[str, list[str]]:
        return {"held-out correlation": [r"components/correlation.*"],
                "single-component dominance": [r"components/dominance.*"], **super().scalar_charts()}

    # -- files ---------------------------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return {
            "attributions": self.attributions_, "bias": self.bias_, "component_names": self.component_names_,
            "correlations": self.correlations_, "correlation": self.correlation_,
            "dataset_indices": self.probe_indices_, "labels": self.labels_, "alpha": self.alpha,
            "n_masks": self.n_masks, "epoch": self.history_[-1]["epoch"], "step": self.history_[-1]["step"],
        }

    def _save(self, paths: list[Path], trainer) -> None:
        if not paths or trainer.fast_dev_run:
            return
        if trainer.is_global_zero:  # one writer; every rank records the paths, so all ranks' histories agree
            record = self._record()
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(record, path)
        self.history_[-1]["files"] = [str(p) for p in paths]

    def _epoch_file(self, trainer) -> Path:
        root = run_dir(trainer) / "component_attributions"
        return root / f"epoch={self.analysed_epoch(trainer)}-step={trainer.global_step}.components.pt"

    def _flush_pending(self, trainer, final: bool = False) -> None:
        """Write the result of the last checkpoint-time run next to the checkpoint file(s) saved with it, and
        remove the files whose checkpoint a ``ModelCheckpoint`` has deleted since."""
        self._remove_orphaned_files()
        if self._pending is None:
            return
        saved = _checkpoints_saved_since(trainer, self._pending["since"], self._pending["step"])
        if not saved and not final:
            return
        self._pending = None
        if self.save_attributions:
            self._save([attribution_path(p) for p in saved] or [self._epoch_file(trainer)], trainer)
            if trainer.is_global_zero:
                self._written_next_to.update({attribution_path(p): p for p in saved})

    def _remove_orphaned_files(self) -> None:
        for attributions, checkpoint in list(self._written_next_to.items()):
            if not checkpoint.exists():
                attributions.unlink(missing_ok=True)
                del self._written_next_to[attributions]

    def _extra_state(self) -> dict[str, Any]:
        return {"history": list(self.history_), "last_run": self._last_run}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.history_ = list(state.get("history", []))
        self._last_run = state.get("last_run")


def attribution_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where the attributions of a checkpoint go: ``epoch=3-step=40.ckpt`` -> ``epoch=3-step=40.components.pt``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ".components.pt")


def _checkpoints_saved_since(trainer, since: float, step: int) -> list[Path]:
    """Checkpoint files the trainer's ModelCheckpoints wrote at ``step``, no earlier than ``since``."""
    found: set[Path] = set()
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "_last_global_step_saved", step) != step:
            continue
        candidates = {
            getattr(callback, "_last_checkpoint_saved", ""), callback.last_model_path, callback.best_model_path,
            *getattr(callback, "best_k_models", {}),
        }
        for name in filter(None, candidates):
            path = Path(name)
            if path.is_file() and path.stat().st_mtime >= since:
                found.add(path)
    return sorted(found)


def _probe_tensors(probe: ProbeData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, idx = [], [], []
    for x, y, index in probe.batches(device):
        if y is None:
            raise ProbeDataError(
                "ComponentAttribution needs class labels for the margins; the probe batches carry none")
        xs.append(x)
        ys.append(y)
        idx.append(index)
    y = torch.cat(ys)
    if y.is_floating_point() or y.dim() != 1:
        raise ProbeDataError(f"ComponentAttribution needs integer class labels [N], got {y.dtype} {tuple(y.shape)}")
    return torch.cat(xs), y, torch.cat(idx)
