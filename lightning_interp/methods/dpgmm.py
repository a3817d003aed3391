"""Dirichlet-process Gaussian mixtures of layer activations.

Malmgren-Hansen, Nielsen, Engholm, "Analyzing Learned Convnet Features with Dirichlet Process Gaussian
Mixture Models" (arXiv 1702.07189). A layer's activations are modelled as an infinite mixture

    p(a) = sum_k pi_k N(a | mu_k, diag(sigma_k^2)),   pi_k = v_k prod_{j<k} (1 - v_j),   v_k ~ Beta(1, alpha)

(the stick-breaking construction of DP(alpha, G0)), fitted by variational inference truncated at
``truncation`` components (scikit-learn's ``BayesianGaussianMixture`` with
``weight_concentration_prior_type="dirichlet_process"``). The number of components that keep
posterior weight is the number of groups the layer separates, found without labels.

Two readings of one layer:

* per sample (:func:`fit_dpgmm` on pooled ``[N, C]`` vectors): cluster count and, when labels exist,
  agreement with the classes (NMI, ARI) — "generic" layers agree little, "specific" ones a lot;
* per spatial position (:func:`fit_label_maps` on ``[B, C, H, W]`` maps): every position's channel
  vector is one sample; the cluster ids reshaped to ``H x W`` are the paper's label maps.

Preprocessing (the paper rescales activations; the exact scaling is not stated): constant features are
dropped, the rest centred and divided by one global scale (``scale="global"``: relative unit magnitudes
kept, so the PCA below is a covariance PCA) or each by its own standard deviation (``scale="unit"``: a
correlation PCA, where a noise unit weighs as much as an informative one). Then, when more than
``max_dims`` features remain, they are projected on the leading ``max_dims`` principal axes (torch, on the
tensor's device; :func:`pca_reduce`). Scores are not whitened, so minor axes do not amplify noise. The
mixture itself runs in torch (:mod:`~lightning_interp.methods.vbgmm`, scikit-learn's updates, float32 on CPU,
several fits in one batch) or in scikit-learn, seeded by ``seed`` only (torch's and numpy's global RNGs are
untouched).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.mixture import BayesianGaussianMixture
from threadpoolctl import ThreadpoolController

from .vbgmm import MixtureFit, fit_dp_mixtures

__all__ = [
    "ClusterFit",
    "DEFAULT_WEIGHT_CUTOFF",
    "INIT_METHODS",
    "rescale",
    "pca_reduce",
    "fit_dpgmm",
    "fit_dpgmm_many",
    "spatial_samples",
    "fit_label_maps",
    "cluster_agreement",
    "cluster_palette",
    "single_threaded",
    "colorize_labels",
]

#: A component counts as a cluster when its expected mixture weight is at least this (1% of the data).
DEFAULT_WEIGHT_CUTOFF = 0.01


@dataclass
class ClusterFit:
    """The result of one DP-GMM fit.

    Components are relabelled by decreasing weight: cluster 0 is the heaviest.

    Attributes:
        n_clusters: effective number of clusters, components with ``weight >= weight_cutoff``.
        weights: ``[n_components]`` expected mixture weights ``E[pi_k]``, descending (CPU float).
        labels: ``[N]`` cluster id per input row (CPU long); ``-1`` for rows skipped as non-finite.
        nmi: normalised mutual information of ``labels`` with the given classes (``None`` without classes).
        ari: adjusted Rand index of ``labels`` with the given classes (``None`` without classes).
        n_components: truncation actually used (shrunk when there are fewer rows than ``truncation``).
        n_dims: dimensions the mixture saw (after PCA).
        explained_variance: share of the rescaled variance kept by the PCA (1.0 without PCA).
        converged: whether variational inference converged within ``max_iter``.
        n_iter: iterations of the best initialisation.
        constant: the activations had no variance; one cluster is returned without fitting.
    """

    n_clusters: int
    weights: torch.Tensor
    labels: torch.Tensor
    nmi: float | None
    ari: float | None
    n_components: int
    n_dims: int
    explained_variance: float
    converged: bool
    n_iter: int
    constant: bool = False


SCALES = ("global", "unit")


def rescale(x: torch.Tensor, scale: str = "global") -> torch.Tensor:
    """Centred columns of ``x [N, D]`` that vary, divided by one RMS (``"global"``) or each by its std (``"unit"``).

    Columns without variance (relative to their magnitude) are dropped; the result may have 0 columns.
    """
    centred = x - x.mean(dim=0, keepdim=True)
    std = centred.pow(2).mean(dim=0).sqrt()
    varying = std > 1e-6 * x.abs().amax(dim=0).clamp_min(1.0)
    centred, std = centred[:, varying], std[varying]
    if centred.shape[1] == 0:
        return centred
    if scale == "unit":
        return centred / std
    return centred / std.pow(2).mean().sqrt()


def pca_reduce(x: torch.Tensor, max_dims: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Scores of centred ``x [N, D]`` on its leading ``max_dims`` principal axes, and the variance share kept.

    The axes are the top eigenvectors of the ``D x D`` covariance (``torch.linalg.eigh`` in float64; for
    ``D > 512`` a randomised SVD seeded by ``seed``, global RNGs untouched), cheaper than an SVD of the data.
    Axes without variance (beyond the data's rank) are dropped. Returns ``x`` centred and unchanged in width
    when ``D <= max_dims``.
    """
    centred = x - x.mean(dim=0, keepdim=True)
    if centred.shape[1] <= max_dims:
        return centred, 1.0
    total = centred.double().pow(2).sum()
    if centred.shape[1] > 512:
        singular, axes = _randomised_top_axes(centred, q=min(max_dims + 8, *centred.shape), seed=seed)
        variances = singular.double().pow(2)
    else:
        covariance = centred.T.double() @ centred.double()
        variances, axes = torch.linalg.eigh(covariance)
        variances, axes = variances.flip(0), axes.flip(1).to(centred.dtype)
    rank = int((variances > 1e-12 * variances[0]).sum())
    k = max(1, min(max_dims, rank))
    kept = float(variances[:k].sum() / total.clamp_min(1e-300))
    return centred @ axes[:, :k], min(kept, 1.0)


def _randomised_top_axes(a: torch.Tensor, q: int, seed: int, power_iterations: int = 3):
    """Top ``q`` singular values and right singular vectors ``[D, q]`` of ``a`` (Halko, Martinsson, Tropp 2011,
    randomised range finder with power iterations), drawn from a private generator: ``torch.svd_lowrank``
    would consume the global RNG, and with it the training run's random stream."""
    generator = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(a.shape[1], q, generator=generator, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    _, singular, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return singular, vh.T


def cluster_agreement(clusters: torch.Tensor, classes: torch.Tensor) -> tuple[float, float]:
    """NMI (arithmetic normalisation) and ARI between cluster ids and class labels, rows with id ``-1`` ignored.

    The same definitions as scikit-learn's ``normalized_mutual_info_score`` and ``adjusted_rand_score``
    (tested against them), from one contingency table in torch: ~0.1 ms where the scikit-learn pair costs
    ~3 ms of input validation at these sizes.
    """
    clusters = torch.as_tensor(clusters).reshape(-1).cpu().long()
    classes = torch.as_tensor(classes).reshape(-1).cpu().long()
    if clusters.shape != classes.shape:
        raise ValueError(f"{clusters.numel()} cluster ids but {classes.numel()} class labels")
    keep = clusters >= 0
    c, y = clusters[keep], classes[keep]
    n = len(c)
    if n == 0:
        return 1.0, 1.0
    _, c = torch.unique(c, return_inverse=True)
    _, y = torch.unique(y, return_inverse=True)
    k_c, k_y = int(c.max()) + 1, int(y.max()) + 1
    table = torch.bincount(c * k_y + y, minlength=k_c * k_y).view(k_c, k_y).double()
    rows, cols = table.sum(1), table.sum(0)
    return _nmi(table, rows, cols, n), _ari(table, rows, cols, n)


def _entropy(counts: torch.Tensor, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * p.log()).sum())


def _nmi(table, rows, cols, n) -> float:
    h_c, h_y = _entropy(rows, n), _entropy(cols, n)
    if h_c == 0.0 and h_y == 0.0 or len(rows) == len(cols) == 1:
        return 1.0  # both are one block: identical partitions (scikit-learn's convention)
    nz = table > 0
    joint = table[nz] / n
    expected = (rows[:, None] * cols[None, :])[nz] / (n * n)
    mutual = float((joint * (joint.log() - expected.log())).sum())
    return max(mutual, 0.0) / max((h_c + h_y) / 2, 1e-300)


def _ari(table, rows, cols, n) -> float:
    pairs = lambda v: (v * (v - 1) / 2).sum()  # noqa: E731
    index, row_pairs, col_pairs = pairs(table), pairs(rows), pairs(cols)
    expected = row_pairs * col_pairs / (n * (n - 1) / 2) if n > 1 else torch.tensor(0.0)
    maximum = (row_pairs + col_pairs) / 2
    if float(maximum - expected) == 0.0:
        return 1.0  # both partitions trivial in the same way (scikit-learn's convention)
    return float((index - expected) / (maximum - expected))


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(x).all(dim=1)
    n_bad = int((~finite).sum())
    if n_bad == len(x):
        raise ValueError(f"all {len(x)} activation rows contain NaN or inf; nothing to cluster")
    if n_bad:
        warnings.warn(
            f"{n_bad} of {len(x)} activation rows contain NaN or inf; they are skipped (cluster id -1)",
            RuntimeWarning,
            stacklevel=4,
        )
    return finite


INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data")
#: Rows per mixture component below which the truncation is shrunk.
MIN_ROWS_PER_COMPONENT = 4


def check_fit_options(
    *, truncation, concentration, max_dims, weight_cutoff, covariance_type, init_params, max_iter, n_init, scale
) -> None:
    """Raise a clear ``ValueError`` for a DP-GMM option out of range (shared by :func:`fit_dpgmm` and
    ``LayerClusters``, which checks at construction so a bad YAML fails before training)."""
    for name, value in [("truncation", truncation), ("max_dims", max_dims), ("max_iter", max_iter), ("n_init", n_init)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not concentration > 0:
        raise ValueError(f"concentration must be > 0, got {concentration!r}")
    if not 0 <= weight_cutoff < 1:
        raise ValueError(f"weight_cutoff must be in [0, 1), got {weight_cutoff!r}")
    if covariance_type not in ("diag", "spherical", "full", "tied"):
        raise ValueError(f"covariance_type must be 'diag', 'spherical', 'full' or 'tied', got {covariance_type!r}")
    if init_params not in INIT_METHODS:
        raise ValueError(f"init_params must be one of {list(INIT_METHODS)}, got {init_params!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)}, got {scale!r}")


BACKENDS = ("auto", "torch", "sklearn")


def fit_dpgmm(
    x: torch.Tensor,
    classes: torch.Tensor | None = None,
    *,
    truncation: int = 50,
    concentration: float = 1.0,
    covariance_type: str = "diag",
    scale: str = "global",
    max_dims: int = 8,
    weight_cutoff: float = DEFAULT_WEIGHT_CUTOFF,
    max_iter: int = 100,
    init_params: str = "kmeans",
    n_init: int = 1,
    max_fit_rows: int | None = None,
    seed: int = 0,
    backend: str = "auto",
) -> ClusterFit:
    """Fit a variational DP-GMM to the rows of ``x [N, D]`` (e.g. pooled activations of one layer).

    Args:
        x: activations, one row per sample; any float dtype and device. Rows with NaN/inf are skipped
            with one warning.
        classes: ``[N]`` integer class labels; when given, NMI and ARI of the clusters are returned.
        truncation: components of the truncated stick-breaking posterior (paper: 50). Capped at
            ``N // 4`` (recorded in ``n_components``; a warning when ``N < truncation``): with fewer than
            ~4 rows per component the variational fit keeps many tiny clusters even on one Gaussian blob.
        concentration: DP concentration alpha (paper: 1); larger values favour more clusters.
        covariance_type: per-component covariance (paper: ``"diag"``).
        scale: ``"global"`` or ``"unit"`` feature scaling before the PCA (see the module docstring).
        max_dims: PCA width after rescaling; cost of one EM step is O(N * truncation * max_dims).
        weight_cutoff: a component counts in ``n_clusters`` when its expected weight is at least this
            and at least one row is assigned to it (empty components keep ~1/(N+2) of the stick).
        max_iter: variational EM iterations per initialisation.
        init_params: initialisation of the responsibilities. ``"kmeans"`` (k-means with ``truncation``
            centres) recovered planted groups best in ``benchmarks/clusters.py``; ``"k-means++"`` (seeding
            only) is cheaper but merged groups more often in our trials; ``"random"`` and
            ``"random_from_data"`` are scikit-learn's.
        n_init: initialisations; the one with the highest evidence lower bound is kept.
        max_fit_rows: fit on a seeded random subset of this many rows, then assign every row
            (bounds the cost of per-position fits); ``None`` fits on all rows.
        seed: the only source of randomness of the fit.
        backend: ``"torch"`` (:mod:`~lightning_interp.methods.vbgmm`: the same updates as scikit-learn,
            float32, several fits batched), ``"sklearn"`` (``BayesianGaussianMixture``), or ``"auto"``:
            torch for diagonal covariances with k-means initialisation, scikit-learn otherwise.

    Returns:
        A :class:`ClusterFit`; tensors on CPU.
    """
    options = dict(truncation=truncation, concentration=concentration, covariance_type=covariance_type,
                   scale=scale, max_dims=max_dims, weight_cutoff=weight_cutoff, max_iter=max_iter,
                   init_params=init_params, n_init=n_init, seed=seed, backend=backend)
    result = fit_dpgmm_many([(x, classes, max_fit_rows)], **options)[0]
    if isinstance(result, Exception):
        raise result
    return result


def fit_dpgmm_many(
    requests: list[tuple[torch.Tensor, torch.Tensor | None, int | None]],
    *,
    truncation: int = 50,
    concentration: float = 1.0,
    covariance_type: str = "diag",
    scale: str = "global",
    max_dims: int = 8,
    weight_cutoff: float = DEFAULT_WEIGHT_CUTOFF,
    max_iter: int = 100,
    init_params: str = "kmeans",
    n_init: int = 1,
    seed: int = 0,
    backend: str = "auto",
    names: list[str] | None = None,
) -> list[ClusterFit | Exception]:
    """:func:`fit_dpgmm` for several ``(x, classes, max_fit_rows)`` requests with the same options.

    On the torch backend, fits of the same shape run as one batch (one EM loop for all of them). A request
    that cannot be fitted returns its ``ValueError`` in its place, so one bad layer does not stop the others.
    With ``names`` (one per request), each warning a request causes starts with its name.
    """
    check_fit_options(truncation=truncation, concentration=concentration, max_dims=max_dims,
                      weight_cutoff=weight_cutoff, covariance_type=covariance_type, init_params=init_params,
                      max_iter=max_iter, n_init=n_init, scale=scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    use_torch = backend == "torch" or (
        backend == "auto" and covariance_type == "diag" and init_params in ("kmeans", "k-means++")
    )
    if use_torch and (covariance_type != "diag" or init_params not in ("kmeans", "k-means++")):
        raise ValueError("backend='torch' fits diagonal covariances with k-means initialisation only; "
                         f"got covariance_type={covariance_type!r}, init_params={init_params!r}")
    results: list[ClusterFit | Exception | None] = [None] * len(requests)
    prepared: list[tuple[int, _Prepared]] = []
    with single_threaded():
        for i, (x, classes, max_fit_rows) in enumerate(requests):
            try:
                with _named_warnings(names[i] if names else None):
                    ready = _prepare(x, classes, truncation, scale, max_dims, max_fit_rows, seed)
            except ValueError as err:
                results[i] = err
                continue
            if ready.constant:
                results[i] = _finish(ready.labels, torch.ones(1), classes, n_components=1, n_dims=0, kept=1.0,
                                     converged=True, n_iter=0, weight_cutoff=weight_cutoff, constant=True)
            else:
                prepared.append((i, ready))
        if not use_torch:
            for i, ready in prepared:
                results[i] = _finish_fit(ready, _fit_sklearn(ready, concentration, covariance_type, max_iter, n_init,
                                                             init_params, seed), weight_cutoff)
        else:
            groups: dict[tuple, list[tuple[int, _Prepared]]] = {}
            for i, ready in prepared:  # one batch per (rows, components); narrower fits are zero-padded
                groups.setdefault((len(ready.fit_rows), ready.n_components), []).append((i, ready))
            for members in groups.values():
                width = max(r.fit_rows.shape[1] for _, r in members)
                fits = fit_dp_mixtures(
                    torch.stack([F.pad(r.fit_rows, (0, width - r.fit_rows.shape[1])) for _, r in members]),
                    [r.features for _, r in members],
                    n_components=members[0][1].n_components, concentration=concentration, max_iter=max_iter,
                    n_init=n_init, seed=seed, kmeans_iter=100 if init_params == "kmeans" else 0,
                    dims=[r.fit_rows.shape[1] for _, r in members],
                )
                for (i, ready), fit in zip(members, fits):
                    results[i] = _finish_fit(ready, fit, weight_cutoff)
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def _named_warnings(name: str | None):
    """Re-issue the warnings raised inside with ``name: `` in front (unchanged without a name)."""
    if name is None:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        warnings.warn(f"{name}: {w.message}", w.category, stacklevel=4)


@dataclass
class _Prepared:
    """A request after filtering, rescaling and PCA: what the mixture sees."""

    labels: torch.Tensor  # [N] filled with -1 for non-finite rows, 0 elsewhere
    finite: torch.Tensor
    classes: torch.Tensor | None
    features: torch.Tensor = None  # type: ignore[assignment]  # [M, d] float32, every finite row
    fit_rows: torch.Tensor = None  # type: ignore[assignment]  # [n, d], the rows fitted on
    n_components: int = 1
    kept: float = 1.0
    constant: bool = False


def _prepare(x, classes, truncation, scale, max_dims, max_fit_rows, seed) -> _Prepared:
    if x.dim() != 2:
        raise ValueError(f"expected activations [N, D], got shape {tuple(x.shape)}; use spatial_samples for maps")
    if classes is not None and len(classes) != len(x):
        raise ValueError(f"{len(x)} activation rows but {len(classes)} class labels")
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    finite = _finite_rows(x)
    rows = x[finite]
    labels = torch.full((len(x),), -1, dtype=torch.long)
    ready = _Prepared(labels=labels, finite=finite.cpu(), classes=classes)
    scaled = rescale(rows, scale)
    if len(rows) < 2 or scaled.shape[1] == 0:
        labels[ready.finite] = 0
        ready.constant = True
        return ready
    ready.n_components = min(truncation, max(1, len(rows) // MIN_ROWS_PER_COMPONENT))
    if len(rows) < truncation:
        warnings.warn(
            f"{len(rows)} samples are fewer than truncation={truncation} components; truncation shrunk to "
            f"{ready.n_components} ({MIN_ROWS_PER_COMPONENT} samples per component)",
            RuntimeWarning,
            stacklevel=4,
        )
    reduced, ready.kept = pca_reduce(scaled, max_dims, seed=seed)
    ready.features = reduced.detach().cpu().float()
    ready.fit_rows = _fit_rows(ready.features, max_fit_rows, ready.n_components, seed)
    return ready


def _fit_sklearn(ready: _Prepared, concentration, covariance_type, max_iter, n_init, init_params, seed) -> MixtureFit:
    mixture = BayesianGaussianMixture(
        n_components=ready.n_components,
        covariance_type=covariance_type,
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=concentration,
        max_iter=max_iter,
        n_init=n_init,
        init_params=init_params,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning is reported in ``converged`` instead
        mixture.fit(ready.fit_rows.double().numpy())
        assigned = mixture.predict(ready.features.double().numpy())
    return MixtureFit(weights=torch.from_numpy(mixture.weights_).float(), labels=torch.from_numpy(assigned),
                      n_iter=int(mixture.n_iter_), converged=bool(mixture.converged_),
                      lower_bound=float(mixture.lower_bound_))


def _finish_fit(ready: _Prepared, mixture: MixtureFit, weight_cutoff: float) -> ClusterFit:
    """Components relabelled by decreasing weight; the agreement with the classes."""
    weights = mixture.weights.float()
    order = torch.argsort(weights, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    ready.labels[ready.finite] = rank[mixture.labels.long()]
    return _finish(ready.labels, weights[order], ready.classes, n_components=ready.n_components,
                   n_dims=ready.features.shape[1], kept=ready.kept, converged=mixture.converged,
                   n_iter=mixture.n_iter, weight_cutoff=weight_cutoff, constant=False)


_THREADPOOLS: ThreadpoolController | None = None


@contextlib.contextmanager
def single_threaded():
    """One CPU thread for torch, BLAS and OpenMP inside, restored after (a context manager).

    At these sizes thread start-up and spinning cost more than the work on a busy machine, and the training
    run keeps its cores.
    """
    global _THREADPOOLS
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _THREADPOOLS.limit(limits=1):
            yield
    finally:
        torch.set_num_threads(torch_threads)


def _fit_rows(features: torch.Tensor, max_fit_rows: int | None, n_components: int, seed: int) -> torch.Tensor:
    if max_fit_rows is None or len(features) <= max_fit_rows:
        return features
    size = max(max_fit_rows, MIN_ROWS_PER_COMPONENT * n_components)
    if len(features) <= size:
        return features
    keep = np.random.default_rng(seed).choice(len(features), size=size, replace=False)
    return features[torch.from_numpy(np.sort(keep))]


def _finish(labels, weights, classes, *, n_components, n_dims, kept, converged, n_iter, weight_cutoff, constant):
    nmi = ari = None
    if classes is not None:
        nmi, ari = cluster_agreement(labels, torch.as_tensor(classes))
    occupied = torch.bincount(labels[labels >= 0], minlength=len(weights)) > 0
    n_clusters = max(1, int(((weights >= weight_cutoff) & occupied).sum()))
    return ClusterFit(n_clusters=n_clusters, weights=weights, labels=labels, nmi=nmi, ari=ari,
                      n_components=n_components, n_dims=n_dims, explained_variance=kept,
                      converged=converged, n_iter=n_iter, constant=constant)


def spatial_samples(maps: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` feature maps → ``[B*H*W, C]``: one row per image and spatial position (paper §2).

    Rows are ordered image-major, then row-major over positions, so ``labels.view(B, H, W)`` inverts it.
    Any number of spatial dimensions is accepted (``[B, C, L]`` for 1-D convolutions).
    """
    if maps.dim() < 3:
        raise ValueError(f"label maps need feature maps [B, C, *spatial], got shape {tuple(maps.shape)}")
    return maps.flatten(2).transpose(1, 2).reshape(-1, maps.shape[1])


def fit_label_maps(maps: torch.Tensor, **fit_kwargs) -> tuple[ClusterFit, torch.Tensor]:
    """One DP-GMM over every spatial position of a few images; its cluster ids reshaped to label maps.

    Fitting all images together keeps cluster ids comparable between them. ``fit_kwargs`` go to
    :func:`fit_dpgmm` (no classes: positions carry none).

    Returns:
        the fit, and ``[B, *spatial]`` long label maps (``-1`` where a position was non-finite).
    """
    fit = fit_dpgmm(spatial_samples(maps), **fit_kwargs)
    return fit, fit.labels.view(maps.shape[0], *maps.shape[2:])


def cluster_palette(n: int) -> torch.Tensor:
    """``[n, 3]`` distinct RGB colours in [0, 1]: hues spaced by the golden angle, alternating brightness."""
    k = torch.arange(n, dtype=torch.float32)
    hue = (k * (math.sqrt(5) - 1) / 2) % 1.0
    value = 1.0 - 0.3 * (k % 2)
    sector = hue * 6
    # HSV → RGB with saturation 0.75: each channel is a clamped triangle wave of the hue.
    channel = lambda shift: (torch.abs((sector + shift) % 6 - 3) - 1).clamp(0, 1)  # noqa: E731
    rgb = torch.stack([channel(0.0), channel(4.0), channel(2.0)], dim=1)
    return value[:, None] * (1 - 0.75 + 0.75 * rgb)


def colorize_labels(label_maps: torch.Tensor, n_colors: int | None = None) -> torch.Tensor:
    """Label maps ``[B, H, W]`` (ids ``>= -1``) → RGB images ``[B, 3, H, W]`` in [0, 1]; id ``-1`` is black.

    Cluster ``k`` always gets the same colour, so maps of one layer can be compared across images.
    """
    label_maps = label_maps.long()
    n = n_colors or int(label_maps.max().clamp_min(0)) + 1
    palette = torch.cat([torch.zeros(1, 3), cluster_palette(n)])
    rgb = palette[(label_maps.clamp(-1, n - 1) + 1).cpu()]
    return rgb.movedim(-1, 1)
