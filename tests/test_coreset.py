import math

import pytest
import torch
from scipy import stats

from lightning_interp.methods.coreset import (
    SELECTORS,
    adaptive_coreset,
    average_ranks,
    balanced_quotas,
    fidelity,
    herding,
    kcenter_greedy,
    resolve_size,
    select_coreset,
    uncertainty_scores,
)


def clustered(n=300, d=8, k=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g, dtype=dtype) * 4
    labels = torch.randint(k, (n,), generator=g)
    return centers[labels] + torch.randn(n, d, generator=g, dtype=dtype), labels


def covering_radius(x, positions):
    return torch.cdist(x, x[positions]).min(1).values.max()


# ------------------------------------------------------------------------------------ resolve_size
def test_resolve_size_fractions_and_counts():
    assert resolve_size(1000, 0.05) == 50
    assert resolve_size(1000, 1.0) == 1000
    assert resolve_size(1000, 1) == 1
    assert resolve_size(1000, 1000) == 1000
    assert resolve_size(10, 0.01) == 1  # never rounds down to nothing


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, 0, -3, 1001])
def test_resolve_size_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="probe_size"):
        resolve_size(1000, bad)


def test_resolve_size_rejects_empty_and_non_numbers():
    with pytest.raises(ValueError, match="empty"):
        resolve_size(0, 0.1)
    with pytest.raises(TypeError):
        resolve_size(100, "10%")
    with pytest.raises(TypeError):
        resolve_size(100, True)


# ------------------------------------------------------------------------------- select_coreset
def test_selector_requirements_and_bad_input_are_named():
    x, y = clustered()
    logits = torch.randn(len(x), 5)
    with pytest.raises(ValueError, match="unknown selector.*kcenter"):
        select_coreset("coreset", 10, features=x)
    for selector in ("kcenter", "herding"):
        with pytest.raises(ValueError, match="needs features"):
            select_coreset(selector, 10, logits=logits)
    with pytest.raises(ValueError, match="needs logits"):
        select_coreset("uncertainty", 10, features=x)
    with pytest.raises(ValueError, match="needs labels"):
        select_coreset("random", 10, features=x, balance=True)
    with pytest.raises(ValueError, match=r"size=301.*\[1, 300\]"):
        select_coreset("kcenter", 301, features=x)
    with pytest.raises(ValueError, match="empty"):
        select_coreset("kcenter", 1, features=torch.zeros(0, 4))
    with pytest.raises(ValueError, match="row counts disagree"):
        select_coreset("uncertainty", 5, logits=logits, labels=y[:10])
    with pytest.raises(ValueError, match="n_total"):
        select_coreset("random", 5)
    with pytest.raises(ValueError, match="unknown uncertainty.*entropy"):
        select_coreset("uncertainty", 5, logits=logits, uncertainty="variance")


def test_balance_errors_on_too_few_samples_for_the_classes():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="3 samples for 10 classes"):
        select_coreset("uncertainty", 3, logits=logits, labels=torch.tensor([0, 1, 2]), balance=True)
    x, y = clustered(k=5)
    with pytest.raises(ValueError, match="one sample of each of the 5 classes"):
        select_coreset("kcenter", 4, features=x, labels=y, balance=True)


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("balance", [False, True])
def test_every_selector_returns_distinct_valid_positions_deterministically(selector, balance):
    x, y = clustered()
    logits = torch.randn(len(x), 5, generator=torch.Generator().manual_seed(1))
    kw = dict(features=x, logits=logits, labels=y, balance=balance)
    pos = select_coreset(selector, 40, seed=3, **kw)
    assert pos.dtype == torch.long and pos.shape == (40,)
    assert len(torch.unique(pos)) == 40 and int(pos.min()) >= 0 and int(pos.max()) < len(x)
    assert torch.equal(pos, select_coreset(selector, 40, seed=3, **kw))
    if balance:
        counts = torch.bincount(y[pos], minlength=5)
        assert torch.equal(counts, balanced_quotas(torch.bincount(y), 40))


@pytest.mark.parametrize("selector", ["random", "kcenter"])
def test_seed_changes_seeded_selectors(selector):
    x, _ = clustered()
    first, second = (select_coreset(selector, 20, features=x, seed=seed) for seed in (0, 1))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("selector", SELECTORS)
def test_selections_are_nested(selector):
    x, _ = clustered()
    logits = torch.randn(len(x), 5, generator=torch.Generator().manual_seed(1))
    small = select_coreset(selector, 15, features=x, logits=logits)
    large = select_coreset(selector, 60, features=x, logits=logits)
    assert torch.equal(large[:15], small)


def test_balanced_quotas_are_as_even_as_the_counts_allow():
    counts = torch.tensor([50, 30, 5, 200])
    q = balanced_quotas(counts, 61)
    assert int(q.sum()) == 61 and bool((q <= counts).all())
    assert int(q[2]) == 5  # the small class gives all it has
    free = q[[0, 1, 3]]
    assert int(free.max() - free.min()) <= 1


# ----------------------------------------------------------------------------------------- k-center
def brute_force_kcenter(x, size, first):
    order = [first]
    for _ in range(size - 1):
        d = torch.cdist(x, x[order]).min(1).values
        d[order] = -1
        order.append(int(d.argmax()))
    return torch.tensor(order)


@pytest.mark.parametrize("block,candidates", [(64, 64), (4, 3), (1, 1), (7, 299)])
def test_lazy_kcenter_equals_brute_force_greedy(block, candidates):
    x, _ = clustered(n=300, d=6)
    got = kcenter_greedy(x, 80, seed=5, block=block, candidates=candidates)
    assert torch.equal(got, brute_force_kcenter(x, 80, int(got[0])))


def test_kcenter_covers_better_than_random_and_handles_duplicates():
    x, _ = clustered(n=400, d=4, k=8)
    kc = select_coreset("kcenter", 40, features=x)
    rnd = select_coreset("random", 40, features=x)
    assert covering_radius(x, kc) < 0.8 * covering_radius(x, rnd)
    dup = torch.cat([x[:20], x[:20]])  # every row twice: all 40 picks must still be distinct rows
    pos = kcenter_greedy(dup, 40)
    assert len(torch.unique(pos)) == 40


# ------------------------------------------------------------------------------------------ herding
def test_herding_is_greedy_mean_matching_and_beats_random():
    x, _ = clustered(n=200, d=5)
    pos = herding(x, 30)
    mu = x.mean(0)
    for t in range(30):  # each pick minimises the distance of the running mean to mu
        prev = x[pos[:t]].sum(0)
        err = ((mu - (prev + x) / (t + 1)) ** 2).sum(1)
        err[pos[:t]] = math.inf
        assert float(err[pos[t]]) <= float(err.min()) + 1e-9
    rnd = select_coreset("random", 30, features=x)
    assert (x[pos].mean(0) - mu).norm() < 0.5 * (x[rnd].mean(0) - mu).norm()


# -------------------------------------------------------------------------------------- uncertainty
def test_uncertainty_measures_match_their_formulas_and_rank_first():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.9, -3.0], [1.0, 0.0, 0.0]])
    p = logits.softmax(1)
    torch.testing.assert_close(uncertainty_scores(logits, "entropy"), -(p * p.log()).sum(1))
    torch.testing.assert_close(uncertainty_scores(logits, "least_confidence"), 1 - p.max(1).values)
    top2 = p.sort(1, descending=True).values
    torch.testing.assert_close(uncertainty_scores(logits, "margin"), 1 - (top2[:, 0] - top2[:, 1]))
    assert select_coreset("uncertainty", 1, logits=logits, uncertainty="entropy").tolist() == [1]
    assert select_coreset("uncertainty", 2, logits=logits, uncertainty="margin").tolist() == [1, 2]
    assert select_coreset("uncertainty", 4, logits=logits, uncertainty="least_confidence")[-1] == 0


def test_uncertainty_ties_are_broken_by_seed_not_dataset_order():
    logits = torch.zeros(100, 3)  # every row equally uncertain
    a = select_coreset("uncertainty", 10, logits=logits, seed=0)
    b = select_coreset("uncertainty", 10, logits=logits, seed=1)
    assert not torch.equal(a, b) and a.tolist() != list(range(10))


# ----------------------------------------------------------------------------------------- fidelity
def test_average_ranks_and_spearman_match_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (200,), generator=g).double()  # many ties
    b = a + torch.randint(0, 4, (200,), generator=g).double()
    torch.testing.assert_close(average_ranks(a), torch.from_numpy(stats.rankdata(a.numpy())))
    assert fidelity(a, b)["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_fidelity_extremes_and_top_k_jaccard():
    a = torch.arange(10.0)
    assert fidelity(a, a * 3 + 1) == {"spearman": pytest.approx(1.0), "jaccard_top_k": 1.0, "top_k": 1}
    assert fidelity(a, -a)["spearman"] == pytest.approx(-1.0)
    b = a.clone()
    b[9], b[0] = -1.0, 100.0  # top-3 of a: {7,8,9}; of b: {0,8,7}
    assert fidelity(a, b, top_k=3)["jaccard_top_k"] == pytest.approx(2 / 4)
    assert fidelity(a.reshape(2, 5), a.reshape(2, 5))["spearman"] == pytest.approx(1.0)


def test_fidelity_bad_input():
    a = torch.arange(10.0)
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity(a, a[:9])
    with pytest.raises(ValueError, match="NaN"):
        fidelity(a, torch.where(a > 5, torch.nan, a))
    with pytest.raises(ValueError, match="top_k"):
        fidelity(a, a, top_k=11)
    with pytest.raises(ValueError, match="at least 2"):
        fidelity(a[:1], a[:1])
    with pytest.warns(UserWarning, match="constant"):
        assert math.isnan(fidelity(a, torch.ones(10))["spearman"])


def test_fidelity_per_layer_mappings_average_within_layer_numbers():
    g = torch.Generator().manual_seed(0)
    full = {"conv1": torch.randn(16, generator=g), "fc1": 100 + torch.randn(40, generator=g)}
    sub = {"conv1": -full["conv1"], "fc1": full["fc1"] + 0.01 * torch.randn(40, generator=g)}
    fid = fidelity(full, sub)
    each = [fidelity(full[k], sub[k]) for k in full]
    assert fid["spearman"] == pytest.approx((each[0]["spearman"] + each[1]["spearman"]) / 2)
    assert fid["top_k"] == 2 + 4
    # concatenated, the offset between layers would hide that conv1 is reversed
    concat = fidelity(torch.cat(list(full.values())), torch.cat(list(sub.values())))
    assert concat["spearman"] > 0.8 > fid["spearman"]
    with pytest.raises(ValueError, match="same non-empty keys"):
        fidelity(full, {"conv1": sub["conv1"]})
    with pytest.raises(ValueError, match="for 'fc1'"):
        fidelity(full, {"conv1": sub["conv1"], "fc1": sub["fc1"][:5]})
    with pytest.raises(TypeError, match="mappings"):
        fidelity(full, torch.zeros(3))


# ----------------------------------------------------------------------------------------- adaptive
def mean_profile(x):
    return lambda positions: x[positions].mean(0)


def test_adaptive_grows_geometrically_until_the_target():
    x, _ = clustered(n=800, d=40, k=10)
    res = adaptive_coreset(mean_profile(x), len(x), "random", target=0.95, features=x)
    sizes = [s for s, _ in res.trace]
    assert sizes[0] == 40 and all(b == min(800, math.ceil(a * 2)) for a, b in zip(sizes, sizes[1:]))
    assert res.reached and res.fidelity["spearman"] >= 0.95 and res.size == sizes[-1] == len(res.positions)
    assert all(rho < 0.95 for _, rho in res.trace[:-1])
    assert res.fidelity == fidelity(x.mean(0), x[res.positions].mean(0))
    assert res.reference_size == 800


def test_adaptive_warns_when_the_target_is_never_reached():
    g = torch.Generator().manual_seed(0)

    def noise(positions):  # unrelated to the data: never faithful
        return torch.randn(20, generator=g)

    with pytest.warns(UserWarning, match="target"):
        res = adaptive_coreset(noise, 100, "random", target=0.99, reference_fraction=0.5)
    assert not res.reached and res.size == 100 and res.reference_size == 50


def test_adaptive_bad_arguments():
    def f(positions):
        return torch.arange(5.0)

    with pytest.raises(ValueError, match="growth"):
        adaptive_coreset(f, 100, "random", growth=1.0)
    with pytest.raises(ValueError, match="target"):
        adaptive_coreset(f, 100, "random", target=0.0)
    with pytest.raises(ValueError, match="probe_size"):
        adaptive_coreset(f, 100, "random", start_fraction=0.0)
    with pytest.raises(ValueError, match="empty"):
        adaptive_coreset(f, 0, "random")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("selector", SELECTORS)
def test_selectors_run_on_the_tensors_device(selector):
    x, y = clustered()
    x, y = x.float().cuda(), y.cuda()
    logits = x[:, :5]
    for balance in (False, True):
        pos = select_coreset(selector, 30, features=x, logits=logits, labels=y, balance=balance)
        assert pos.device == x.device
        cpu = select_coreset(selector, 30, features=x.cpu(), logits=logits.cpu(), labels=y.cpu(), balance=balance)
        if selector in ("random", "uncertainty"):
            assert torch.equal(pos.cpu(), cpu)


def test_greedy_selectors_restore_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, _ = clustered(n=100)
        kcenter_greedy(x, 10)
        herding(x, 10)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_entropy_with_a_masked_class_is_finite():
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 2.0, float("-inf")]])
    entropy = uncertainty_scores(logits, "entropy")
    assert torch.allclose(entropy, uncertainty_scores(logits[:, :2], "entropy"))


def test_top_k_jaccard_breaks_ties_by_position():
    g = torch.Generator().manual_seed(2)  # a pattern where torch.topk picked different tied positions
    a = torch.randint(0, 3, (200,), generator=g).float()
    b = a.clone()
    below_top = a < 2
    b[below_top] = torch.rand(int(below_top.sum()), generator=g)  # b differs from a only below the tied top
    assert fidelity(a, b, top_k=10)["jaccard_top_k"] == 1.0


def test_adaptive_balanced_starts_with_one_sample_per_class():
    x, labels = clustered(n=100, d=40, k=10)
    res = adaptive_coreset(mean_profile(x), len(x), "random", labels=labels, balance=True, target=0.5)
    assert res.trace[0][0] == 10 and len(torch.unique(labels[res.positions])) == 10
