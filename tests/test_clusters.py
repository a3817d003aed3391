"""DP-GMM clusters of layer activations: the method (lightning_interp.methods.dpgmm) and LayerClusters."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_interp.methods.dpgmm import (
    cluster_agreement,
    cluster_palette,
    colorize_labels,
    fit_dpgmm,
    fit_label_maps,
    pca_reduce,
    spatial_samples,
    rescale,
)


def planted_groups(n_groups: int, n: int = 400, dims: int = 24, spread: float = 6.0, seed: int = 0):
    """``n`` points around ``n_groups`` random centres in ``dims`` dimensions, unequal group sizes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_groups, dims, generator=g) * spread
    sizes = torch.distributions.Dirichlet(torch.full((n_groups,), 5.0)).sample()
    classes = torch.multinomial(sizes, n, replacement=True, generator=g)
    return centres[classes] + torch.randn(n, dims, generator=g), classes


# ------------------------------------------------------------------------------------------------ method


@pytest.mark.parametrize("n_groups", [2, 5, 12])
def test_planted_gaussian_groups_are_recovered(n_groups):
    torch.manual_seed(n_groups)  # the group sizes
    x, classes = planted_groups(n_groups, seed=n_groups)
    fit = fit_dpgmm(x, classes)
    assert abs(fit.n_clusters - n_groups) <= 1
    assert fit.ari >= 0.9 and fit.nmi >= 0.9
    assert fit.n_dims == 8 and 0 < fit.explained_variance <= 1


def test_one_gaussian_blob_is_one_cluster():
    g = torch.Generator().manual_seed(1)
    for n in (64, 256):
        assert fit_dpgmm(torch.randn(n, 16, generator=g) * 3 + 5).n_clusters == 1


def test_clusters_are_numbered_by_decreasing_weight():
    x, classes = planted_groups(4, n=300, seed=3)
    fit = fit_dpgmm(x)
    assert torch.all(fit.weights[:-1] >= fit.weights[1:])
    counts = torch.bincount(fit.labels, minlength=len(fit.weights))
    assert counts.argmax() == 0
    assert fit.weights.sum() == pytest.approx(1.0, abs=1e-4)


def test_fit_is_seeded_and_leaves_global_rngs_alone():
    x, _ = planted_groups(6, n=300, seed=4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = fit_dpgmm(x, seed=7), fit_dpgmm(x, seed=7)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(torch.get_rng_state(), before)


def test_fewer_samples_than_components_shrinks_truncation_with_a_warning():
    x, classes = planted_groups(3, n=30, dims=4, seed=5)
    with pytest.warns(RuntimeWarning, match="fewer than truncation=50 components; truncation shrunk to 7"):
        fit = fit_dpgmm(x, classes)
    assert fit.n_components == 7
    assert len(fit.weights) == 7 and fit.labels.shape == (30,)
    assert fit.n_clusters == 3 and fit.ari >= 0.9
    with pytest.warns(RuntimeWarning, match="truncation shrunk to 1"):
        assert fit_dpgmm(x[:5]).n_clusters == 1


def test_constant_activations_give_one_cluster():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_dpgmm(torch.full((100, 8), 0.7), torch.arange(100) % 3)
    assert fit.constant and fit.n_clusters == 1
    assert torch.all(fit.labels == 0)
    assert fit.nmi == pytest.approx(0.0) and fit.ari == pytest.approx(0.0)


def test_constant_columns_do_not_disturb_the_others():
    x, classes = planted_groups(3, n=200, dims=6, seed=6)
    x = torch.cat([x, torch.zeros(200, 5)], dim=1)
    assert rescale(x).shape == (200, 6) and rescale(x, "unit").std(dim=0).allclose(torch.ones(6), atol=0.01)
    assert fit_dpgmm(x, classes).ari >= 0.9
    assert fit_dpgmm(x, classes, scale="unit").ari >= 0.9


def test_nan_rows_are_skipped_with_one_warning():
    x, classes = planted_groups(3, n=200, seed=7)
    x[[5, 17], 2] = float("nan")
    x[40, 0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_dpgmm(x, classes)
    assert len(caught) == 1 and "3 of 200" in str(caught[0].message)
    assert fit.labels[[5, 17, 40]].tolist() == [-1, -1, -1]
    assert (fit.labels >= 0).sum() == 197
    assert fit.ari >= 0.9


def test_all_nan_activations_raise_clearly():
    with pytest.raises(ValueError, match="all 10 activation rows contain NaN"):
        fit_dpgmm(torch.full((10, 4), float("nan")))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"truncation": 0}, "truncation"),
        ({"concentration": 0.0}, "concentration"),
        ({"max_dims": 0}, "max_dims"),
        ({"weight_cutoff": 1.5}, "weight_cutoff"),
        ({"covariance_type": "banana"}, "covariance_type"),
        ({"init_params": "nope"}, "init_params"),
        ({"max_iter": 0}, "max_iter"),
        ({"scale": "minmax"}, "scale"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_dpgmm(torch.randn(60, 4), **kwargs)


def test_wrong_shapes_are_named():
    with pytest.raises(ValueError, match=r"expected activations \[N, D\]"):
        fit_dpgmm(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="60 activation rows but 59 class labels"):
        fit_dpgmm(torch.randn(60, 4), torch.zeros(59, dtype=torch.long))
    with pytest.raises(ValueError, match="feature maps"):
        spatial_samples(torch.randn(4, 3))


def test_pca_keeps_the_leading_uncorrelated_directions():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 40, generator=g) @ torch.randn(40, 40, generator=g)
    scores, kept = pca_reduce(x, 5)
    assert scores.shape == (300, 5)
    cov = scores.T @ scores / 299
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    assert off_diagonal.abs().max() < 1e-3 * cov.diagonal().max()
    assert torch.all(cov.diagonal()[:-1] >= cov.diagonal()[1:])
    eig = torch.linalg.eigvalsh(torch.cov(x.T).double()).flip(0)
    assert kept == pytest.approx(float(eig[:5].sum() / eig.sum()), rel=1e-3)
    narrow, kept_all = pca_reduce(x[:, :3], 5)
    assert narrow.shape == (300, 3) and kept_all == 1.0


def test_wide_layers_are_reduced_before_fitting():
    x, classes = planted_groups(4, n=300, dims=200, seed=9)
    fit = fit_dpgmm(x, classes, max_dims=8)
    assert fit.n_dims == 8 and fit.ari >= 0.9


def test_max_fit_rows_fits_a_subset_and_assigns_every_row():
    x, classes = planted_groups(4, n=1000, seed=10)
    fit = fit_dpgmm(x, classes, max_fit_rows=200)
    assert fit.labels.shape == (1000,) and bool((fit.labels >= 0).all())
    assert fit.ari >= 0.9


def test_spatial_samples_order_inverts_by_view():
    maps = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    rows = spatial_samples(maps)
    assert rows.shape == (2 * 4 * 5, 3)
    assert torch.equal(rows.view(2, 4, 5, 3).permute(0, 3, 1, 2), maps)


def test_label_maps_separate_planted_regions_consistently_across_images():
    """Left half of every image has one channel vector, right half another: two regions, same ids."""
    g = torch.Generator().manual_seed(11)
    left, right = torch.randn(8, generator=g) * 4, torch.randn(8, generator=g) * 4
    maps = torch.randn(6, 8, 10, 10, generator=g) * 0.3
    maps[:, :, :, :5] += left[:, None, None]
    maps[:, :, :, 5:] += right[:, None, None]
    fit, label_maps = fit_label_maps(maps)
    assert label_maps.shape == (6, 10, 10)
    assert fit.n_clusters == 2
    left_ids, right_ids = label_maps[:, :, :5].unique(), label_maps[:, :, 5:].unique()
    assert len(left_ids) == 1 and len(right_ids) == 1 and left_ids != right_ids


def test_cluster_agreement_matches_permuted_labels():
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    nmi, ari = cluster_agreement(torch.tensor([2, 2, 0, 0, 1, 1]), classes)
    assert nmi == pytest.approx(1.0) and ari == pytest.approx(1.0)
    nmi, ari = cluster_agreement(torch.tensor([0, 1, 0, 1, 0, 1]), classes)
    assert nmi < 0.5 and ari < 0.1
    nmi, ari = cluster_agreement(torch.tensor([-1, 2, 0, 0, 1, 1]), classes)  # -1 ignored
    assert ari == pytest.approx(1.0)


def test_colorize_labels_gives_distinct_colours_and_black_for_skipped():
    palette = cluster_palette(12)
    assert palette.shape == (12, 3) and palette.min() >= 0 and palette.max() <= 1
    assert torch.cdist(palette, palette).add(torch.eye(12)).min() > 0.05
    label_maps = torch.tensor([[[0, 1], [2, -1]]])
    rgb = colorize_labels(label_maps)
    assert rgb.shape == (1, 3, 2, 2)
    assert torch.equal(rgb[0, :, 1, 1], torch.zeros(3))
    assert torch.equal(rgb[0, :, 0, 0], palette[0]) and torch.equal(rgb[0, :, 1, 0], cluster_palette(3)[2])
