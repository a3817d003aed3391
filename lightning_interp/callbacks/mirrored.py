"""``MirroredInfluence``: flag mislabeled training samples (and leaked queries) during training.

Per scheduled epoch, the mirrored influence of a trusted set (the validation set by default) on every
training sample — a few descent steps on the trusted data on a parameter copy, then the change of each
training sample's loss from forward passes only (Ko et al., CVPR 2024; :mod:`lightning_interp.methods.mirrored`).
Scores are averaged over the scheduled epochs: one snapshot is noisy, the average over training is not.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..distributed import fail_together, gather_by_index, shard_positions
from ..methods.mirrored import (
    LEAK_TEMPERATURE,
    MISLABEL_RULE,
    OPTIMIZERS,
    UpdateRule,
    check_class_labels,
    head_gradient_directions,
    per_sample_loss,
    self_influence,
    top_relative_influence,
    trained_copy,
    translation_orbit,
)
from ..plots import image_gallery, looks_like_images
from ..probe import ProbeData, ProbeDataError, ProbeOutputs, evaluation_mode, model_device, run_probe
from ..report import markdown_table
from .base import (
    InterpretationCallback,
    PendingRead,
    _source_name,
    check_data_source,
    has_val_source,
    resolve_dataset,
)

DataSource = Union[Literal["val", "train"], Dataset]


class MirroredInfluence(InterpretationCallback):
    """Mislabeled-sample scores from the mirrored influence of trusted data, accumulated over training.

    At each scheduled epoch: θ'_T = ``steps`` full-batch ``optimizer`` descent steps (lr ``lr``) on the
    trusted set T, taken on a cloned parameter/buffer dict in eval mode; the score of training sample z_i
    is ``ℓ(z_i; θ'_T) − ℓ(z_i; θ)`` (Ko et al. 2024, Eq. 4, group form). ``scores_`` is the running mean of
    those scores over the scheduled epochs (per dataset index): a label that conflicts with clean data
    keeps getting worse whenever the model moves towards the clean data, while a single snapshot of a
    memorising model is noisy (benchmarks/mirrored.py, digits with 20% of labels flipped: AUROC 0.975 and
    precision@k 0.912 from the last run alone, 0.996 and 0.968 averaged over three runs).

    Args:
        trusted: the clean data whose influence is measured: ``"val"`` (the validation set), ``"train"`` (the
            training set itself, when no clean set exists: the majority label then plays the clean data) or a
            Dataset.
        steps, lr, optimizer: the update on the trusted set (``"adam"`` or ``"sgd"``); defaults measured
            on digits (docs/mirrored.md). Cost per run: ``steps`` forward+backward passes over T and two
            forward passes over the training probe (one shared with the other callbacks).
        threshold: a sample is flagged when its accumulated score (mean loss increase, in nats) exceeds it.
        max_flagged_fraction: alert when more than this fraction of the scored samples is flagged.
        leak_queries: ``"val"``, a Dataset, or ``None`` (off): for every query, the training sample it
            influences most under the relative mirrored influence of a head step (1 = exact copy). Not
            ``"train"``: every training sample is its own copy.
        leak_threshold: queries whose top influence exceeds it are reported in ``leaks_``. Exact and shifted
            copies score above 0.99999; clean queries reached 0.99925 on digits and 0.9995 on a text transformer, so
            0.999 reported false leaks. Jittered near-copies (0.996-0.999 on digits) overlap clean queries: no
            threshold separates them, though each is found top-1.
        leak_temperature: temperature of the loss whose head gradients are compared (10: jittered copies
            found, docs/mirrored.md).
        leak_shift_radius: image queries are also compared translated by up to this many pixels, so copies
            shifted before they entered training are found; costs ``(2r+1)^2`` forward passes per query
            (0: off).
        second_look_top_k: TracIn self-influence (‖∇ℓ‖² times the current learning rate, summed over the
            scheduled epochs as TracInCP sums over checkpoints) of the top-k flagged samples and of k random
            training samples for reference (0: off; costs per-sample gradients of 2k samples).
        log_top_k: rows of the flagged table and images of the gallery.
        every_n_epochs: run every n-th epoch (10: every 5 gave no better scores on digits, docs/mirrored.md).
        probe: the training data scored, ``"train"`` or a Dataset (``"val"`` only with leak search off or on
            other queries).
        probe_fidelity: off: a coreset's samples are scored as in the full set, so only its coverage is reported.
        **kwargs: the other base options (``probe_size``, ``alert_action``, ``strict``, ``batch_size``,
            ``batch_to_xy``, ...).

    Attributes:
        scores_: ``[len(train dataset)]`` accumulated scores by dataset index (NaN where never scored).
        flagged_: dataset indices with ``scores_ > threshold``, highest first.
        leaks_: ``(query dataset index, training dataset index, influence)`` above ``leak_threshold``,
            highest first (from the latest run).
        confirmed_: flagged indices (among the top-k checked) whose accumulated self-influence exceeds the
            90th percentile of the random reference samples' (only with ``second_look_top_k``).
        self_influence_: ``{dataset index: accumulated TracIn self-influence}`` of the samples checked.
        history_: one record per run: ``epoch``, ``flagged``, ``flagged_fraction``, ``leaks``, ``seconds``.
    """

    tag = "influence"
    chart_category = "influence"

    def __init__(
        self,
        trusted: DataSource = "val",
        steps: int = MISLABEL_RULE.steps,
        lr: float = MISLABEL_RULE.lr,
        optimizer: Literal["adam", "sgd"] = MISLABEL_RULE.optimizer,
        threshold: float = 1.0,
        max_flagged_fraction: float = 0.05,
        leak_queries: DataSource | None = "val",
        leak_threshold: float = 0.9999,
        leak_temperature: float = LEAK_TEMPERATURE,
        leak_shift_radius: int = 1,
        second_look_top_k: int = 0,
        log_top_k: int = 16,
        every_n_epochs: int = 10,
        probe: DataSource = "train",
        probe_fidelity: bool = False,
        **kwargs: Any,
    ) -> None:
        # probe_fidelity: scores are per sample, so a coreset's samples get the scores they get in the full
        # set; the only loss is coverage (the coreset size, which is logged), no rank fidelity to measure.
        super().__init__(every_n_epochs=every_n_epochs, probe=probe, probe_fidelity=probe_fidelity, **kwargs)
        check_data_source("trusted", trusted)
        check_data_source("leak_queries", leak_queries, optional=True)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.rule = UpdateRule(steps, lr, optimizer)  # validates steps and lr
        if isinstance(leak_queries, str) and leak_queries != "val":
            raise ValueError(f"leak_queries must be 'val', a Dataset or None, got {leak_queries!r}"
                             + (" (the training set searched against itself finds every sample)"
                                if leak_queries == "train" else ""))
        if leak_queries is not None and (leak_queries is probe or leak_queries == probe):
            raise ValueError(f"leak_queries and probe are the same data ({_source_name(probe)}): every query would "
                             "find itself among the scored samples. Set leak_queries=None or pass held-out data")
        if not 0.0 < max_flagged_fraction <= 1.0:
            raise ValueError(f"max_flagged_fraction must be in (0, 1], got {max_flagged_fraction}")
        if second_look_top_k < 0 or log_top_k < 0:
            raise ValueError("second_look_top_k and log_top_k must be >= 0")
        if not isinstance(leak_shift_radius, int) or leak_shift_radius < 0:
            raise ValueError(f"leak_shift_radius must be an int >= 0, got {leak_shift_radius!r}")
        if not leak_temperature > 0:
            raise ValueError(f"leak_temperature must be > 0, got {leak_temperature!r}")
        self.trusted = trusted
        self.threshold = float(threshold)
        self.max_flagged_fraction = float(max_flagged_fraction)
        self.leak_queries = leak_queries
        self.leak_threshold = float(leak_threshold)
        self.leak_temperature = float(leak_temperature)
        self.leak_shift_radius = leak_shift_radius
        self.second_look_top_k = int(second_look_top_k)
        self.log_top_k = int(log_top_k)

        self.history_: list[dict[str, Any]] = []
        self.leaks_: list[tuple[int, int, float]] = []
        self.self_influence_: dict[int, float] = {}
        self.confirmed_: list[int] = []
        self._score_sum: Tensor | None = None
        self._score_count: Tensor | None = None
        self._labels_seen: Tensor | None = None  # [N] int32: each training sample's label when last scored, -1 never
        self._trusted_xy: tuple[Tensor, Tensor] | None = None
        self._last_flagged: tuple[Tensor, ...] | None = None

    def _state_key_fields(self) -> dict[str, Any]:
        return {**super()._state_key_fields(), "trusted": _source_name(self.trusted),
                "leak_queries": _source_name(self.leak_queries)}

    def data_arguments(self) -> dict[str, Any]:
        return {**super().data_arguments(), "trusted": self.trusted, "leak_queries": self.leak_queries}

    # -- results ---------------------------------------------------------------------------------------
    @property
    def scores_(self) -> Tensor:
        if self._score_sum is None:
            raise AttributeError("scores_ is set after the first scheduled run (every_n_epochs)")
        return self._score_sum / self._score_count.where(self._score_count > 0, torch.nan)

    @property
    def flagged_(self) -> Tensor:
        scores = self.scores_.nan_to_num(float("-inf"))
        above = (scores > self.threshold).nonzero().squeeze(1)
        return above[scores[above].argsort(descending=True)]

    # -- setup: fail fast on configuration errors ------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.trusted == "val" and not has_val_source(trainer):
            raise ProbeDataError(
                "MirroredInfluence(trusted='val') needs validation data, but the trainer has none; pass "
                "val_dataloaders / a datamodule with val_dataloader(), or trusted=<a Dataset of clean samples>"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # loaded now, so labels that are not classes fail at the start (a configuration error, not a bad epoch)
        self._trusted_xy = self._load_labelled(trainer, self.trusted, "the trusted set", "trusted")

    def _load_labelled(self, trainer, source: DataSource, what: str, argument: str) -> tuple[Tensor, Tensor]:
        probe = ProbeData(resolve_dataset(trainer, source, argument), batch_size=self.batch_size,
                          batch_to_xy=self.batch_to_xy)
        xs, ys = [], []
        for x, y, _ in probe.batches("cpu"):
            if y is None:
                raise ProbeDataError(f"MirroredInfluence needs class labels, but {what} has none (inputs only)")
            xs.append(x)
            ys.append(y)
        y = torch.cat(ys)
        try:
            check_class_labels(y, what)
        except ValueError as err:
            raise ProbeDataError(f"MirroredInfluence needs class labels: {err}") from err
        return torch.cat(xs), y

    # -- one scheduled run -----------------------------------------------------------------------------
    def upcoming_read(self, trainer, pl_module) -> PendingRead | None:
        read = super().upcoming_read(trainer, pl_module)  # outputs (and the head's input for the leak search) only
        features = (self.head or True) if self.leak_queries is not None else False
        return None if read is None else replace(read, layers={}, features=features)

    def compute(self, trainer, pl_module, probe: ProbeData) -> None:
        start = time.perf_counter()
        if self._trusted_xy is None:
            self._trusted_xy = self._load_labelled(trainer, self.trusted, "the trusted set", "trusted")
        want_features = self.leak_queries is not None
        outs = _sorted_by_index(self.forward_probe(trainer, pl_module, probe, features=want_features))
        labels = outs.require_class_labels("MirroredInfluence").long()
        scores = self._mirrored_scores(trainer, pl_module, probe, outs.outputs, labels)
        self._accumulate(probe.dataset_size, outs.indices, scores, labels)
        if want_features:
            try:
                self._find_leaks(trainer, pl_module, outs)
            except ProbeDataError:
                raise
            except Exception as err:  # the mislabel scores stand on their own: report them regardless
                if self.strict:
                    raise
                self.warn_once(f"leaks:{type(err).__name__}", f"MirroredInfluence: the leak search failed ({err}); "
                               "the mislabel scores are reported without it")
        if self.second_look_top_k:
            self._second_look(trainer, pl_module, probe)
        self._report(trainer, pl_module, probe, outs, time.perf_counter() - start)

    def _mirrored_scores(self, trainer, pl_module, probe: ProbeData, logits: Tensor, labels: Tensor) -> Tensor:
        """``ℓ(θ'_T) − ℓ(θ)`` per probe row; under DDP each rank scores its shard and all gather it."""
        device = model_device(pl_module)
        x_t, y_t = (t.to(device) for t in self._trusted_xy)  # kept on the CPU between runs
        with evaluation_mode(pl_module, grad=True):
            _, updated, buffers = trained_copy(pl_module, x_t, y_t, self.rule)
        before = F.cross_entropy(logits.float(), labels, reduction="none")
        shard = probe
        if trainer.world_size > 1:
            shard = probe.subset(shard_positions(len(probe), trainer.global_rank, trainer.world_size))
        after, index = [], []
        with fail_together(trainer.strategy, "MirroredInfluence's scoring"), evaluation_mode(pl_module):
            for x, y, idx in shard.batches(device):
                after.append(per_sample_loss(pl_module, updated, buffers, x, y).float().cpu())
                index.append(idx)
        after_all, _ = gather_by_index(trainer.strategy, torch.cat(after), torch.cat(index))
        return after_all - before  # both sorted by dataset index

    def _accumulate(self, size: int, indices: Tensor, scores: Tensor, labels: Tensor) -> None:
        """Add one run's scores to the running mean of each training sample, restarting it where the sample behind an
        index changed: all of it when the training set changed size or its labels differ from the last runs' about as
        often as another dataset's would (other data, e.g. a second ``fit`` on another datamodule), the relabelled
        samples' alone otherwise. TracIn's second look restarts alike."""
        restart = self._score_sum is None
        if self._score_sum is not None and len(self._score_sum) != size:
            restart = True
            self.warn_once("dataset_size", f"MirroredInfluence: the training set now has {size} samples, not "
                           f"{len(self._score_sum)}; dataset indices no longer name the same samples, so the running "
                           f"mean restarts here (history_ keeps the earlier runs; scores_ holds runs from now on)")
        elif self._labels_seen is not None:
            restart = self._other_data_or_forget_relabelled(indices, labels)
        if restart:
            self._score_sum = torch.zeros(size, dtype=torch.float64)
            self._score_count = torch.zeros(size, dtype=torch.float64)
            self._labels_seen = torch.full((size,), -1, dtype=torch.int32)
            self.self_influence_, self.confirmed_ = {}, []
        self._labels_seen[indices] = labels.to(torch.int32)
        finite = scores.isfinite()
        if not finite.all():
            self.warn_once("nonfinite", "MirroredInfluence: some scores were not finite (the update diverged); "
                           "they are left out of the running mean — consider a smaller lr")
        self._score_sum.index_add_(0, indices[finite], scores[finite].double())
        self._score_count.index_add_(0, indices[finite], torch.ones(int(finite.sum()), dtype=torch.float64))

    def _other_data_or_forget_relabelled(self, indices: Tensor, labels: Tensor) -> bool:
        """Compare ``labels`` with those of the last scoring: ``True`` when another dataset looks to be behind the
        indices; otherwise the relabelled samples' accumulations are forgotten (one warning either way)."""
        seen = self._labels_seen[indices]
        known = seen >= 0
        changed = known & (seen != labels)
        if not bool(changed.any()):
            return False
        other_data = _looks_like_other_data(int(changed.sum()), labels[known])
        self.warn_once("labels_changed", (
            f"MirroredInfluence: {int(changed.sum())} of {int(known.sum())} training samples now carry other labels "
            "than when they were last scored, so " + (
                "the training data changed (another dataset behind the same indices): the running mean restarts "
                "here (history_ keeps the earlier runs)" if other_data else
                "they were relabelled: their running means restart here")))
        if not other_data:
            self._forget(indices[changed])
        return other_data

    def _forget(self, indices: Tensor) -> None:
        """Drop what was accumulated about the samples at ``indices`` (they are other samples now)."""
        self._score_sum[indices] = 0.0
        self._score_count[indices] = 0.0
        gone = set(indices.tolist())
        self.self_influence_ = {i: v for i, v in self.self_influence_.items() if i not in gone}
        self.confirmed_ = [i for i in self.confirmed_ if i not in gone]

    def _find_leaks(self, trainer, pl_module, train_outs) -> None:
        """Each query's most influenced training point, streamed over query batches (and their translations).

        Under DDP each rank scores its share of the queries against the (gathered) training set, and all ranks
        gather the per-query results in dataset-index order.
        """
        queries = ProbeData(resolve_dataset(trainer, self.leak_queries, "leak_queries"), batch_size=self.batch_size,
                            batch_to_xy=self.batch_to_xy)
        if trainer.world_size > 1:
            queries = queries.subset(shard_positions(len(queries), trainer.global_rank, trainer.world_size))
        rt, ft = head_gradient_directions(train_outs.outputs, train_outs.features, train_outs.labels,
                                          self.leak_temperature)
        with fail_together(trainer.strategy, "MirroredInfluence's leak search"):
            results, order = self._score_queries(pl_module, queries, train_outs, rt, ft)
        rows, query_index = gather_by_index(trainer.strategy, torch.cat(results), torch.cat(order))
        found = (rows[:, 0] > self.leak_threshold).nonzero().squeeze(1)
        found = found[rows[found, 0].argsort(descending=True)]
        self.leaks_ = [(int(query_index[i]), int(rows[i, 1]), float(rows[i, 0])) for i in found]

    def _score_queries(self, pl_module, queries: ProbeData, train_outs, rt: Tensor,
                       ft: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """This rank's queries, by batch: ``[top influence, training index]`` rows and the queries' indices."""
        results, order = [], []
        for x, y, index in queries.batches("cpu"):
            try:
                check_class_labels(y, "the leak queries")
            except ValueError as err:
                raise ProbeDataError(f"MirroredInfluence (leak queries) needs class labels: {err}") from err
            views = self._query_views(x)
            outs = run_probe(pl_module, ProbeData(TensorDataset(views.flatten(0, 1)), batch_size=self.batch_size),
                             features=self.head or True)
            g = len(views)
            rq, fq = head_gradient_directions(outs.outputs.view(g, len(x), -1), outs.features.view(g, len(x), -1),
                                              y.expand(g, len(x)), self.leak_temperature)
            values, best = top_relative_influence(rq, fq, rt, ft, top_k=1)
            results.append(torch.stack([values[:, 0].double(), train_outs.indices[best[:, 0]].double()], dim=1))
            order.append(index)
        return results, order

    def _query_views(self, x: Tensor) -> Tensor:
        """``[G, B, ...]``: the queries under every translation up to ``leak_shift_radius`` when they are images
        large enough for it, else as they are (``G = 1``; one warning when translations were asked for)."""
        if not self.leak_shift_radius or x.dim() != 4:
            return x[None]
        if min(x.shape[-2:]) <= self.leak_shift_radius:
            self.warn_once("leaks:too_small", f"MirroredInfluence: leak queries of spatial size {tuple(x.shape[-2:])} "
                           f"are too small for leak_shift_radius={self.leak_shift_radius}; they are compared "
                           "untranslated")
            return x[None]
        return translation_orbit(x, self.leak_shift_radius)

    def _second_look(self, trainer, pl_module, probe: ProbeData) -> None:
        k = self.second_look_top_k
        flagged = self.flagged_[:k]
        gen = torch.Generator().manual_seed(self.seed)
        reference = probe.indices[torch.randperm(len(probe), generator=gen)[:k]]
        lr = _current_lr(trainer)
        checked = torch.cat([flagged, reference]).unique()
        check = ProbeData(probe.dataset, checked, self.batch_size, self.batch_to_xy)
        batches = list(check.batches("cpu"))
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        with evaluation_mode(pl_module, grad=True):
            values = self_influence(pl_module, x, y) * lr
        for i, v in zip(check.indices.tolist(), values.tolist()):
            self.self_influence_[i] = self.self_influence_.get(i, 0.0) + v
        ref = torch.tensor([self.self_influence_[i] for i in reference.tolist()])
        bar = float(ref.quantile(0.9)) if len(ref) else float("inf")
        self.confirmed_ = [i for i in flagged.tolist() if self.self_influence_.get(i, 0.0) > bar]

    # -- logging and alerts ----------------------------------------------------------------------------
    def scalar_charts(self) -> dict[str, list[str]]:
        charts = {"flagged samples": [r"influence/flagged_count"], "flagged fraction": [r"influence/flagged_fraction"]}
        if self.leak_queries is not None:
            charts["leaks"] = [r"influence/leaks"]
        if self.second_look_top_k:
            charts["confirmed by TracIn"] = [r"influence/confirmed"]
        return {**charts, **super().scalar_charts()}

    def _report(self, trainer, pl_module, probe: ProbeData, outs, seconds: float) -> None:
        scores = self.scores_
        scored = int((self._score_count > 0).sum())
        flagged = self.flagged_
        fraction = len(flagged) / max(1, scored)
        self.history_.append({"epoch": self.analysed_epoch(trainer), "flagged": len(flagged),
                              "flagged_fraction": fraction, "leaks": len(self.leaks_), "seconds": seconds})
        metrics = {f"{self.tag}/flagged_count": len(flagged), f"{self.tag}/flagged_fraction": fraction}
        if self.leak_queries is not None:
            metrics[f"{self.tag}/leaks"] = len(self.leaks_)
        if self.second_look_top_k:
            metrics[f"{self.tag}/confirmed"] = len(self.confirmed_)
        self.reporter.log_scalars(metrics)
        self.reporter.log_histogram(f"{self.tag}/scores", scores[scores.isfinite()])
        if self.log_top_k and len(flagged):
            self._log_flagged(outs, flagged[: self.log_top_k])
        if self.leaks_:
            rows = [[qi, ti, f"{v:.4f}"] for qi, ti, v in self.leaks_[: self.log_top_k]]
            self.reporter.log_text(f"{self.tag}/leaks", markdown_table(["query", "train index", "influence"], rows))
        if fraction > self.max_flagged_fraction:
            self.alert(trainer, f"{self.tag}/flagged_fraction", fraction, self.max_flagged_fraction,
                       f"{len(flagged)} of {scored} training samples look mislabeled (mean mirrored loss "
                       f"increase > {self.threshold:g}); see {self.tag}/flagged and flagged_")

    def _log_flagged(self, outs: ProbeOutputs, top: Tensor) -> None:
        top = top[torch.isin(top, outs.indices)]
        position = torch.searchsorted(outs.indices, top)  # outs rows are sorted by dataset index
        self._last_flagged = (top, outs.labels[position], outs.outputs[position].argmax(1), self.scores_[top])
        rows = [[int(i), int(g), int(p), f"{float(s):.3f}"] for i, g, p, s in zip(*self._last_flagged)]
        self.reporter.log_text(f"{self.tag}/flagged",
                               markdown_table(["train index", "given label", "predicted", "score"], rows))

    def on_train_end(self, trainer, pl_module) -> None:
        """The image gallery of the top flagged samples, once, at the end of training."""
        super().on_train_end(trainer, pl_module)  # the final model, if training ended before the schedule
        if self._last_flagged is None or self.probe_ is None or not self._is_global_zero():
            return
        top, given, predicted, scores = self._last_flagged
        try:
            shown = ProbeData(self.probe_.dataset, top, len(top), self.batch_to_xy)
            x = torch.cat([b[0].cpu() for b in shown.batches()])
            if looks_like_images(x):
                captions = [f"#{int(i)} y={int(g)} pred={int(p)}\n{float(s):.2f}"
                            for i, g, p, s in zip(top, given, predicted, scores)]
                self.reporter.log_image(f"{self.tag}/flagged_gallery",
                                        image_gallery(x, captions, title="top flagged: given label y, predicted"))
        except Exception as err:  # logging must never end training
            if self.strict:
                raise
            self.warn_once("gallery", f"MirroredInfluence could not log the flagged gallery: {err}")

    # -- checkpoints -----------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"score_sum": self._score_sum, "score_count": self._score_count, "labels_seen": self._labels_seen,
                "history": list(self.history_),
                "leaks": list(self.leaks_), "self_influence": dict(self.self_influence_),
                "confirmed": list(self.confirmed_)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._score_sum = state.get("score_sum")
        self._score_count = state.get("score_count")
        self._labels_seen = state.get("labels_seen")
        if self._labels_seen is None and self._score_sum is not None:  # older checkpoints kept no labels
            self._labels_seen = torch.full((len(self._score_sum),), -1, dtype=torch.int32)
        self.history_ = list(state.get("history", []))
        self.leaks_ = [tuple(x) for x in state.get("leaks", [])]
        self.self_influence_ = dict(state.get("self_influence", {}))
        self.confirmed_ = list(state.get("confirmed", []))


def _looks_like_other_data(changed: int, labels: Tensor) -> bool:
    """Whether ``changed`` of ``len(labels)`` labels differing from the last scoring is what another dataset behind
    the same indices would give: more than half the disagreement of two independent draws from these labels' class
    frequencies (``1 - sum p_k^2``; 0.9 for ten balanced classes, 0.18 for a 9:1 binary split). Relabelling fixes
    fewer; erring the other way restarts more than needed, never mixes two datasets."""
    frequencies = torch.bincount(labels.long().clamp_min(0)).double() / max(len(labels), 1)
    chance = 1.0 - float((frequencies ** 2).sum())
    return changed > 0.5 * chance * len(labels)


def _sorted_by_index(outs: ProbeOutputs) -> ProbeOutputs:
    order = outs.indices.argsort()
    if torch.equal(order, torch.arange(len(order))):
        return outs
    pick = lambda t: t[order] if t is not None else None  # noqa: E731
    return ProbeOutputs(outs.outputs[order], pick(outs.labels), outs.indices[order],
                        {n: a[order] for n, a in outs.activations.items()}, pick(outs.features))


def _current_lr(trainer) -> float:
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (IndexError, KeyError, AttributeError):
        return 1.0
