"""ARM: the exact Wasserstein math, ARM on a model, the cost model, and ARMDrift in real Trainer runs."""

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_trainer, read_scalars, read_tags
from scipy.stats import wasserstein_distance
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import ARMDrift, InterpretationAlert, InterpretationWarning
from lightning_interp._lightning import ModelCheckpoint, pl
from lightning_interp.demo import DigitsCNN, DigitsDataModule, load_digits_tensors
from lightning_interp.methods.arm import (
    ARMCostModel,
    aggregate_representation_measure,
    arm_from_activations,
    measure_retraining_costs,
    sort_samples,
    wasserstein_1d,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these small models: on 2 shared cores, 2 OpenMP threads spin ~10x the CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- Wasserstein
@pytest.mark.parametrize("n,m", [(50, 50), (2000, 1500), (7, 5), (1, 9), (13, 39)])
def test_wasserstein_matches_scipy(n, m):
    gen = torch.Generator().manual_seed(n * 100 + m)
    a = torch.randn(n, 16, generator=gen)
    b = torch.randn(m, 16, generator=gen) * torch.linspace(0.5, 3, 16) + torch.linspace(-2, 2, 16)
    b[: m // 2, 3] = b[0, 3]  # ties
    ours = wasserstein_1d(a, b).double().numpy()
    ref = np.array([wasserstein_distance(a[:, u].numpy(), b[:, u].numpy()) for u in range(16)])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_wasserstein_is_symmetric_zero_on_itself_and_sees_pure_location_shifts():
    a = torch.rand(300, 4)
    assert torch.equal(wasserstein_1d(a, a[torch.randperm(300)]), torch.zeros(4))
    torch.testing.assert_close(wasserstein_1d(a, a + 0.7), torch.full((4,), 0.7), atol=1e-6, rtol=0)
    b = torch.randn(120, 4)
    torch.testing.assert_close(wasserstein_1d(a, b), wasserstein_1d(b, a))
    assert wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([3.0])).ndim == 0  # 1-D in, scalar out
    presorted = wasserstein_1d(sort_samples(a), sort_samples(b), assume_sorted=True)
    torch.testing.assert_close(presorted, wasserstein_1d(a, b))


def test_wasserstein_rejects_mismatched_units():
    with pytest.raises(ValueError, match="same number of units, got 3 and 4"):
        wasserstein_1d(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="no samples"):
        wasserstein_1d(torch.zeros(0, 3), torch.zeros(5, 3))


def test_arm_from_activations_pools_conv_maps_and_skips_nonfinite_layers_with_one_warning():
    maps_a, maps_b = torch.randn(40, 3, 4, 4), torch.randn(30, 3, 4, 4) + 1
    dense_a, dense_b = torch.randn(40, 5), torch.randn(30, 5)
    dense_b[3, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"skipped layer\(s\) \['fc'\]") as caught:
        result = arm_from_activations({"conv": maps_a, "fc": dense_a}, {"conv": maps_b, "fc": dense_b})
    assert len(caught) == 1 and result.skipped == ["fc"] and list(result.per_layer) == ["conv"]
    expected = wasserstein_1d(maps_a.mean((2, 3)), maps_b.mean((2, 3))).mean()
    assert result.per_layer["conv"] == pytest.approx(float(expected))
    assert result.aggregate == result.per_layer["conv"]
    with pytest.raises(ValueError, match=r"only in one of them: \['fc'\]"):
        arm_from_activations({"conv": maps_a, "fc": dense_a}, {"conv": maps_b})


# --------------------------------------------------------------------------------------- ARM on a model
@pytest.fixture(scope="module")
def trained():
    """A DigitsCNN trained for a few epochs on clean digits (plain torch, ~2 s)."""
    torch.manual_seed(0)
    s = load_digits_tensors(seed=0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for batch in torch.randperm(len(s.y_train)).split(64):
            loss = F.cross_entropy(model(s.x_train[batch]), s.y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, s


def test_arm_is_zero_on_identical_data_and_excludes_the_head(trained):
    model, s = trained
    result = aggregate_representation_measure(model, s.x_test, s.x_test.clone())
    assert result.aggregate == 0.0
    assert list(result.per_layer) == ["conv1", "conv2", "conv3", "fc1"]  # fc2, the head, is left out


def test_arm_grows_monotonically_with_noise(trained):
    model, s = trained
    noise = torch.randn(s.x_test.shape, generator=torch.Generator().manual_seed(1))
    values = [aggregate_representation_measure(model, s.x_test, s.x_test + sigma * noise).aggregate
              for sigma in (0.0, 0.1, 0.25, 0.5, 1.0)]
    assert values[0] == 0.0
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values


def test_arm_accepts_tensors_datasets_and_loaders_of_different_sizes_and_leaves_the_model_alone(trained):
    model, s = trained
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = s.x_test, s.x_val[:37] + 0.2
    from_tensors = aggregate_representation_measure(model, a, b)
    from_datasets = aggregate_representation_measure(model, TensorDataset(a, s.y_test), TensorDataset(b))
    from_loaders = aggregate_representation_measure(model, DataLoader(TensorDataset(a, s.y_test), batch_size=50),
                                                    DataLoader(TensorDataset(b), batch_size=8, shuffle=True))
    assert from_tensors.aggregate > 0
    assert from_datasets.aggregate == pytest.approx(from_tensors.aggregate, rel=1e-6)
    assert from_loaders.aggregate == pytest.approx(from_tensors.aggregate, rel=1e-6)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    only_conv = aggregate_representation_measure(model, a, b, layers=["conv*"])
    assert list(only_conv.per_layer) == ["conv1", "conv2", "conv3"]
    model.eval()


def test_arm_rejects_different_input_shapes(trained):
    model, s = trained
    with pytest.raises(ValueError, match=r"different input shapes: \(1, 8, 8\) vs \(1, 8, 9\)"):
        aggregate_representation_measure(model, s.x_test, torch.zeros(10, 1, 8, 9))
    with pytest.raises(TypeError, match="Tensor of inputs, a Dataset or a DataLoader"):
        aggregate_representation_measure(model, s.x_test, s.x_test.numpy())


# ------------------------------------------------------------------------------------ retraining cost
def test_cost_model_recovers_a_line_and_drops_missing_costs():
    arm = [0.0, 1.0, 2.0, 3.0, 4.0]
    fitted = ARMCostModel().fit(arm, [1.0, 3.0, None, 7.0, 9.0], target="energy_kwh")
    assert fitted.n_samples_ == 4 and fitted.intercept_ == pytest.approx(1.0)
    assert float(fitted.coef_[0]) == pytest.approx(2.0)
    assert fitted.spearman_ == pytest.approx(1.0)
    torch.testing.assert_close(fitted.predict([5.0, -10.0]), torch.tensor([11.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 pairs with a measured energy_kwh; got 1"):
        ARMCostModel().fit(arm, [None, None, 2.0, None, None], target="energy_kwh")
    with pytest.raises(RuntimeError, match="not fitted"):
        ARMCostModel().predict(1.0)


class FakeMeter:
    def start(self):
        self.started = True

    def stop(self):
        return 0.5, 0.1


def test_measure_retraining_costs_leaves_the_model_untouched_and_never_invents_energy(trained):
    model, s = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    train, test = (s.x_train[:300], s.y_train[:300]), (s.x_test, s.y_test)
    records = measure_retraining_costs(model, train, test, [0.0, 0.8], max_epochs=3, patience=1, tracker="none")
    assert [r.shift for r in records] == [0.0, 0.8]
    assert records[0].arm == 0.0 and records[1].arm > 0 and records[1].accuracy_before < records[0].accuracy_before
    assert records[0].epochs == 0 and records[0].seconds == 0.0
    assert all(r.energy_kwh is None and r.co2_kg is None for r in records)
    assert all(len(r.accuracy_curve) >= 2 for r in records)  # retraining ran for at least one epoch
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    metered = measure_retraining_costs(model, train, test, [0.5], target_accuracy=0.99, max_epochs=1,
                                       tracker=FakeMeter)
    assert (metered[0].energy_kwh, metered[0].co2_kg) == (0.5, 0.1)
    assert metered[0].target_accuracy == 0.99 and not metered[0].reached and metered[0].epochs == 1


@pytest.mark.skipif(importlib.util.find_spec("codecarbon") is not None, reason="codecarbon is installed here")
def test_codecarbon_requested_but_missing_is_a_clear_error(trained):
    model, s = trained
    with pytest.raises(ImportError, match="codecarbon is not installed"):
        measure_retraining_costs(model, (s.x_train, s.y_train), (s.x_test, s.y_test), [0.1], tracker="codecarbon")


# ------------------------------------------------------------------------------------ ARMDrift callback
@pytest.fixture
def dm():
    return DigitsDataModule(noise_fraction=0.0, n_leaked=0, batch_size=128, seed=0)


def _fit(tmp_path, callbacks, dm, epochs=3, freeze_conv1=False):
    pl.seed_everything(3, workers=True)
    model = DigitsCNN()
    model.conv1.requires_grad_(not freeze_conv1)
    make_trainer(tmp_path, callbacks, max_epochs=epochs).fit(model, dm)


def test_references_scalars_heatmap_threshold_alerts_and_settled_layers(tmp_path, dm):
    previous = ARMDrift(settle_tolerance=0.0, settle_epochs=2, strict=True)
    first = ARMDrift(reference="first", threshold=0.0, strict=True)
    fixed = ARMDrift(reference=1, settle_tolerance=1.0, settle_epochs=2, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [previous, first, fixed], dm, epochs=4, freeze_conv1=True)
    assert not [w for w in caught if "reference epoch" in str(w.message)]  # a future reference is no error
    assert sum("representations moved by ARM" in str(w.message) for w in caught) == 3
    assert [(r["epoch"], r["reference_epoch"]) for r in previous.history_] == [(1, 0), (2, 1), (3, 2)]
    assert [(r["epoch"], r["reference_epoch"]) for r in first.history_] == [(1, 0), (2, 0), (3, 0)]
    assert [(r["epoch"], r["reference_epoch"]) for r in fixed.history_] == [(2, 1), (3, 1)]
    record = previous.history_[-1]
    assert set(record["per_layer"]) == {"conv1", "conv2", "conv3", "fc1"}  # the head fc2 is excluded
    assert record["aggregate"] == pytest.approx(np.mean(list(record["per_layer"].values())))
    # drift accumulates against a fixed reference: epoch 3 vs 0 exceeds epoch 1 vs 0
    assert first.history_[-1]["aggregate"] > first.history_[0]["aggregate"] > 0
    assert [a.epoch for a in first.alerts_] == [1, 2, 3] and all(a.metric == "arm/aggregate" for a in first.alerts_)
    assert previous.alerts_ == [] and all(r["per_layer"]["conv1"] == 0.0 for r in previous.history_)
    assert previous.settled_layers_ == ["conv1"]  # frozen: no drift at all; the others still move
    assert fixed.settled_layers_ == ["conv1", "conv2", "conv3", "fc1"]
    scalars = read_scalars(tmp_path / "tb")
    logged = sorted(v for _, v in scalars["arm/aggregate"])
    assert logged == pytest.approx(sorted(r["aggregate"] for cb in (previous, first, fixed) for r in cb.history_))
    assert "arm/layer/fc1" in scalars and "arm/layer/fc2" not in scalars
    tags = read_tags(tmp_path / "tb")
    assert "arm/per_layer" in tags["images"] and "arm/settled_layers/text_summary" in tags["tensors"]


def test_unreached_reference_is_a_clear_message_and_jumps_alert(tmp_path, dm):
    unreached = ARMDrift(reference=5, strict=True)
    jumpy = ARMDrift(probe="train", strict=True)
    jumpy.history_ = [{"epoch": i - 3, "aggregate": 1e-6, "per_layer": {}} for i in range(3)]
    with pytest.warns(InterpretationWarning) as caught:
        _fit(tmp_path, [unreached, jumpy], dm, epochs=2)
    messages = [str(w.message) for w in caught]
    assert sum("reference epoch 5 will never be reached (max_epochs=2" in m for m in messages) == 1
    assert unreached.history_ == [] and unreached.reference_epoch_ is None
    assert len(jumpy.alerts_) == 1 and "running median" in jumpy.alerts_[0].message
    assert jumpy.alerts_[0].threshold == pytest.approx(3.0 * 1e-6)
    with pytest.raises(ValueError, match="not an analysed epoch with every_n_epochs=2"):
        ARMDrift(reference=2, every_n_epochs=2)


def test_shift_data_measures_data_drift(tmp_path, dm):
    x_val = dm.splits.x_val
    noisy = TensorDataset(x_val + 0.5 * torch.randn(x_val.shape, generator=torch.Generator().manual_seed(0)))
    shifted = ARMDrift(shift_data=noisy, shift_threshold=1e9, strict=True)
    same = ARMDrift(shift_data=DataLoader(TensorDataset(x_val.clone())), strict=True)
    _fit(tmp_path, [shifted, same], dm, epochs=2)
    assert shifted.history_[-1]["shift_aggregate"] > 0 and shifted.alerts_ == []
    assert same.history_[-1]["shift_aggregate"] == 0.0  # the probe is the val set itself
    assert len(read_scalars(tmp_path / "tb")["arm/shift/aggregate"]) == 4  # two callbacks x two epochs


def test_nonfinite_layer_skipped_with_one_warning_and_wrong_shift_shape_named(tmp_path, dm):
    model = DigitsCNN()  # fc1 outputs NaN when evaluated (the probe), normally in training
    model.fc1.register_forward_hook(lambda m, i, o: o if m.training else torch.full_like(o, float("nan")))
    nan_layer = ARMDrift(strict=True)
    wrong = ARMDrift(shift_data=TensorDataset(torch.zeros(20, 1, 8, 9)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [nan_layer, wrong], max_epochs=3, logger=False).fit(model, dm)
    messages = [str(w.message) for w in caught]
    assert sum("skips layer 'fc1'" in m for m in messages) == 1
    assert len(nan_layer.history_) == 2
    assert all(set(r["per_layer"]) == {"conv1", "conv2", "conv3"} for r in nan_layer.history_)
    expected = "shift_data inputs have shape (1, 8, 9) but the probe's inputs have shape (1, 8, 8)"
    shape_msgs = [m for m in messages if expected in m]
    assert len(shape_msgs) == 1 and wrong.history_ == []


def test_alert_action_raise(tmp_path, dm):
    with pytest.raises(InterpretationAlert, match="arm/aggregate"):
        _fit(tmp_path, [ARMDrift(threshold=0.0, alert_action="raise")], dm, epochs=2)


def test_resume_keeps_history_and_reference(tmp_path, dm):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ARMDrift(strict=True)
    pl.seed_everything(3)
    make_trainer(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True).fit(DigitsCNN(), dm)
    resumed = ARMDrift(strict=True)
    make_trainer(tmp_path, [resumed], max_epochs=3).fit(DigitsCNN(), dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [(r["epoch"], r["reference_epoch"]) for r in resumed.history_] == [(1, 0), (2, 1)]
    assert resumed.history_[0]["aggregate"] == first.history_[0]["aggregate"]


def test_resume_reading_other_layers_takes_a_new_reference_with_one_warning(tmp_path, dm):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [ARMDrift(reference="first", strict=True), ckpt], max_epochs=2,
                 enable_checkpointing=True).fit(DigitsCNN(), dm)
    resumed = ARMDrift(reference="first", head="fc1", strict=True)  # the head is left out: fc1 out, fc2 in
    with pytest.warns(InterpretationWarning, match=r"reference \(epoch 0\) holds layers \['conv1', 'conv2', 'conv3', "
                                                   r"'fc1'\] but epoch 2 reads \['conv1', 'conv2', 'conv3', 'fc2'\]"):
        make_trainer(tmp_path, [resumed], max_epochs=4).fit(DigitsCNN(), dm,
                                                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [(r["epoch"], r["reference_epoch"]) for r in resumed.history_] == [(1, 0), (3, 2)]


def test_resume_with_other_layers_names_the_settings_whose_history_is_not_restored(tmp_path, dm):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [ARMDrift(layers=["conv1", "conv2"], strict=True), ckpt], max_epochs=2,
                 enable_checkpointing=True).fit(DigitsCNN(), dm)
    resumed = ARMDrift(layers=["conv1"], strict=True)
    with pytest.warns(InterpretationWarning, match=r"saved with other settings \(layers=\['conv1', 'conv2'\] there, "
                                                   r"\['conv1'\] here\).* not restored") as w:
        make_trainer(tmp_path, [resumed], max_epochs=3).fit(DigitsCNN(), dm,
                                                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert sum("saved with other settings" in str(m.message) for m in w) == 1
    assert resumed.history_ == []  # a new history: epoch 2, its first analysis, is only the new reference


@pytest.mark.parametrize("reference, expected", [("first", [(1, 0), (3, 2)]), ("previous", [(1, 0), (3, 2)])])
def test_resume_without_the_reference_says_which_epoch_replaces_it(tmp_path, dm, reference, expected):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ARMDrift(reference=reference, keep_reference_in_checkpoint=False, strict=True)
    make_trainer(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True).fit(DigitsCNN(), dm)
    resumed = ARMDrift(reference=reference, keep_reference_in_checkpoint=False, strict=True)
    with pytest.warns(InterpretationWarning, match="reference activations of epoch .* were not in the checkpoint") as w:
        make_trainer(tmp_path, [resumed], max_epochs=4).fit(DigitsCNN(), dm,
                                                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert sum("were not in the checkpoint" in str(m.message) for m in w) == 1
    assert [(r["epoch"], r["reference_epoch"]) for r in resumed.history_] == expected


def test_resume_from_a_checkpoint_saved_at_validation_end_loses_no_epoch(tmp_path, dm):
    def fit(callback, ckpt_path=None, checkpoint=None):
        pl.seed_everything(3)
        extra = [checkpoint] if checkpoint else []
        make_trainer(tmp_path, [callback, *extra], max_epochs=4, enable_checkpointing=bool(checkpoint)).fit(
            DigitsCNN(), dm, ckpt_path=ckpt_path)
        return callback

    at_validation_end = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_top_k=-1,
                                        save_on_train_epoch_end=False)
    whole = fit(ARMDrift(strict=True), checkpoint=at_validation_end)
    epoch1 = next((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))
    resumed = fit(ARMDrift(strict=True), ckpt_path=str(epoch1))
    assert [r["epoch"] for r in whole.history_] == [1, 2, 3]
    assert [r["epoch"] for r in resumed.history_] == [1, 2, 3]
    # epoch 1 is computed from the checkpoint's weights: the same value up to float32 summation order (the
    # restored reference is stored contiguous); later epochs train on a differently shuffled order after resuming
    assert resumed.history_[0]["aggregate"] == pytest.approx(whole.history_[0]["aggregate"], rel=1e-6)


def test_a_single_analysis_says_no_drift_can_be_reported(tmp_path, dm):
    cb = ARMDrift()
    with pytest.warns(InterpretationWarning, match="only one analysis fits in max_epochs=1"):
        make_trainer(tmp_path, [cb], max_epochs=1, logger=False).fit(DigitsCNN(), dm)
    assert cb.history_ == [] and cb.reference_epoch_ == 0


def test_reselecting_at_every_analysis_with_previous_reference_is_refused():
    with pytest.raises(ValueError, match="reselect_every_n_epochs=1 <= every_n_epochs=1 would never report drift"):
        ARMDrift(probe_size=50, reselect_every_n_epochs=1)
    ARMDrift(probe_size=50, reselect_every_n_epochs=2)
    ARMDrift(probe_size=50, reselect_every_n_epochs=1, reference="first")


def test_activations_of_a_mid_epoch_validation_are_not_reused_after_more_steps(tmp_path, dm):
    from lightning_interp.callbacks.arm import OWN_PASS

    mid_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_top_k=-1,
                                save_on_train_epoch_end=False)
    make_trainer(tmp_path, [ARMDrift(strict=True), mid_epoch], max_epochs=1, val_check_interval=3,
                 enable_checkpointing=True).fit(DigitsCNN(), dm)
    step3 = next((tmp_path / "ckpt").glob("epoch=0-step=3*.ckpt"))
    resumed = ARMDrift(strict=True)
    make_trainer(tmp_path, [resumed], max_epochs=1, val_check_interval=3, limit_val_batches=0).fit(
        DigitsCNN(), dm, ckpt_path=str(step3))
    assert resumed.reference_epoch_ == 0 and list(resumed._references) == [OWN_PASS]  # read at the epoch's end


def test_does_not_disturb_training(tmp_path, dm):
    def weights(callbacks):
        pl.seed_everything(5)
        model = DigitsCNN()
        make_trainer(tmp_path, callbacks, max_epochs=2, logger=False).fit(model, dm)
        return model.state_dict()

    noisy = TensorDataset(dm.splits.x_val + 0.3)
    plain, probed = weights([]), weights([ARMDrift(shift_data=noisy, probe="train", strict=True)])
    assert all(torch.equal(plain[k], probed[k]) for k in plain)


@pytest.mark.parametrize("trainer_kwargs, expect_tap", [({}, True), ({"limit_val_batches": 1}, False)])
def test_reads_the_trainers_validation_pass_instead_of_a_second_forward(tmp_path, dm, trainer_kwargs, expect_tap):
    def run(reuse):
        cb = ARMDrift(reuse_validation=reuse, strict=True)
        own_passes = []
        original = cb.forward_probe
        cb.forward_probe = lambda *a, **k: own_passes.append(1) or original(*a, **k)
        pl.seed_everything(3)
        make_trainer(tmp_path, [cb], max_epochs=3, logger=False, **trainer_kwargs).fit(DigitsCNN(), dm)
        return cb, len(own_passes)

    tapped, tapped_passes = run(True)
    own, own_passes = run(False)
    assert own_passes == 3 and tapped_passes == (0 if expect_tap else 3)  # limit_val_batches=1: a partial pass
    assert len(tapped.history_) == len(own.history_) == 2
    for a, b in zip(tapped.history_, own.history_):
        assert a["per_layer"] == pytest.approx(b["per_layer"], abs=1e-6)
    assert tapped._tap is None and all(not m._forward_hooks for m in tapped.select_layers(DigitsCNN()).values())


def test_validation_pass_and_own_pass_are_never_compared(tmp_path, dm):
    """Inputs normalised in a batch-transfer hook: the validation pass sees them, ARMDrift's own pass does not."""
    from lightning_interp._lightning import Callback

    class Normalising(DigitsCNN):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            return 3 * x - 1, y

    class ShrinkAtEpoch1(Callback):  # listed first: the tap of epoch 1 is stale, so epoch 1 needs the own pass
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.fc1.weight.mul_(0.5)

    def run(reuse, extra=(), **trainer_kwargs):
        cb = ARMDrift(reuse_validation=reuse, strict=True)
        pl.seed_everything(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path, [*extra, cb], max_epochs=3, logger=False, **trainer_kwargs).fit(Normalising(), dm)
        return cb, [str(w.message) for w in caught if "are not compared" in str(w.message)]

    # validation every other epoch: the reference comes from the own pass, so every epoch uses it
    alternating, quiet = run(True, check_val_every_n_epoch=2)
    own, _ = run(False, check_val_every_n_epoch=2)
    assert quiet == [] and [r["epoch"] for r in alternating.history_] == [1, 2]
    for a, b in zip(alternating.history_, own.history_, strict=True):
        assert a["per_layer"] == pytest.approx(b["per_layer"], abs=1e-6)
    # a validation-pass reference and an own-pass epoch cannot be compared: that epoch becomes the reference
    mixed, warned = run(True, extra=[ShrinkAtEpoch1()])
    assert [(r["epoch"], r["reference_epoch"]) for r in mixed.history_] == [(2, 1)]
    assert len(warned) == 1 and "become the new reference" in warned[0]


def test_a_fixed_reference_serves_epochs_without_a_usable_validation_pass(tmp_path, dm):
    """reference="first" taken from the validation pass also keeps its own-pass twin, so epochs whose
    validation pass cannot be used (here: weights swapped back through .data after validation) are compared."""
    from lightning_interp._lightning import Callback

    class SwapAroundValidation(Callback):  # like weight averaging: other weights while validating, via .data
        def on_validation_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch >= 2:
                self.saved = pl_module.fc1.weight.data.clone()
                pl_module.fc1.weight.data.mul_(0.5)

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch >= 2:
                pl_module.fc1.weight.data.copy_(self.saved)

    def run(reuse):
        cb = ARMDrift(reference="first", reuse_validation=reuse, strict=True)
        pl.seed_everything(3)
        make_trainer(tmp_path, [SwapAroundValidation(), cb], max_epochs=4, logger=False).fit(DigitsCNN(), dm)
        return cb

    tapped, own = run(True), run(False)
    assert [r["epoch"] for r in tapped.history_] == [1, 2, 3]
    for a, b in zip(tapped.history_, own.history_, strict=True):  # the swapped validation weights never count
        assert a["per_layer"] == pytest.approx(b["per_layer"], abs=1e-6)


def test_weights_changed_after_validation_are_read_again(tmp_path, dm):
    from lightning_interp._lightning import Callback

    class Shrink(Callback):  # listed first: changes fc1 after validation, before ARMDrift analyses
        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.fc1.weight.mul_(0.5)

    def run(reuse):
        cb = ARMDrift(reuse_validation=reuse, strict=True)
        pl.seed_everything(3)
        make_trainer(tmp_path, [Shrink(), cb], max_epochs=3, logger=False).fit(DigitsCNN(), dm)
        return cb

    tapped, own = run(True), run(False)
    for a, b in zip(tapped.history_, own.history_, strict=True):
        assert a["per_layer"] == pytest.approx(b["per_layer"], abs=1e-6)


def test_constructor_validation():
    with pytest.raises(ValueError, match="reference must be 'previous', 'first' or an epoch number"):
        ARMDrift(reference="last")
    with pytest.raises(ValueError, match="jump_factor must be > 1"):
        ARMDrift(jump_factor=0.5)
    with pytest.raises(TypeError, match="shift_data must be a Dataset"):
        ARMDrift(shift_data=torch.zeros(3))
