"""MirroredInfluence: the mirrored-influence methods and the callback (Ko et al., CVPR 2024)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import read_tags, run_ddp_script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import InterpretationWarning, MirroredInfluence, ProbeDataError
from lightning_interp._lightning import pl
from lightning_interp.demo import DigitsCNN, DigitsDataModule
from lightning_interp.methods import mirrored as M
from lightning_interp.probe import evaluation_mode


# ------------------------------------------------------------------------------------------------------
# small models and data
# ------------------------------------------------------------------------------------------------------
class SmallNet(nn.Module):
    """An MLP with BatchNorm and dropout, so eval mode and buffers matter."""

    def __init__(self, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(x))


def blobs(n: int, seed: int, d: int = 8, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, classes, (n,), generator=gen)
    return centers[y] + torch.randn(n, d, generator=gen), y


def trained(x, y, epochs: int = 25, seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for xb, yb in M.tensor_batches(x, y, 100):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model


def auroc(scores, positives) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positives.numpy(), scores.numpy()))


@pytest.fixture(scope="module")
def noisy_blobs():
    x, y_clean = blobs(300, seed=0)
    flipped = torch.zeros(300, dtype=torch.bool)
    flipped[::5] = True  # 20 % symmetric noise: every 5th label moved to another class
    y = y_clean.clone()
    y[flipped] = (y[flipped] + 1) % 3
    x_val, y_val = blobs(90, seed=1)
    return x, y, flipped, x_val, y_val, trained(x, y)


# ------------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------------
def test_mislabel_scores_rank_flipped_labels_first_and_leave_the_model_untouched(noisy_blobs):
    x, y, flipped, x_val, y_val, model = noisy_blobs
    model.train()
    before = copy.deepcopy(model.state_dict())
    result = M.mislabel_scores(model, x_val, y_val, M.tensor_batches(x, y, 64))
    assert result.scores.shape == (300,) and torch.equal(result.labels, y)
    assert auroc(result.scores, flipped) > 0.9
    assert result.scores[flipped].mean() > 0 > result.scores[~flipped].mean()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(m.training for m in model.modules())


def test_trusted_update_descends_on_the_trusted_set(noisy_blobs):
    x, y, _, x_val, y_val, model = noisy_blobs
    rule = M.UpdateRule(steps=5, lr=3e-3, optimizer="adam")
    params, updated, buffers = M.trained_copy(model, x_val, y_val, rule)
    with evaluation_mode(model), torch.no_grad():
        loss_before = M.per_sample_loss(model, params, buffers, x_val, y_val).mean()
        loss_after = M.per_sample_loss(model, updated, buffers, x_val, y_val).mean()
    assert loss_after < loss_before
    assert any(not torch.equal(params[n], updated[n]) for n in params)


def test_bad_hyper_parameters_and_labels_raise_clear_errors(noisy_blobs):
    x, y, _, x_val, y_val, model = noisy_blobs
    with pytest.raises(ValueError, match="optimizer must be one of"):
        M.UpdateRule(1, 1e-3, "rmsprop")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        M.UpdateRule(0, 1e-3, "sgd")
    with pytest.raises(ValueError, match="integer class indices"):
        M.mislabel_scores(model, x_val, y_val.float(), M.tensor_batches(x, y))
    with pytest.raises(ValueError, match="class logits"):
        M.mislabel_scores(nn.Linear(8, 1), x_val, y_val, M.tensor_batches(x, y))


def test_relative_influence_retrieves_exact_copies_with_influence_one(noisy_blobs):
    x, y, _, x_val, y_val, model = noisy_blobs
    copies = torch.tensor([3, 50, 120, 299])
    queries_x = torch.cat([x[copies], x_val[:20]])
    queries_y = torch.cat([y[copies], y_val[:20]])
    result = M.leak_scores(model, queries_x, queries_y, x, y, rule="relative", top_k=5)
    assert torch.equal(result.train_index[:4], copies)
    torch.testing.assert_close(result.score[:4], torch.ones(4), atol=1e-4, rtol=0)
    assert (result.influence <= 1 + 1e-5).all() and (result.influence >= -1 - 1e-5).all()
    assert (result.influence[:, :-1] >= result.influence[:, 1:]).all()  # ranked


def test_translation_orbit_finds_copies_shifted_before_training():
    """A training copy of a translated query is the orbit's exact match: influence 1 (no training needed)."""
    from lightning_interp.demo import DigitsCNN, load_digits_tensors

    torch.manual_seed(0)
    data = load_digits_tensors(seed=0)
    queries_x, queries_y = data.x_test[:12], data.y_test[:12]
    shifted = torch.cat([M.translation_orbit(queries_x[:4], 1)[5], M.translation_orbit(queries_x[4:8], 1)[1]])
    train_x, train_y = torch.cat([data.x_train, shifted]), torch.cat([data.y_train, queries_y[:8]])
    copies = torch.arange(len(data.x_train), len(train_x))
    model = DigitsCNN().eval()
    found = M.leak_scores(model, queries_x, queries_y, train_x, train_y)
    assert torch.equal(found.train_index[:8], copies)
    torch.testing.assert_close(found.score[:8], torch.ones(8), atol=1e-4, rtol=0)
    assert (found.score[8:] < 0.9999).all()  # queries without a copy
    unshifted = M.leak_scores(model, queries_x, queries_y, train_x, train_y, shift_radius=0)
    assert (unshifted.score[:8] < 0.9999).all()  # a plain comparison misses them
    orbit = M.translation_orbit(queries_x, 2)
    assert orbit.shape == (25, *queries_x.shape) and torch.equal(orbit[12], queries_x)
    with pytest.raises(ValueError, match="translations need images"):
        M.translation_orbit(queries_x.flatten(1), 1)


def test_batched_reference_step_equals_a_per_query_adam_step_on_a_model_copy(noisy_blobs):
    x, y, _, x_val, y_val, model = noisy_blobs
    queries_x, queries_y = x_val[:6], y_val[:6]
    result = M.leak_scores(model, queries_x, queries_y, x, y, rule="reference", candidates=None,
                           fit_threshold=0.0, top_k=3, query_chunk=4)
    for q in range(6):
        clone = copy.deepcopy(model).eval()
        opt = torch.optim.Adam(clone.parameters(), lr=5e-3)
        (-F.cross_entropy(clone(queries_x[q:q + 1]), queries_y[q:q + 1])).backward()  # ascent
        opt.step()
        with torch.no_grad():
            model.eval()
            after, before = (F.cross_entropy(m(x), y, reduction="none") for m in (clone, model))
            delta = (after - before).abs()
        best = delta.topk(3)
        torch.testing.assert_close(result.influence[q], best.values, rtol=1e-3, atol=1e-6)
        assert result.train_index[q] == best.indices[0]


def test_reference_score_with_top_k_one_still_compares_with_the_runner_up(noisy_blobs):
    x, y, _, x_val, y_val, model = noisy_blobs
    kwargs = dict(rule="reference", candidates=None, fit_threshold=0.0)
    one = M.leak_scores(model, x_val[:3], y_val[:3], x, y, top_k=1, **kwargs)
    three = M.leak_scores(model, x_val[:3], y_val[:3], x, y, top_k=3, **kwargs)
    assert one.top_k.shape == (3, 1) and bool((one.score > 0).all())
    torch.testing.assert_close(one.score, three.score)
    narrow = M.leak_scores(model, x_val[:3], y_val[:3], x, y, rule="reference", candidates=1, top_k=1)
    assert narrow.top_k.shape == (3, 1)  # the pool still holds a runner-up for the score


def test_int32_labels_are_accepted_like_int64(noisy_blobs):
    x, y, _, x_val, y_val, model = noisy_blobs
    as_long = M.mislabel_scores(model, x_val, y_val, M.tensor_batches(x, y)).scores
    as_int = M.mislabel_scores(model, x_val, y_val.int(), M.tensor_batches(x, y.int())).scores
    torch.testing.assert_close(as_int, as_long)
    M.leak_scores(model, x_val[:2], y_val[:2].int(), x, y.int(), rule="reference", candidates=8)


def test_frozen_parameters_stay_where_training_keeps_them(noisy_blobs):
    x, y, _, x_val, y_val, model = noisy_blobs
    frozen = copy.deepcopy(model)
    frozen.body.requires_grad_(False)  # a fine-tuned head on a frozen body
    params, updated, _ = M.trained_copy(frozen, x_val, y_val, M.MISLABEL_RULE)
    for name in params:
        moved = not torch.equal(params[name], updated[name])
        assert moved == name.startswith("head."), name
    head_only = M.self_influence(frozen, x[:5], y[:5])  # TracIn over the trained parameters only
    assert bool((head_only < M.self_influence(model, x[:5], y[:5])).all())


def test_fit_queries_are_moved_onto_a_growing_l2_sphere_not_skipped(noisy_blobs):
    x, y, _, _, _, model = noisy_blobs
    with evaluation_mode(model), torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none")
    fit, unfit = loss.argmin(), loss.argmax()
    threshold = float(loss.median())  # "already fit": below it
    assert loss[fit] < threshold < loss[unfit]
    params, buffers = M.parameter_copy(model)
    rows = torch.stack([fit, unfit])
    with evaluation_mode(model, grad=None):
        moved, radius = M.sphere_perturb_fit_queries(model, params, buffers, x[rows], y[rows], fit_threshold=threshold,
                                                     generator=torch.Generator().manual_seed(0))
        new_loss = M.per_sample_loss(model, params, buffers, moved, y[rows]).detach()
    assert radius[0] >= 3.0 and radius[1] == 0.0
    assert torch.allclose((moved[0] - x[fit]).norm(), radius[0])
    growths = (radius[0] / 3.0).log() / torch.log(torch.tensor(1.1))  # radius = 3 * 1.1^k
    assert torch.isclose(growths, growths.round(), atol=1e-3)
    assert new_loss[0] >= threshold and torch.equal(moved[1], x[unfit])
    result = M.leak_scores(model, x[rows], y[rows], x, y, rule="reference", candidates=None,
                           fit_threshold=threshold)
    assert result.radius[0] >= 3.0 and result.radius[1] == 0 and (result.influence[0] > 0).all()


def test_self_influence_matches_captum_tracincp(noisy_blobs, tmp_path):
    captum_influence = pytest.importorskip("captum.influence")
    x, y, _, _, _, model = noisy_blobs
    model.eval()
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)

    def load(net, ckpt):
        net.load_state_dict(torch.load(ckpt))
        return 1.0

    tracin = captum_influence.TracInCP(model, TensorDataset(x[:40], y[:40]), [str(path)], checkpoints_load_func=load,
                                       loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=20,
                                       sample_wise_grads_per_batch=False)
    expected = tracin.self_influence(DataLoader(TensorDataset(x[:40], y[:40]), batch_size=20))
    torch.testing.assert_close(M.self_influence(model, x[:40], y[:40]), expected.float(), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# callback
# ------------------------------------------------------------------------------------------------------
def fit_demo(trainer_factory, callbacks, epochs=3, **trainer_kwargs):
    pl.seed_everything(0)
    dm = DigitsDataModule(noise_fraction=0.2, n_leaked=0, batch_size=128)
    model = DigitsCNN()
    trainer = trainer_factory(callbacks, max_epochs=epochs, **trainer_kwargs)
    trainer.fit(model, dm)
    return model, dm, trainer


def test_callback_accumulates_flags_logs_and_alerts(trainer_factory, tmp_path):
    cb = MirroredInfluence(every_n_epochs=1, max_flagged_fraction=0.01, threshold=0.05, second_look_top_k=8,
                           strict=True)
    runs = []
    original = cb._mirrored_scores
    cb._mirrored_scores = lambda *a: runs.append(original(*a)) or runs[-1]
    _, dm, _ = fit_demo(trainer_factory, [cb])
    n = len(dm.splits.y_train)
    assert cb.scores_.shape == (n,) and len(runs) == 3 and len(cb.history_) == 3
    torch.testing.assert_close(cb.scores_, torch.stack(runs).double().mean(0))  # running mean over runs
    flagged = cb.flagged_
    assert len(flagged) > 0 and (cb.scores_[flagged] > 0.05).all()
    assert (cb.scores_[flagged][:-1] >= cb.scores_[flagged][1:]).all()
    truth = torch.zeros(n, dtype=torch.bool)
    truth[dm.splits.flipped] = True
    assert auroc(cb.scores_.float(), truth) > 0.8  # three early epochs already separate the flipped labels
    assert cb.alerts_ and cb.alerts_[0].metric == "influence/flagged_fraction"
    assert set(cb.self_influence_) and set(cb.confirmed_) <= set(flagged[:8].tolist())
    tags = read_tags(tmp_path)
    assert {"influence/flagged_count", "influence/flagged_fraction", "influence/leaks"} <= tags["scalars"]
    assert "influence/scores" in tags["histograms"] and "influence/flagged_gallery" in tags["images"]
    assert any(t.startswith("influence/flagged") for t in tags["tensors"])  # the text table
    state = cb.state_dict()
    fresh = MirroredInfluence()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.scores_, cb.scores_)


def test_callback_finds_a_validation_image_leaked_into_training(trainer_factory):
    pl.seed_everything(0)
    dm = DigitsDataModule(noise_fraction=0.0, n_leaked=0, batch_size=128)
    s = dm.splits
    shifted_down = torch.nn.functional.pad(s.x_val[3:5], (0, 0, 1, 0))[..., :-1, :]  # one pixel down
    s.x_train = torch.cat([s.x_train, s.x_val[:3], shifted_down])
    s.y_train = torch.cat([s.y_train, s.y_val[:5]])
    cb = MirroredInfluence(every_n_epochs=1, strict=True)
    plain = MirroredInfluence(every_n_epochs=1, strict=True, leak_shift_radius=0, leak_queries=TensorDataset(
        s.x_val, s.y_val))  # another query set: another state key
    trainer = trainer_factory([cb, plain], max_epochs=1, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(DigitsCNN(), dm)
    copies = {q: t for q, t, _ in cb.leaks_}
    n = len(s.y_train) - 5
    assert {0: n, 1: n + 1, 2: n + 2, 3: n + 3, 4: n + 4}.items() <= copies.items()
    assert len(plain.history_) == 1 and plain.state_key != cb.state_key  # two configurations side by side


def test_callback_does_not_disturb_training(trainer_factory):
    plain, _, _ = fit_demo(trainer_factory, [], epochs=2, limit_train_batches=3, limit_val_batches=1)
    watched, _, _ = fit_demo(trainer_factory, [MirroredInfluence(every_n_epochs=1, second_look_top_k=4, strict=True)],
                             epochs=2, limit_train_batches=3, limit_val_batches=1)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name


def test_no_validation_set_and_no_trusted_set_fails_at_setup(trainer_factory):
    dm = DigitsDataModule(noise_fraction=0.0, n_leaked=0)
    trainer = trainer_factory([MirroredInfluence()], max_epochs=1)
    with pytest.raises(ProbeDataError, match="needs validation data"):
        trainer.fit(DigitsCNN(), train_dataloaders=dm.train_dataloader())


def test_regression_targets_get_a_class_label_message(trainer_factory):
    dm = DigitsDataModule(noise_fraction=0.0, n_leaked=0)
    s = dm.splits
    trusted = TensorDataset(s.x_val, s.y_val.float())
    trainer = trainer_factory([MirroredInfluence(trusted=trusted, leak_queries=None)], max_epochs=1)
    with pytest.raises(ProbeDataError, match="needs class labels"):
        trainer.fit(DigitsCNN(), train_dataloaders=dm.train_dataloader())


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        MirroredInfluence(optimizer="lbfgs")
    with pytest.raises(ValueError, match="trusted"):
        MirroredInfluence(trusted="test")
    with pytest.raises(ValueError, match="max_flagged_fraction"):
        MirroredInfluence(max_flagged_fraction=0.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        MirroredInfluence(lr=0.0)
    with pytest.raises(ValueError, match="against itself finds every sample"):
        MirroredInfluence(leak_queries="train")
    MirroredInfluence(trusted="train")  # the training set may stand in for clean data
    with pytest.raises(ValueError, match="every query would find itself"):
        MirroredInfluence(probe="val")  # scored against the default leak queries, "val"
    MirroredInfluence(probe="val", leak_queries=None)
    with pytest.raises(TypeError, match=r"trusted=TensorDataset\(torch.as_tensor"):
        MirroredInfluence(trusted=torch.zeros(3, 2).numpy())
    with pytest.raises(TypeError, match=r"leak_queries=loader.dataset"):
        MirroredInfluence(leak_queries=DataLoader(TensorDataset(torch.zeros(3))))


def test_its_own_defaults_are_in_the_signature_where_lightningcli_reads_them():
    import inspect

    params = inspect.signature(MirroredInfluence).parameters
    assert params["every_n_epochs"].default == 10 and params["probe"].default == "train"
    assert params["probe_fidelity"].default is False


def test_scores_under_two_process_ddp_equal_single_process_scores(tmp_path):
    out = tmp_path / "ddp.pt"
    proc = run_ddp_script("ddp_mirrored.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["world_size"] == 2 and result["runs"] == 1
    torch.testing.assert_close(result["ddp"].float(), result["single"], rtol=1e-4, atol=1e-5)


def test_queries_too_small_for_the_translations_are_compared_as_they_are():
    cb = MirroredInfluence(leak_shift_radius=1)
    too_small = r"too small for leak_shift_radius=1; they are compared untranslated"
    with pytest.warns(InterpretationWarning, match=too_small):
        views = cb._query_views(torch.zeros(3, 1, 1, 64))  # a 1-D signal stored as [N, C, 1, T]
    assert views.shape == (1, 3, 1, 1, 64)
    assert cb._query_views(torch.zeros(3, 1, 8, 8)).shape == (9, 3, 1, 8, 8)
    assert cb._query_views(torch.zeros(3, 64)).shape == (1, 3, 64)  # not images


def test_a_training_set_of_another_size_restarts_the_running_mean_with_a_warning():
    cb = MirroredInfluence()
    cb._accumulate(4, torch.arange(4), torch.ones(4), torch.tensor([0, 1, 2, 3]))
    with pytest.warns(InterpretationWarning, match="now has 3 samples, not 4.*running mean restarts"):
        cb._accumulate(3, torch.arange(3), torch.full((3,), 2.0), torch.tensor([0, 1, 2]))
    assert cb.scores_.tolist() == [2.0, 2.0, 2.0]


def test_other_data_behind_the_same_indices_restarts_the_running_mean_and_relabelled_samples_restart_alone():
    """A second fit on another datamodule of the same size used to average two datasets' scores index by index."""
    cb = MirroredInfluence()
    cb._accumulate(4, torch.arange(4), torch.ones(4), torch.tensor([0, 1, 2, 3]))
    with pytest.warns(InterpretationWarning, match="1 of 4 training samples now carry other labels.*relabelled"):
        cb._accumulate(4, torch.arange(4), torch.full((4,), 3.0), torch.tensor([0, 1, 2, 9]))
    assert cb.scores_.tolist() == [2.0, 2.0, 2.0, 3.0]  # the relabelled sample's mean starts again

    other = MirroredInfluence()
    other._accumulate(4, torch.arange(4), torch.ones(4), torch.tensor([0, 1, 2, 3]))
    with pytest.warns(InterpretationWarning, match="3 of 4 .* the training data changed"):
        other._accumulate(4, torch.arange(4), torch.full((4,), 3.0), torch.tensor([0, 5, 6, 7]))
    assert other.scores_.tolist() == [3.0, 3.0, 3.0, 3.0]


def test_a_second_fit_on_other_data_does_not_average_its_scores_with_the_first(tmp_path):
    from conftest import make_trainer

    cb = MirroredInfluence(every_n_epochs=1, strict=True)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, logger=False)
    model = DigitsCNN()
    trainer.fit(model, DigitsDataModule(batch_size=128, seed=0))
    trainer.fit_loop.max_epochs = 2  # fine-tuning goes on, on another split of the same size
    with pytest.warns(InterpretationWarning, match="the training data changed"):
        trainer.fit(model, DigitsDataModule(batch_size=128, seed=1))
    assert len(cb.history_) == 2 and float(cb._score_count.max()) == 1.0  # the second data's run alone


def test_other_data_is_told_from_relabelling_by_the_labels_chance_disagreement():
    """A 9:1 binary label: two datasets disagree on ~18% of indices by chance, far below 'most', so the threshold is
    half the chance disagreement; a couple of corrected labels stay a relabelling, and its TracIn entries go too."""
    labels = torch.zeros(100, dtype=torch.long)
    labels[:10] = 1
    other = MirroredInfluence()
    other._accumulate(100, torch.arange(100), torch.ones(100), labels)
    with pytest.warns(InterpretationWarning, match="20 of 100 .* the training data changed"):
        other._accumulate(100, torch.arange(100), torch.full((100,), 3.0), labels.roll(50))
    assert float(other._score_count.max()) == 1.0

    fixed = MirroredInfluence()
    fixed._accumulate(100, torch.arange(100), torch.ones(100), labels)
    fixed.self_influence_, fixed.confirmed_ = {3: 2.0, 50: 1.0}, [3]
    relabelled = labels.clone()
    relabelled[[3, 4]] = 0
    with pytest.warns(InterpretationWarning, match="2 of 100 .* relabelled"):
        fixed._accumulate(100, torch.arange(100), torch.full((100,), 3.0), relabelled)
    assert fixed.scores_[3] == 3.0 and fixed.scores_[0] == 2.0
    assert fixed.self_influence_ == {50: 1.0} and fixed.confirmed_ == []
