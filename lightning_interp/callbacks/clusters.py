"""``LayerClusters``: how many groups each layer separates, and whether they are the classes.

Malmgren-Hansen, Nielsen, Engholm (arXiv 1702.07189): a variational Dirichlet-process GMM on a layer's
activations finds the number of groups the layer uses without being told. Shallow layers group by generic
texture and stroke; deep layers by class. Fitted during training, the counts and their agreement with the
labels show which layers have become class-specific (retrain them) and which stay generic (freeze them).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Union

import torch
import torch.nn.functional as F

from ..methods.dpgmm import (
    ClusterFit,
    check_fit_options,
    colorize_labels,
    fit_dpgmm_many,
    single_threaded,
    spatial_samples,
)
from ..plots import looks_like_images
from ..probe import ProbeData, ProbeOutputs, run_probe
from ..report import markdown_table
from .base import InterpretationCallback, ProbeSource

#: NMI with the classes below which a layer reads as "generic", and above which as "class-specific".
GENERIC_BELOW, SPECIFIC_ABOVE = 0.3, 0.6


class LayerClusters(InterpretationCallback):
    """Dirichlet-process GMM clusters of layer activations, logged to TensorBoard during training.

    Every ``every_n_epochs`` epochs, for every chosen layer, on ``probe_size`` probe samples:

    * a DP-GMM on the per-sample activations (conv maps averaged over space) gives the number of clusters
      the layer uses and, with class labels, their NMI and ARI with the classes;
    * for conv layers, a DP-GMM on the channel vector at every spatial position of the first
      ``label_map_fit_images`` probe images gives the paper's label maps, shown for ``label_map_images``
      images next to the input;
    * the pooled activations go to TensorBoard's projector with ``cluster``, ``label``, ``prediction`` and
      ``index`` columns (and input thumbnails when the inputs are images); see ``embeddings``.

    Args:
        every_n_epochs: run at the end of every n-th training epoch (one analysis takes 0.25-0.4 s on the
            demo at max_iter 200; every 10 epochs adds 16-22% to the demo's 3-second run, docs/benchmarks.md).
        probe: ``"val"``, ``"train"`` or a ``Dataset``.
        probe_size: samples analysed (a coreset of the probe, see ``probe_selector``); ``None`` = all. A probe
            smaller than this is analysed whole (one warning).
        truncation: DP truncation (paper: 50 components); capped at a quarter of the rows.
        concentration: DP concentration alpha (paper: 1).
        covariance_type: ``"diag"`` (paper), ``"spherical"``, ``"tied"`` or ``"full"``.
        scale: ``"global"`` (one scale for the layer) or ``"unit"`` (each unit standardised) before the PCA.
        max_dims: PCA width before the fit (wider layers are reduced).
        weight_cutoff: a component counts as a cluster when its weight is at least this (and it owns a sample).
        max_iter: variational EM iterations at most per fit (each stops when its lower bound settles, scikit-learn's
            rule). 200: on the demo's own layers 50 iterations stopped 13 of 14 fits early, with counts up to 5x the
            converged ones (conv2: 24 clusters, converged 5); 200 converged 13 of 14 (benchmarks/clusters.py (4)).
        n_init: initialisations per fit (best evidence lower bound kept).
        init_params: how the responsibilities start, named as in scikit-learn: ``"kmeans"`` (default; the
            batched torch k-means of :mod:`~lightning_interp.methods.vbgmm`), ``"k-means++"`` (its seeding
            alone), ``"random"`` or ``"random_from_data"`` (scikit-learn backend).
        label_map_images: label maps shown per conv layer (0 disables the label maps).
        label_map_fit_images: images whose positions are pooled into one per-position fit.
        max_label_map_positions: positions the per-position fit sees at most (all are then assigned).
        embeddings: projector embeddings of the pooled activations: ``"last"`` (the deepest analysed layer),
            ``"all"`` (one per layer) or ``"none"``. Columns: ``cluster`` (that layer's), ``cluster_<layer>`` for
            every layer, ``label``, ``prediction``, ``index`` (dataset index).
        max_change: alert when the cluster count of a layer changes by more than this fraction between two
            runs (and by at least 2 clusters); ``None`` disables it.
        collapse_alert: alert when a layer uses a single cluster.
        **kwargs: the base's arguments (``layers``, ``probe_selector``, ``alert_action``, ``strict``, ``seed``,
            ...), see :class:`~lightning_interp.callbacks.base.InterpretationCallback`.

    Attributes:
        results_: per layer name, the last run's ``{"n_clusters", "weights", "nmi", "ari", "labels",
            "position_clusters", "converged", "n_iter", "epoch", "n_components", "constant"}`` (``nmi``/``ari``
            ``None`` without labels; ``n_components``: the truncation used, 1 when the probe was too small for two;
            ``position_clusters`` ``None`` for non-conv layers; ``converged``: the per-sample fit's lower bound
            settled within ``max_iter``, otherwise its count overstates the converged one).
        history_: one row per run and layer: ``{"epoch", "layer", "n_clusters", "nmi", "ari",
            "position_clusters", "converged"}``.
    """

    tag = "clusters"
    chart_category = "clusters"

    def __init__(
        self,
        *,
        every_n_epochs: int = 10,
        probe: ProbeSource = "train",
        probe_size: Union[int, float, None] = 512,
        truncation: int = 50,
        concentration: float = 1.0,
        covariance_type: str = "diag",
        scale: str = "global",
        max_dims: int = 8,
        weight_cutoff: float = 0.01,
        max_iter: int = 200,
        n_init: int = 1,
        init_params: str = "kmeans",
        label_map_images: int = 4,
        label_map_fit_images: int = 8,
        max_label_map_positions: int = 1024,
        embeddings: str = "last",
        max_change: float | None = 0.5,
        collapse_alert: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, probe=probe, probe_size=probe_size, **kwargs)
        check_fit_options(truncation=truncation, concentration=concentration, max_dims=max_dims,
                          weight_cutoff=weight_cutoff, covariance_type=covariance_type, init_params=init_params,
                          max_iter=max_iter, n_init=n_init, scale=scale)
        for name, value in [("label_map_fit_images", label_map_fit_images),
                            ("max_label_map_positions", max_label_map_positions)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(label_map_images, int) or label_map_images < 0:
            raise ValueError(f"label_map_images must be an int >= 0, got {label_map_images!r}")
        if embeddings not in ("last", "all", "none"):
            raise ValueError(f"embeddings must be 'last', 'all' or 'none', got {embeddings!r}")
        if max_change is not None and not max_change > 0:
            raise ValueError(f"max_change must be > 0 or None, got {max_change!r}")
        self.fit_options = dict(
            truncation=truncation, concentration=concentration, covariance_type=covariance_type, scale=scale,
            max_dims=max_dims, weight_cutoff=weight_cutoff, max_iter=max_iter, n_init=n_init,
            init_params=init_params, seed=self.seed,
        )
        self.label_map_images = label_map_images
        self.label_map_fit_images = max(label_map_fit_images, label_map_images)
        self.max_label_map_positions = max_label_map_positions
        self.embeddings = embeddings
        self.max_change = max_change
        self.collapse_alert = collapse_alert
        self.results_: dict[str, dict[str, Any]] = {}
        self.history_: list[dict[str, Any]] = []

    # -- one run -------------------------------------------------------------------------------------------
    def compute(self, trainer, pl_module, probe: ProbeData) -> None:
        if pl_module.device.type == "cpu":
            with single_threaded():  # small work: one thread is faster, and leaves the cores to training
                return self._compute(trainer, pl_module, probe)
        return self._compute(trainer, pl_module, probe)

    def _compute(self, trainer, pl_module, probe: ProbeData) -> None:
        layers = self.select_layers(pl_module)
        outs = self.forward_probe(trainer, pl_module, probe, layers)
        classes = _class_labels(outs)
        maps, inputs = self._label_map_activations(pl_module, probe, layers)
        epoch = self.analysed_epoch(trainer)
        previous = {name: (r["n_clusters"], r.get("nmi")) for name, r in self.results_.items()}
        requests = {(name, "samples"): (outs.activations[name].flatten(1), classes, None) for name in layers}
        requests.update({(name, "positions"): (spatial_samples(m), None, self.max_label_map_positions)
                         for name, m in maps.items()})
        fits = self._fit_all(requests)
        results: dict[str, dict[str, Any]] = {}
        varying = set()  # conv layers whose label maps differ between images: their positions carry the samples
        for name in layers:
            fit = fits.get((name, "samples"))
            if fit is None:
                continue
            position_fit = fits.get((name, "positions"))
            label_maps = position_fit.labels.view(maps[name].shape[0], *maps[name].shape[2:]) if position_fit else None
            if label_maps is not None and bool((label_maps != label_maps[:1]).any()):
                varying.add(name)
            results[name] = {
                "n_clusters": fit.n_clusters, "weights": fit.weights, "nmi": fit.nmi, "ari": fit.ari,
                "labels": fit.labels, "position_clusters": position_fit.n_clusters if position_fit else None,
                "converged": fit.converged, "n_iter": fit.n_iter, "epoch": epoch,
                "n_components": fit.n_components, "constant": fit.constant,
            }
            self.history_.append({"epoch": epoch, "layer": name, "n_clusters": fit.n_clusters, "nmi": fit.nmi,
                                  "ari": fit.ari, "position_clusters": results[name]["position_clusters"],
                                  "converged": fit.converged})
            self._log_layer(name, fit, position_fit, label_maps, inputs)
        self.results_.update(results)
        if self.embeddings != "none" and results:
            self._log_embeddings(probe, outs, results)
        if results:
            self.reporter.log_text(f"{self.tag}/summary", self.summary_table(results, layers))
        self._check_alerts(trainer, results, previous, varying)

    def _fit_all(self, requests: dict[tuple[str, str], tuple]) -> dict[tuple[str, str], ClusterFit]:
        """All of this run's fits in one batched call; a warning once per layer and kind, failures skip it."""
        keys = list(requests)
        names = [f"layer {layer!r} ({kind})" for layer, kind in keys]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = fit_dpgmm_many([requests[k] for k in keys], names=names, **self.fit_options)
        for w in caught:  # keyed by layer and message without its numbers: a changing NaN count warns once
            name, _, text = str(w.message).partition(": ")
            self.warn_once(f"{name}:{re.sub(r'[0-9]+', '#', text)}", f"{type(self).__name__}: {w.message}")
        fits = {}
        for key, name, result in zip(keys, names, results):
            if isinstance(result, Exception):
                self.warn_once(f"skip:{name}", f"{type(self).__name__}: {name} skipped: {result}")
            else:
                fits[key] = result
        return fits

    def _label_map_activations(self, pl_module, probe: ProbeData, layers):
        """Unpooled maps ``[B, C, *spatial]`` of the conv layers for the first probe images, and the shown inputs."""
        if self.label_map_images == 0:
            return {}, None
        head = probe.subset(torch.arange(min(self.label_map_fit_images, len(probe))))
        outs = run_probe(pl_module, head, layers, pool=False)
        maps = {name: act for name, act in outs.activations.items()  # conv maps only: [N, C, *spatial]
                if act.dim() >= 3 and isinstance(layers[name], torch.nn.modules.conv._ConvNd)}
        if not maps:
            return {}, None
        inputs = torch.cat([x for x, _, _ in head.batches("cpu")])[: self.label_map_images]
        return maps, (inputs if looks_like_images(inputs) else None)

    def fidelity_scores(self, trainer, pl_module, probe: ProbeData) -> dict[str, torch.Tensor]:
        """The distribution the mixtures are fitted to (per-unit mean and std of each layer's pooled activations);
        the cluster counts themselves are a handful of integers, too few for a rank correlation to mean anything."""
        return self.activation_profile(trainer, pl_module, probe)

    # -- logging -------------------------------------------------------------------------------------------
    def scalar_charts(self) -> dict[str, list[str]]:
        charts = {"clusters per layer": [r"clusters/.*/n_clusters"],
                  "agreement with labels (NMI)": [r"clusters/.*/nmi"],
                  "agreement with labels (ARI)": [r"clusters/.*/ari"]}
        if self.label_map_images:
            charts["label-map clusters"] = [r"clusters/.*/position_clusters"]
        return {**charts, **super().scalar_charts()}

    def _log_layer(self, name, fit: ClusterFit, position_fit, label_maps, inputs) -> None:
        scalars = {f"{self.tag}/{name}/n_clusters": fit.n_clusters}
        if fit.nmi is not None:
            scalars[f"{self.tag}/{name}/nmi"] = fit.nmi
            scalars[f"{self.tag}/{name}/ari"] = fit.ari
        if position_fit is not None:
            scalars[f"{self.tag}/{name}/position_clusters"] = position_fit.n_clusters
        self.reporter.log_scalars(scalars)
        self.reporter.log_histogram(f"{self.tag}/{name}/weights", fit.weights)
        if label_maps is not None and label_maps.dim() == 3:
            shown = label_maps[: self.label_map_images]
            self.reporter.log_image(f"{self.tag}/{name}/label_maps", label_map_panel(shown, inputs))

    def _log_embeddings(self, probe: ProbeData, outs: ProbeOutputs, results) -> None:
        """Projector points of the deepest layer (or every layer); columns: each layer's cluster, label, prediction."""
        n = len(outs.indices)
        predictions = outs.outputs.argmax(1).tolist() if outs.outputs.dim() == 2 and outs.outputs.shape[1] > 1 else None
        labels = outs.labels.tolist() if outs.labels is not None and outs.labels.dim() == 1 else None
        names = list(results)
        columns = [
            ("cluster", results[names[-1]]["labels"].tolist()),
            *[(f"cluster_{name}", results[name]["labels"].tolist()) for name in names],
            ("label", labels or ["n/a"] * n),
            ("prediction", predictions or ["n/a"] * n),
            ("index", outs.indices.tolist()),
        ]
        header = [title for title, _ in columns]
        rows = [list(row) for row in zip(*(values for _, values in columns))]
        thumbnails = _thumbnails(probe, outs.indices)
        for name in names if self.embeddings == "all" else names[-1:]:
            rows_here = [[r[header.index(f"cluster_{name}")], *r[1:]] for r in rows]
            self.reporter.log_embedding(
                f"{self.tag}/{name}", outs.activations[name].flatten(1).nan_to_num(), metadata=rows_here,
                metadata_header=header, label_img=thumbnails,
            )

    def summary_table(self, results: dict[str, dict[str, Any]], layers) -> str:
        """Markdown: per layer by depth, clusters and agreement with the classes, and what it suggests."""
        rows = []
        for depth, name in enumerate(layers):
            r = results.get(name)
            if r is None:
                rows.append([depth, name, "skipped", "", "", "", "", ""])
                continue
            shown = ["n/a" if r[key] is None else r[key] for key in ("position_clusters", "nmi", "ari")]
            converged = r.get("converged")
            fit_state = "n/a" if converged is None else f"{'yes' if converged else 'no'} ({r.get('n_iter')} it.)"
            rows.append([depth, name, r["n_clusters"], *shown, fit_state, _reading(r["nmi"])])
        table = markdown_table(
            ["depth", "layer", "clusters (samples)", "clusters (positions)", "NMI", "ARI", "converged", "reading"], rows
        )
        return (table + f"\n\nReading: NMI < {GENERIC_BELOW} generic (freeze/transfer), > {SPECIFIC_ABOVE} "
                "class-specific (retrain for a new task).")

    # -- alerts --------------------------------------------------------------------------------------------
    def _check_alerts(self, trainer, results, previous: dict[str, tuple[int, float | None]],
                      varying: set[str] = frozenset()) -> None:
        """``varying``: conv layers whose label maps differ between images. Such a layer is not collapsed even
        when its per-sample averages form one group (a first conv layer's averages are close to a linear
        function of the input's mean); padding alone makes positions differ, images differing does not."""
        for name, r in results.items():
            count = r["n_clusters"]
            metric = f"{self.tag}/{name}/n_clusters"
            # too few samples for a second component (truncation shrunk to 1): one cluster is all the fit could say
            forced = r.get("n_components") == 1 and not r.get("constant", False)
            if self.collapse_alert and count == 1 and name not in varying and not forced:
                self.alert(trainer, metric, count, 1, f"layer {name!r} collapsed to one cluster on the probe: its "
                           "activations no longer separate the samples (dead, saturated or constant units?)")
                continue
            if self.max_change is None or name not in previous:
                continue
            before, nmi_before = previous[name]
            change = abs(count - before) / max(before, 1)
            if change > self.max_change and abs(count - before) >= 2:
                nmi = "" if nmi_before is None or r["nmi"] is None else (
                    f" (NMI with the classes {nmi_before:.2f} -> {r['nmi']:.2f})")
                self.alert(trainer, metric, count, self.max_change,
                           f"layer {name!r} went from {before} to {count} clusters since the last run "
                           f"({change:.0%} change): its representation is reorganising{nmi}")

    # -- state ---------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:  # results_ is small: weights [K], labels [probe] per layer
        return {"history": list(self.history_), "results": {name: dict(r) for name, r in self.results_.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.history_ = list(state.get("history", []))
        self.results_ = {name: dict(r) for name, r in state.get("results", {}).items()}
        if not self.results_ and state.get("last_counts"):  # older checkpoints kept the counts only
            self.results_ = {name: {"weights": None, "nmi": None, "ari": None, "labels": None,
                                    "position_clusters": None, **r} for name, r in state["last_counts"].items()}


def _reading(nmi: float | None) -> str:
    if nmi is None:
        return "n/a (no labels)"
    if nmi < GENERIC_BELOW:
        return "generic"
    return "class-specific" if nmi > SPECIFIC_ABOVE else "mixed"


def _class_labels(outs: ProbeOutputs) -> torch.Tensor | None:
    """Integer class labels ``[N]`` when the probe has them, else ``None`` (no NMI/ARI then)."""
    labels = outs.labels
    if labels is None or labels.dim() != 1 or labels.is_floating_point():
        return None
    return labels


def _thumbnails(probe: ProbeData, indices: torch.Tensor, side: int = 32) -> torch.Tensor | None:
    """The probe's inputs in the order of ``indices``, at most ``side`` pixels high, when they are images."""
    xs, idx = [], []
    for x, _, i in probe.batches("cpu"):
        if not looks_like_images(x):
            return None
        xs.append(x.float())
        idx.append(i)
    images, order = torch.cat(xs), torch.cat(idx)
    position = {int(d): p for p, d in enumerate(order.tolist())}
    images = images[torch.tensor([position[int(d)] for d in indices.tolist()])]
    if images.shape[-2] > side:
        images = F.interpolate(images, size=(side, side * images.shape[-1] // images.shape[-2]), mode="area")
    return _unit_range(images[:, :3])


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """Each image min-max scaled to [0, 1]."""
    flat = images.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    return ((flat - low[:, None]) / (high - low).clamp_min(1e-12)[:, None]).view_as(images)


def label_map_panel(label_maps: torch.Tensor, inputs: torch.Tensor | None = None, min_side: int = 64,
                    gap: int = 2) -> torch.Tensor:
    """``[3, H, W]`` image: one column per image, its input on top and its coloured label map below.

    ``label_maps`` are ``[B, h, w]`` cluster ids (a colour per id, the same in every column); ``inputs``
    ``[B, C, H, W]`` images or ``None`` (label maps only). Both are upsampled (nearest) to one tile size.
    """
    reference = inputs if inputs is not None else label_maps[:, None]
    height, width = reference.shape[-2:]
    factor = max(1, -(-min_side // min(height, width)))
    size = (height * factor, width * factor)
    tiles = [F.interpolate(colorize_labels(label_maps, int(label_maps.max()) + 1), size=size, mode="nearest")]
    if inputs is not None:
        shown = _unit_range(inputs[: len(label_maps)].float().cpu())
        shown = shown if shown.shape[1] == 3 else shown[:, :1].expand(-1, 3, -1, -1)
        tiles = [F.interpolate(shown, size=size, mode="nearest"), torch.ones(len(shown), 3, gap, size[1]), *tiles]
    columns = F.pad(torch.cat(tiles, dim=2), (0, gap), value=1.0)  # [B, 3, H', W' + gap]
    return columns.permute(1, 2, 0, 3).reshape(3, columns.shape[2], -1)
