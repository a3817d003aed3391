"""Variational Dirichlet-process Gaussian mixtures (diagonal covariance), many fits at once in torch.

The same model and updates as scikit-learn's ``BayesianGaussianMixture(covariance_type="diag",
weight_concentration_prior_type="dirichlet_process")`` (Blei & Jordan 2006, truncated stick-breaking
variational posterior; the priors scikit-learn derives from the data):

* weights: ``q(v_k) = Beta(1 + N_k, alpha + sum_{j>k} N_j)``, ``E[log pi_k] = E[log v_k] + sum_{j<k} E[log(1 - v_j)]``;
* means: ``q(mu_k) = N(m_k, (beta_k Lambda_k)^-1)``, ``beta_k = beta_0 + N_k``,
  ``m_k = (beta_0 m_0 + N_k xbar_k) / beta_k``;
* diagonal precisions: Wishart-like with ``nu_k = nu_0 + N_k`` degrees of freedom and scale
  ``(W_0 + N_k (S_k + beta_0 / beta_k (xbar_k - m_0)^2)) / nu_k``;
* responsibilities: ``log r_nk = E[log pi_k] + E[log N(x_n | mu_k, Lambda_k)]`` normalised over ``k``;
* iterations stop when the evidence lower bound moves by less than ``tol`` (scikit-learn's rule), each fit
  on its own: a converged fit keeps its parameters and leaves the batch, the others go on.

Priors as in scikit-learn: ``m_0`` the data mean, ``beta_0 = 1``, ``nu_0 = D``, ``W_0`` the per-feature
variance (``ddof=1``), ``reg_covar = 1e-6`` added to every variance.

Why our own: fitting a layer's DP-GMM in scikit-learn costs 30-60 ms, mostly Python overhead of small NumPy
calls per EM step; :class:`~lightning_interp.LayerClusters` fits several layers (and their label maps) per run.
Here all fits of one shape advance in the same batched tensor operations (``[fits, N, K]``), so a run costs
about one fit's loop. Agreement with scikit-learn (ARI) and the speed ratio are measured in
``benchmarks/clusters.py``. Initialisation is k-means (k-means++ seeding, then Lloyd iterations), batched too;
it is not scikit-learn's k-means, so fits agree in distribution, not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MixtureFit", "fit_dp_mixtures", "batched_kmeans"]

REG_COVAR = 1e-6


@dataclass
class MixtureFit:
    """One fitted mixture: ``weights [K]`` (expected, summing to 1, component order as fitted),
    ``labels [M]`` (most probable component of every row passed to ``assign``), iterations, convergence, ELBO."""

    weights: Tensor
    labels: Tensor
    n_iter: int
    converged: bool
    lower_bound: float


def batched_kmeans(x: Tensor, k: int, seeds: list[int], max_iter: int = 100, tol: float = 1e-4) -> Tensor:
    """Cluster ids ``[B, N]`` of ``B`` independent k-means problems ``x [B, N, D]``.

    k-means++ seeding (each new centre drawn with probability proportional to the squared distance to the
    nearest chosen one), then Lloyd iterations until the centres move less than ``tol`` times the data's
    mean variance (scikit-learn's relative tolerance) or ``max_iter``. An empty cluster keeps its centre.
    Problem ``b`` draws from its own generator seeded with ``seeds[b]``, so its draws do not depend on the
    other problems of the batch.
    """
    b, n, d = x.shape
    trials = 2 + int(math.log(k))  # scikit-learn's greedy k-means++: best of a few candidates per centre
    rows = torch.arange(b, device=x.device)
    draws = torch.stack([torch.rand(k, trials, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in seeds]).to(x.device)  # [B, K, trials] uniforms
    first = (draws[:, 0, 0] * n).long().clamp_max(n - 1)
    centres = [x[rows, first]]
    nearest = (x - centres[0][:, None]).pow(2).sum(-1)  # [B, N]
    for j in range(1, k):
        cumulative = nearest.clamp_min(0).double().cumsum(1)
        targets = draws[:, j] * cumulative[:, -1:]  # [B, trials]
        candidates = torch.searchsorted(cumulative, targets, right=True).clamp_max(n - 1)
        points = x[rows[:, None], candidates]  # [B, trials, D]
        distance = (x[:, None] - points[:, :, None]).pow(2).sum(-1)  # [B, trials, N]
        potential = torch.minimum(nearest[:, None], distance).sum(-1)
        best = potential.argmin(1)
        centres.append(points[rows, best])
        nearest = torch.minimum(nearest, distance[rows, best])
    centre = torch.stack(centres, dim=1)  # [B, K, D]
    threshold = tol * x.var(dim=1).mean(dim=1)  # [B]
    x_sq = x.pow(2).sum(-1, keepdim=True)
    for _ in range(max_iter):
        distance = x_sq - 2 * x @ centre.transpose(1, 2) + centre.pow(2).sum(-1)[:, None]
        labels = distance.argmin(-1)
        one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [B, N, K]
        counts = one_hot.sum(1)  # [B, K]
        sums = one_hot.transpose(1, 2) @ x
        new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centre)
        shift = (new - centre).pow(2).sum((1, 2))
        centre = new
        if bool((shift <= threshold).all()):
            break
    distance = x_sq - 2 * x @ centre.transpose(1, 2) + centre.pow(2).sum(-1)[:, None]
    return distance.argmin(-1)


def _design(x: Tensor) -> Tensor:
    """``[x, x^2, 1]``: with it the E-step is one matrix product and the M-step's statistics another."""
    return torch.cat([x, x * x, torch.ones_like(x[..., :1])], dim=-1)


class _Posterior:
    """Variational parameters of ``B`` diagonal DP-GMMs with ``K`` components over ``D`` features.

    Fit ``b`` uses its first ``dims[b]`` features; the others are zero padding (so fits of different widths
    share one batch) and are left out of every sum over features.
    """

    def __init__(self, x: Tensor, concentration: float, dims: Tensor) -> None:
        self.width = x.shape[-1]
        self.dims = dims.to(x.dtype)  # [B]
        offsets = torch.arange(self.width, device=x.device)
        self.real = offsets < dims[:, None]  # [B, D]
        self.offsets = offsets.to(x.dtype)
        self.alpha = concentration
        self.mean_prior = x.mean(dim=1)  # [B, D]
        self.beta_prior = 1.0
        self.dof_prior = self.dims[:, None]  # [B, 1]: scikit-learn's default, the number of features
        self.covariance_prior = torch.where(self.real, x.var(dim=1, unbiased=True), 1.0)  # [B, D]

    def _sum_real(self, values: Tensor) -> Tensor:
        """Sum over the feature axis of ``[B, K, D]`` values, padding left out."""
        return torch.where(self.real[:, None], values, 0.0).sum(-1)

    def _log_wishart_terms(self, fn) -> Tensor:
        """``sum_{i < D_b} fn(0.5 (nu_k - i))``, ``[B, K]``."""
        return self._sum_real(fn(0.5 * (self.dof[..., None] - self.offsets)))

    def update(self, stats: Tensor) -> None:
        """The M-step from ``stats = resp^T [x, x^2, 1]`` (``[B, K, 2D + 1]``): every variational factor."""
        d = self.width
        nk = stats[..., -1] + 10 * torch.finfo(stats.dtype).eps  # [B, K]
        xk = stats[..., :d] / nk[..., None]  # [B, K, D]
        sk = stats[..., d : 2 * d] / nk[..., None] - xk.pow(2) + REG_COVAR
        tail = nk.flip(1).cumsum(1).flip(1) - nk  # sum over j > k
        self.concentration_a, self.concentration_b = 1.0 + nk, self.alpha + tail
        self.mean_precision = self.beta_prior + nk
        self.means = (self.beta_prior * self.mean_prior[:, None] + nk[..., None] * xk) / self.mean_precision[..., None]
        self.dof = self.dof_prior + nk
        diff = xk - self.mean_prior[:, None]
        covariances = self.covariance_prior[:, None] + nk[..., None] * (
            sk + (self.beta_prior / self.mean_precision)[..., None] * diff.pow(2)
        )
        self.covariances = covariances / self.dof[..., None]
        self.precision_chol = self.covariances.rsqrt()

    def state(self) -> list[Tensor]:
        return [self.concentration_a, self.concentration_b, self.mean_precision, self.means, self.dof,
                self.covariances, self.precision_chol]

    def set_state(self, values: list[Tensor]) -> None:
        (self.concentration_a, self.concentration_b, self.mean_precision, self.means, self.dof,
         self.covariances, self.precision_chol) = values

    def coefficients(self) -> Tensor:
        """``[B, 2D + 1, K]`` such that ``_design(x) @ coefficients = E[log pi_k] + E[log N(x | mu_k, Lambda_k)]``.

        Expanding ``-1/2 sum_d lambda_kd (x_d - m_kd)^2``: linear terms ``lambda m``, quadratic ``-lambda / 2``,
        and everything that does not depend on ``x`` in the constant column.
        """
        d = self.dims[:, None]  # [B, 1]
        precisions = self.precision_chol.pow(2)  # [B, K, D]
        log_lambda = d * math.log(2.0) + self._log_wishart_terms(torch.digamma)  # [B, K]
        digamma_sum = torch.digamma(self.concentration_a + self.concentration_b)
        log_v = torch.digamma(self.concentration_a) - digamma_sum
        log_not_v = torch.digamma(self.concentration_b) - digamma_sum
        log_weights = log_v + torch.nn.functional.pad(log_not_v.cumsum(1)[:, :-1], (1, 0))
        constant = (
            -0.5 * (d * math.log(2 * math.pi) + self._sum_real(self.means.pow(2) * precisions))
            + self._sum_real(self.precision_chol.log()) - 0.5 * d * self.dof.log()
            + 0.5 * (log_lambda - d / self.mean_precision)
            + log_weights
        )
        precisions = torch.where(self.real[:, None], precisions, 0.0)
        return torch.cat([self.means * precisions, -0.5 * precisions, constant[..., None]], dim=-1).transpose(1, 2)

    def lower_bound(self, entropy: Tensor) -> Tensor:
        """The evidence lower bound (up to a constant) per fit, ``[B]``, as scikit-learn computes it;
        ``entropy`` is ``-sum r log r`` of the responsibilities that produced the current parameters."""
        d = self.dims[:, None]  # [B, 1]
        log_det_chol = self._sum_real(self.precision_chol.log()) - 0.5 * d * self.dof.log()
        log_wishart_norm = -(
            self.dof * log_det_chol + self.dof * d * 0.5 * math.log(2.0) + self._log_wishart_terms(torch.lgamma)
        )
        a, b = self.concentration_a, self.concentration_b
        log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
        return entropy - log_wishart_norm.sum(1) + log_beta.sum(1) - 0.5 * self.dims * self.mean_precision.log().sum(1)

    def write(self, index: Tensor, fits: "_Posterior") -> None:
        """Store the variational parameters of ``fits`` (a :meth:`select` of this batch) as fits ``index``."""
        if fits is self:
            return
        for mine, theirs in zip(self.state(), fits.state()):
            mine[index] = theirs

    def select(self, index: Tensor) -> "_Posterior":
        """The fits ``index`` of this batch, as a posterior of their own."""
        chosen = _Posterior.__new__(_Posterior)
        for name, value in self.__dict__.items():
            per_fit = isinstance(value, Tensor) and value.dim() > 0 and name != "offsets"
            chosen.__dict__[name] = value[index] if per_fit else value
        return chosen

    def weights(self) -> Tensor:
        total = self.concentration_a + self.concentration_b
        remaining = torch.nn.functional.pad((self.concentration_b / total).cumprod(1)[:, :-1], (1, 0), value=1.0)
        weights = self.concentration_a / total * remaining
        return weights / weights.sum(1, keepdim=True)


def fit_dp_mixtures(
    fit_rows: Tensor,
    assign_rows: Tensor | list[Tensor] | None = None,
    *,
    n_components: int,
    concentration: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-3,
    n_init: int = 1,
    seed: int = 0,
    kmeans_iter: int = 100,
    init_labels: Tensor | None = None,
    dims: Sequence[int] | None = None,
) -> list[MixtureFit]:
    """Fit ``B`` independent diagonal DP-GMMs on ``fit_rows [B, N, D]`` in one batched loop.

    Args:
        fit_rows: the data of each fit (float64 recommended; any device).
        assign_rows: rows to label with the fitted mixtures, ``[B, M, D]`` or a list of ``B`` tensors
            ``[M_b, D]`` (default: ``fit_rows``).
        n_components: truncation ``K`` of the stick-breaking posterior.
        concentration: DP concentration ``alpha``.
        max_iter: variational EM iterations at most.
        tol: stop a fit when its lower bound changes by less than this.
        n_init: k-means initialisations per fit; the one with the highest lower bound is kept.
        seed: seeds the k-means++ draws (a private generator; global RNGs untouched).
        kmeans_iter: Lloyd iterations after the k-means++ seeding (0: the seeding alone).
        init_labels: ``[B, N]`` initial component of every row instead of k-means (then ``n_init`` must be 1).
        dims: features fit ``b`` really has (its first ``dims[b]``; the rest of ``D`` is zero padding, left
            out of the model), so fits of different widths run in one batch; default: all ``D``.

    Returns:
        one :class:`MixtureFit` per fit, tensors on CPU.
    """
    if fit_rows.dim() != 3:
        raise ValueError(f"fit_rows must be [fits, rows, features], got shape {tuple(fit_rows.shape)}")
    b, n, width = fit_rows.shape
    dims = torch.full((b,), width) if dims is None else torch.as_tensor(list(dims))
    if dims.shape != (b,) or not bool(((dims >= 1) & (dims <= width)).all()):
        raise ValueError(f"dims must give 1..{width} features for each of the {b} fits, got {dims.tolist()}")
    if not 1 <= n_components <= n:
        raise ValueError(f"n_components must be in [1, rows={n}], got {n_components}")
    centre = fit_rows.mean(dim=1, keepdim=True)  # the model is translation-equivariant (m_0 = data mean);
    fit_rows = fit_rows - centre  # centring keeps E[x^2] - xbar^2 from cancelling in float32
    x = fit_rows.repeat_interleave(n_init, dim=0) if n_init > 1 else fit_rows
    if init_labels is None:
        seeds = [seed + restart for _ in range(b) for restart in range(n_init)]  # matches repeat_interleave
        init_labels = batched_kmeans(x, n_components, seeds, max_iter=kmeans_iter)
    elif n_init != 1 or init_labels.shape != (b, n):
        raise ValueError(f"init_labels must be [{b}, {n}] with n_init=1, got {tuple(init_labels.shape)}")
    resp = torch.nn.functional.one_hot(init_labels.to(x.device, torch.long), n_components).to(x.dtype)

    design = _design(x)
    posterior = _Posterior(x, concentration, dims.repeat_interleave(n_init).to(x.device))
    posterior.update(resp.transpose(1, 2) @ design)
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(len(x), dtype=torch.long, device=x.device)
    bound = torch.full((len(x),), -math.inf, dtype=x.dtype, device=x.device)
    active, fits, rows = torch.arange(len(x), device=x.device), posterior, design  # the fits still iterating
    for _ in range(max_iter):
        log_resp = torch.log_softmax(rows @ fits.coefficients(), dim=-1)  # the E-step
        resp = log_resp.exp()
        entropy = -(resp * log_resp).sum((1, 2))
        fits.update(resp.transpose(1, 2) @ rows)
        new_bound = fits.lower_bound(entropy)
        n_iter[active] += 1
        settled = (new_bound - bound[active]).abs() < tol
        bound[active] = new_bound
        if bool(settled.any()):  # converged fits keep these parameters and leave the batch
            done[active[settled]] = True
            posterior.write(active, fits)
            going = ~settled
            active, fits, rows = active[going], fits.select(going), rows[going]
            if len(active) == 0:
                break
    posterior.write(active, fits)

    best = bound.view(b, n_init).argmax(1) + torch.arange(b, device=x.device) * n_init
    weights = posterior.weights()[best]
    coefficients = posterior.select(best).coefficients()
    targets = fit_rows if assign_rows is None else [t.to(x.device, x.dtype) for t in assign_rows]
    targets = [F.pad(t, (0, width - t.shape[-1])) - centre[i] if assign_rows is not None else t
               for i, t in enumerate(targets)]  # to the batch width, centred like the fit
    labels = [(_design(t) @ coefficients[i]).argmax(-1) for i, t in enumerate(targets)]
    return [
        MixtureFit(weights=weights[i].cpu(), labels=labels[i].cpu(), n_iter=int(n_iter[best[i]]),
                   converged=bool(done[best[i]]), lower_bound=float(bound[best[i]]))
        for i in range(b)
    ]
