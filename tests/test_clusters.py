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
    fit_dpgmm_many,
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
    # Measured: at 256+ rows 39 of 40 blobs give one cluster; at 64-128 rows the variational fit often stays
    # in a many-component optimum (scikit-learn too: 19 of 40), documented in docs/clusters.md.
    for n in (256, 512):
        counts = [fit_dpgmm(torch.randn(n, 16, generator=torch.Generator().manual_seed(s)) * 3 + 5, seed=s).n_clusters
                  for s in range(10)]
        assert sum(c == 1 for c in counts) >= 9, counts


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


def test_cluster_agreement_equals_scikit_learn_on_random_and_degenerate_partitions():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (300,), generator=g)
    cases = [(torch.randint(0, k, (n,), generator=g), torch.randint(0, m, (n,), generator=g))
             for n in (1, 2, 40, 300) for k in (1, 3, 25) for m in (1, 4)]
    cases += [(y * 3 + 1, y), (torch.zeros(300, dtype=torch.long), y), (torch.arange(300), y)]
    for clusters, classes in cases:
        nmi, ari = cluster_agreement(clusters, classes)
        assert nmi == pytest.approx(normalized_mutual_info_score(classes.numpy(), clusters.numpy()), abs=1e-12)
        assert ari == pytest.approx(adjusted_rand_score(classes.numpy(), clusters.numpy()), abs=1e-12)


def test_torch_mixture_reproduces_scikit_learn_from_the_same_start():
    """Same initial responsibilities → the same iterations, lower bound and weights as BayesianGaussianMixture."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.mixture import BayesianGaussianMixture

    from lightning_interp.methods.vbgmm import fit_dp_mixtures

    class GivenStart(BayesianGaussianMixture):
        _parameter_constraints = {**BayesianGaussianMixture._parameter_constraints, "start": [None, "array-like"]}

        def __init__(self, start=None, **kwargs):
            super().__init__(**kwargs)
            self.start = start

        def _initialize_parameters(self, X, random_state, **_):
            self._initialize(X, np.eye(self.n_components)[self.start])

    x = torch.stack([planted_groups(k, n=300, dims=6, seed=k)[0] for k in (3, 7)]).double()
    start = torch.stack([torch.from_numpy(KMeans(30, n_init=1, random_state=0).fit(row.numpy()).labels_) for row in x])
    ours = fit_dp_mixtures(x, n_components=30, init_labels=start)
    for row, begin, fit in zip(x, start, ours):
        sk = GivenStart(start=begin.numpy(), n_components=30, weight_concentration_prior_type="dirichlet_process",
                        weight_concentration_prior=1.0, covariance_type="diag", max_iter=100).fit(row.numpy())
        assert fit.n_iter == sk.n_iter_ and fit.converged == sk.converged_
        assert fit.lower_bound == pytest.approx(sk.lower_bound_, rel=1e-10)
        assert torch.allclose(fit.weights, torch.from_numpy(sk.weights_), atol=1e-10)
        assert torch.equal(fit.labels, torch.from_numpy(sk.predict(row.numpy())))


def test_batched_fits_equal_single_fits_and_agree_with_scikit_learn():
    requests = [(planted_groups(k, seed=k)[0], planted_groups(k, seed=k)[1], None) for k in (2, 5, 9)]
    batched = fit_dpgmm_many(requests)
    for (x, classes, _), fit in zip(requests, batched):
        alone = fit_dpgmm(x, classes)
        assert torch.equal(fit.labels, alone.labels) and fit.n_clusters == alone.n_clusters
        reference = fit_dpgmm(x, classes, backend="sklearn")
        assert cluster_agreement(fit.labels, reference.labels)[1] >= 0.95
        assert abs(fit.n_clusters - reference.n_clusters) <= 1
    narrow = (planted_groups(4, seed=4)[0][:, :5], None, None)  # 5 features: zero-padded in a batch of 8
    assert torch.equal(fit_dpgmm_many([requests[0], narrow])[1].labels, fit_dpgmm(narrow[0]).labels)
    with pytest.raises(ValueError, match="backend='torch' fits diagonal covariances"):
        fit_dpgmm(requests[0][0], backend="torch", covariance_type="full")


def test_colorize_labels_gives_distinct_colours_and_black_for_skipped():
    palette = cluster_palette(12)
    assert palette.shape == (12, 3) and palette.min() >= 0 and palette.max() <= 1
    assert torch.cdist(palette, palette).add(torch.eye(12)).min() > 0.05
    label_maps = torch.tensor([[[0, 1], [2, -1]]])
    rgb = colorize_labels(label_maps)
    assert rgb.shape == (1, 3, 2, 2)
    assert torch.equal(rgb[0, :, 1, 1], torch.zeros(3))
    assert torch.equal(rgb[0, :, 0, 0], palette[0]) and torch.equal(rgb[0, :, 1, 0], cluster_palette(3)[2])


# ---------------------------------------------------------------------------------------------- callback

import json  # noqa: E402
import time  # noqa: E402

from conftest import make_trainer, read_scalars, read_tags  # noqa: E402

from lightning_interp import InterpretationWarning, LayerClusters  # noqa: E402
from lightning_interp.callbacks.clusters import label_map_panel  # noqa: E402
from lightning_interp.demo import DigitsCNN, DigitsDataModule  # noqa: E402

SMALL = dict(every_n_epochs=1, probe_size=128, label_map_images=3, label_map_fit_images=8, strict=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short demo run with LayerClusters at small settings, shared by the tests that read its output."""
    tmp_path = tmp_path_factory.mktemp("clusters")
    torch.manual_seed(0)
    cb = LayerClusters(**SMALL)
    trainer = make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=4)
    dm = DigitsDataModule(noise_fraction=0.1, n_leaked=5, batch_size=128, seed=0)
    trainer.fit(DigitsCNN(), dm)
    return cb, trainer, tmp_path / "tb"


def test_callback_results_history_and_logs(trained):
    cb, trainer, logdir = trained
    layers = ["conv1", "conv2", "conv3", "fc1"]
    assert list(cb.results_) == layers
    for name, r in cb.results_.items():
        assert r["n_clusters"] >= 1 and r["labels"].shape == (128,)
        assert 0 <= r["nmi"] <= 1 and -1 <= r["ari"] <= 1
        assert r["weights"].sum() == pytest.approx(1.0, abs=1e-3)
        assert (r["position_clusters"] is None) == (name == "fc1")
    assert [(h["epoch"], h["layer"]) for h in cb.history_] == [(e, n) for e in (0, 1) for n in layers]
    scalars = read_scalars(logdir)
    assert len(scalars["clusters/fc1/n_clusters"]) == 2
    assert scalars["clusters/conv2/nmi"][-1][1] == pytest.approx(cb.results_["conv2"]["nmi"], abs=1e-6)
    tags = read_tags(logdir)
    assert {f"clusters/{n}/label_maps" for n in layers[:3]} <= tags["images"]
    assert "clusters/fc1/label_maps" not in tags["images"]
    assert {f"clusters/{n}/weights" for n in layers} <= tags["histograms"]
    config = (logdir / "version_0" / "projector_config.pbtxt").read_text()
    assert config.count("clusters/fc1") == 2 and "clusters/conv1" not in config and "sprite" in config
    metadata = sorted((logdir / "version_0").glob("*/clusters%2ffc1/metadata.tsv"))[-1].read_text().splitlines()
    header = metadata[0].split("\t")
    assert header == ["cluster", *[f"cluster_{n}" for n in layers], "label", "prediction", "index"]
    assert len(metadata) == 129
    cells = [row.split("\t") for row in metadata[1:]]
    assert [int(c[0]) for c in cells] == cb.results_["fc1"]["labels"].tolist()
    assert [int(c[2]) for c in cells] == cb.results_["conv2"]["labels"].tolist()


def test_summary_table_reads_generic_and_specific_by_depth(trained):
    cb, _, _ = trained
    table = cb.summary_table(cb.results_, list(cb.results_))
    lines = table.splitlines()
    assert lines[0].startswith("| depth | layer | clusters (samples)")
    assert [ln.split(" | ")[1] for ln in lines[2:6]] == ["conv1", "conv2", "conv3", "fc1"]
    readings = {"generic", "mixed", "class-specific"}
    assert all(ln.rstrip(" |").rsplit("| ", 1)[-1] in readings for ln in lines[2:6])
    fc1 = next(ln for ln in lines if "| fc1 |" in ln)
    assert f"{cb.results_['fc1']['n_clusters']}" in fc1 and "n/a" in fc1  # no position clusters for fc1
    fit = cb.results_["fc1"]
    assert 1 <= fit["n_iter"] <= cb.fit_options["max_iter"] and isinstance(fit["converged"], bool)
    assert f"| {'yes' if fit['converged'] else 'no'} ({fit['n_iter']} it.) |" in fc1
    assert cb.history_[-1]["converged"] == cb.results_[cb.history_[-1]["layer"]]["converged"]


def test_sharp_change_alert_and_state_round_trip(trained):
    cb, trainer, _ = trained
    before = len(cb.alerts_)
    cb._check_alerts(trainer, {"fc1": {"n_clusters": 20, "nmi": 0.31}}, {"fc1": (8, 0.74)})
    cb._check_alerts(trainer, {"fc1": {"n_clusters": 9, "nmi": 0.7}}, {"fc1": (8, 0.74)})
    assert len(cb.alerts_) == before + 1 and "from 8 to 20" in cb.alerts_[-1].message
    assert "(NMI with the classes 0.74 -> 0.31)" in cb.alerts_[-1].message
    cb._check_alerts(trainer, {"fc1": {"n_clusters": 2, "nmi": None}}, {"fc1": (8, None)})  # no labels: no NMI
    assert len(cb.alerts_) == before + 2 and "NMI" not in cb.alerts_[-1].message
    cb._check_alerts(trainer, {"conv1": {"n_clusters": 1}}, {}, varying={"conv1"})  # its label maps differ
    assert len(cb.alerts_) == before + 2
    cb._check_alerts(trainer, {"conv1": {"n_clusters": 1}}, {})
    assert len(cb.alerts_) == before + 3 and "collapsed to one cluster" in cb.alerts_[-1].message
    state = cb.state_dict()
    fresh = LayerClusters()
    fresh.load_state_dict(state)
    assert fresh.history_ == cb.history_
    assert fresh.results_.keys() == cb.results_.keys()
    for name, result in cb.results_.items():  # every documented field survives, so summary_table works
        assert fresh.results_[name].keys() == result.keys()
        assert torch.equal(fresh.results_[name]["labels"], result["labels"])
        assert fresh.results_[name]["nmi"] == result["nmi"]
    assert fresh.summary_table(fresh.results_, list(cb.results_)) == cb.summary_table(cb.results_, list(cb.results_))


def test_callback_does_not_disturb_training(tmp_path):
    def run(callbacks):
        torch.manual_seed(0)
        model = DigitsCNN()
        dm = DigitsDataModule(noise_fraction=0.0, n_leaked=0, batch_size=256, seed=0)
        make_trainer(tmp_path, callbacks, max_epochs=2, logger=False, limit_train_batches=2).fit(model, dm)
        return model.state_dict()

    plain = run([])
    with_clusters = run([LayerClusters(**SMALL, layers=["conv2", "fc1"], embeddings="none")])
    assert all(torch.equal(plain[k], with_clusters[k]) for k in plain)


class SideBranchCNN(DigitsCNN):
    """DigitsCNN with an unused side layer whose output is NaN, and conv2 frozen at zero (constant output)."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(64, 4)
        with torch.no_grad():
            self.side.weight.fill_(float("nan"))
            self.conv2.weight.zero_()
            self.conv2.bias.zero_()
        for p in [*self.side.parameters(), *self.conv2.parameters()]:
            p.requires_grad_(False)

    def forward(self, x):
        self.side(x.flatten(1))
        return super().forward(x)


def test_constant_and_nan_layers_warn_once_and_training_goes_on(tmp_path):
    cb = LayerClusters(**{**SMALL, "strict": False}, layers=["conv1", "conv2", "side"], embeddings="none")
    dm = DigitsDataModule(noise_fraction=0.0, n_leaked=0, batch_size=256, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=2).fit(SideBranchCNN(), dm)
    ours = [str(w.message) for w in caught if issubclass(w.category, InterpretationWarning)]
    side = [m for m in ours if "'side'" in m]
    assert len(side) == 1 and "NaN" in side[0]
    assert "side" not in cb.results_ and {"conv1", "conv2"} <= set(cb.results_)
    assert cb.results_["conv2"]["n_clusters"] == 1
    collapse = [a for a in cb.alerts_ if a.metric == "clusters/conv2/n_clusters"]
    assert len(collapse) == 2 and "collapsed to one cluster" in collapse[0].message


def test_small_probe_shrinks_truncation_with_one_warning_per_layer(tmp_path):
    cb = LayerClusters(**{**SMALL, "probe_size": 24}, layers=["fc1"], embeddings="none")
    dm = DigitsDataModule(noise_fraction=0.0, n_leaked=0, batch_size=256, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb], max_epochs=2, logger=False, limit_train_batches=2).fit(DigitsCNN(), dm)
    shrink = [w for w in caught if "truncation shrunk to 6" in str(w.message)]
    assert len(shrink) == 1 and "'fc1'" in str(shrink[0].message)
    assert len(cb.results_["fc1"]["weights"]) == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"truncation": 0}, "truncation"),
        ({"scale": "minmax"}, "scale"),
        ({"init_params": "spectral"}, "init_params"),
        ({"max_dims": 0}, "max_dims"),
        ({"label_map_images": -1}, "label_map_images"),
        ({"max_change": 0.0}, "max_change"),
        ({"embeddings": "some"}, "embeddings"),
        ({"covariance_type": "banana"}, "covariance_type"),
        ({"every_n_epochs": -1}, "every_n_epochs"),
    ],
)
def test_callback_rejects_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerClusters(**kwargs)


def test_label_map_panel_puts_each_map_under_its_input():
    images = torch.rand(3, 1, 8, 8)
    maps = torch.tensor([0, 1, 2])[:, None, None].expand(3, 4, 4)
    panel = label_map_panel(maps, images, min_side=16, gap=2)
    assert panel.shape == (3, 16 + 2 + 16, 3 * (16 + 2))
    assert torch.equal(panel[:, 20, 0], cluster_palette(3)[0]) and torch.equal(panel[:, 20, 18], cluster_palette(3)[1])
    assert torch.allclose(panel[0, :16, :16], panel[1, :16, :16])  # grey input
    assert label_map_panel(maps).shape == (3, 64, 3 * 66)


def test_tensorboard_server_shows_projector_and_label_maps(trained, tensorboard_server):
    _, _, logdir = trained
    with tensorboard_server(logdir) as server:
        runs = []
        for _ in range(60):  # the projector plugin finds runs in the background
            runs = json.loads(server.get("/data/plugin/projector/runs"))
            if runs:
                break
            time.sleep(1)
        assert runs, "the projector plugin lists no run"
        info = json.loads(server.get(f"/data/plugin/projector/info?run={runs[0]}"))
        names = [e["tensorName"] for e in info["embeddings"]]
        assert any(n.startswith("clusters/fc1") for n in names)
        assert all(e.get("sprite", {}).get("imagePath") for e in info["embeddings"])
        tags = {}
        for _ in range(30):
            tags = json.loads(server.get("/data/plugin/images/tags"))
            if any("clusters/conv1/label_maps" in t for t in tags.values()):
                break
            time.sleep(1)
        assert any("clusters/conv1/label_maps" in t for t in tags.values())


def test_projector_files_match_torchs_add_embedding(tmp_path):
    """Our fast writer produces what ``SummaryWriter.add_embedding`` does: same paths, values, metadata, sprite."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from lightning_interp.report import write_projector_embedding

    g = torch.Generator().manual_seed(0)
    mat, images = torch.randn(10, 5, generator=g), torch.rand(10, 1, 8, 8, generator=g)
    metadata, header = [[i, i % 3, "x"] for i in range(10)], ["index", "cluster", "note"]
    theirs, ours = SummaryWriter(str(tmp_path / "torch")), SummaryWriter(str(tmp_path / "ours"))
    for step, tag in [(3, "clusters/fc1"), (7, "clusters/fc1")]:
        theirs.add_embedding(mat, metadata=metadata, metadata_header=header, label_img=images, global_step=step,
                             tag=tag)
        write_projector_embedding(ours, tag, step, mat.numpy(), metadata, header, images)
    config = "projector_config.pbtxt"
    assert (tmp_path / "ours" / config).read_text() == (tmp_path / "torch" / config).read_text()
    for folder in ("00003/clusters%2ffc1", "00007/clusters%2ffc1"):
        a, b = tmp_path / "torch" / folder, tmp_path / "ours" / folder
        assert np.allclose(np.loadtxt(a / "tensors.tsv"), np.loadtxt(b / "tensors.tsv"), atol=1e-6)
        assert (a / "metadata.tsv").read_text() == (b / "metadata.tsv").read_text()
        sprite_a, sprite_b = (np.asarray(Image.open(f / "sprite.png"), dtype=int) for f in (a, b))
        assert sprite_a.shape == sprite_b.shape and np.abs(sprite_a - sprite_b).max() <= 1


def test_projector_files_go_through_tensorboards_file_systems():
    """A remote log directory (fsspec's in-memory one here) gets the files; nothing lands on local disk."""
    fsspec = pytest.importorskip("fsspec")
    from torch.utils.tensorboard import SummaryWriter

    from lightning_interp.report import write_projector_embedding

    writer = SummaryWriter("memory://lightning-interp-test/run")
    write_projector_embedding(writer, "clusters/fc1", 1, torch.randn(5, 3).numpy(), [[i] for i in range(5)], None,
                              torch.rand(5, 1, 8, 8))
    files = fsspec.filesystem("memory").find("/lightning-interp-test/run")
    expected = {"tensors.tsv", "metadata.tsv", "sprite.png", "projector_config.pbtxt"}
    assert {f.rsplit("/", 1)[-1] for f in files} >= expected


def test_wide_layer_pca_is_seeded_and_leaves_the_global_rng_alone():
    from lightning_interp.methods.dpgmm import pca_reduce

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g) @ torch.randn(8, 600, generator=g) + 0.1 * torch.randn(300, 600, generator=g)
    state = torch.get_rng_state()
    first, kept = pca_reduce(x, 8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # a different global stream must not change the result
    again, _ = pca_reduce(x, 8, seed=3)
    torch.testing.assert_close(again, first)
    exact = torch.linalg.svdvals(x - x.mean(0))[:8].pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert abs(kept - float(exact)) < 0.01 * float(exact)


def test_a_probe_smaller_than_probe_size_is_analysed_whole_after_one_warning(tmp_path):
    from conftest import make_trainer
    from torch.utils.data import TensorDataset

    from lightning_interp import LayerClusters
    from lightning_interp.demo import DigitsCNN, DigitsDataModule

    small = TensorDataset(torch.rand(300, 1, 8, 8), torch.randint(0, 10, (300,)))
    cb = LayerClusters(every_n_epochs=1, probe=small, strict=True)
    with pytest.warns(InterpretationWarning, match="probe_size=512 exceeds the probe's 300 samples; the whole probe"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(DigitsCNN(), DigitsDataModule())
    assert len(cb.probe_) == 300 and cb.results_ and cb.coreset_ is None


def test_a_probe_too_small_for_two_components_raises_no_collapse_alert(tmp_path):
    """7 samples shrink the truncation to one component, so one cluster is forced, not found: with
    alert_action="stop" the collapse alert used to end training at the first run."""
    from torch.utils.data import TensorDataset

    data = DigitsDataModule()
    tiny = TensorDataset(data.splits.x_val[:7], data.splits.y_val[:7])
    cb = LayerClusters(every_n_epochs=1, probe=tiny, alert_action="stop", embeddings="none")
    with pytest.warns(InterpretationWarning, match="truncation shrunk to 1"):
        trainer = make_trainer(tmp_path, [cb], max_epochs=3, logger=False)
        trainer.fit(DigitsCNN(), data)
    assert trainer.current_epoch == 3 and cb.alerts_ == []
    assert all(r["n_clusters"] == 1 and r["n_components"] == 1 for r in cb.results_.values())
