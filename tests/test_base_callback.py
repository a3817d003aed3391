"""The base callback in real Trainer runs: schedule, no disturbance, alerts, state, reporting, errors."""

import re
import warnings

import pytest
import torch
from conftest import MeanActivation, assert_same_training, make_trainer, read_scalars, read_tags

from lightning_interp import ARMDrift, InterpretationAlert, InterpretationWarning, LayerClusters, MirroredInfluence
from lightning_interp._lightning import ModelCheckpoint
from lightning_interp.capture import LayerSelectionError
from lightning_interp.demo import DigitsCNN
from lightning_interp.probe import ProbeDataError


def test_never_disturbs_training_bit_for_bit(tmp_path):
    """Weights, BatchNorm buffers, optimizer state, RNG streams and module modes are identical with and
    without the callbacks (which run every epoch, with a model-driven coreset)."""
    interp = [
        MeanActivation(probe="train", strict=True),
        MeanActivation(probe="val", probe_size=0.3, probe_selector="kcenter", strict=True),
    ]
    assert_same_training(tmp_path, interp)
    assert all(len(cb.history_) == 3 for cb in interp)


def test_a_schedule_that_never_comes_due_is_named_at_setup(tmp_path, datamodule):
    from lightning_interp import ComponentAttribution, MirroredInfluence

    late = MeanActivation(every_n_epochs=5, strict=True)
    with pytest.warns(InterpretationWarning, match=r"every_n_epochs=5\) never comes due within max_epochs=2"):
        make_trainer(tmp_path, [late, MirroredInfluence(every_n_epochs=2)], max_epochs=2, logger=False).fit(
            DigitsCNN(), datamodule)
    assert late.history_ == []
    def unreachable(trainer) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ComponentAttribution().setup(trainer, DigitsCNN(), "fit")
        return [str(w.message) for w in caught if "never comes due" in str(w.message)]

    # with a ModelCheckpoint it runs at a checkpoint, else on the final model: no warning
    assert unreachable(make_trainer(tmp_path, max_epochs=2, logger=False, enable_checkpointing=True)) == []
    # without one it falls back to the epoch schedule, which a 2-epoch run never reaches
    assert len(unreachable(make_trainer(tmp_path, max_epochs=2, logger=False))) == 1


def test_schedule_scalars_and_histograms_reach_tensorboard(tmp_path, datamodule):
    cb = MeanActivation(every_n_epochs=2, strict=True)
    trainer = make_trainer(tmp_path, [cb], max_epochs=4)
    trainer.fit(DigitsCNN(), datamodule)
    assert [h["epoch"] for h in cb.history_] == [1, 3]
    scalars = read_scalars(tmp_path / "tb")
    assert len(scalars["probe_mean/conv1"]) == 2
    steps = [s for s, _ in scalars["probe_mean/conv1"]]
    assert steps == sorted(steps) and steps[0] > 0
    assert "probe_mean/outputs" in read_tags(tmp_path / "tb")["histograms"]


def test_every_callback_reports_its_coresets_fidelity(tmp_path, datamodule):
    from lightning_interp import ARMDrift, ComponentAttribution, LayerClusters, MirroredInfluence

    callbacks = [
        ARMDrift(probe_size=0.2, strict=True),
        MirroredInfluence(every_n_epochs=1, probe_size=0.2, leak_queries=None, strict=True),
        ComponentAttribution(at_checkpoints=False, every_n_epochs=1, probe_size=12, probe_fidelity=True,
                             n_masks=32, n_eval_masks=8, progress_bar=False, strict=True),
        LayerClusters(every_n_epochs=1, probe_size=128, label_map_images=0, embeddings="none", strict=True),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, callbacks, max_epochs=1).fit(DigitsCNN(), datamodule)
    assert not [w for w in caught if "no fidelity measure" in str(w.message)]
    ranked = [cb for cb in callbacks if not isinstance(cb, MirroredInfluence)]  # per-sample scores: coverage only
    for cb in ranked:
        assert -1.0 <= cb.coreset_["fidelity"]["spearman"] <= 1.0, type(cb).__name__
    assert "fidelity" not in callbacks[1].coreset_ and callbacks[1].coreset_["size"] == len(callbacks[1].probe_)
    scalars = read_scalars(tmp_path / "tb")
    assert {f"{cb.tag}/coreset/spearman" for cb in ranked} <= set(scalars)
    assert {f"{cb.tag}/coreset/size" for cb in callbacks} <= set(scalars)


def test_coreset_probe_is_logged_with_its_fidelity(tmp_path, datamodule):
    cb = MeanActivation(probe="train", probe_size=0.25, probe_selector="kcenter", strict=True)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(DigitsCNN(), datamodule)
    n_train = len(datamodule.splits.y_train)
    assert cb.coreset_["size"] == round(0.25 * n_train) and len(cb.probe_) == cb.coreset_["size"]
    assert -1.0 <= cb.coreset_["fidelity"]["spearman"] <= 1.0
    scalars = read_scalars(tmp_path / "tb")
    assert {"probe_mean/coreset/size", "probe_mean/coreset/spearman"} <= set(scalars)


@pytest.mark.parametrize("action", ["warn", "stop", "raise"])
def test_alert_actions(tmp_path, datamodule, action):
    seen = []
    cb = MeanActivation(threshold=-1.0, alert_action=action, alert_hooks=[seen.append], strict=True)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3)
    if action == "raise":
        with pytest.raises(InterpretationAlert, match="mean activation too large"):
            trainer.fit(DigitsCNN(), datamodule)
        assert len(seen) == 1
        return
    with pytest.warns(InterpretationWarning, match="mean activation too large"):
        trainer.fit(DigitsCNN(), datamodule)
    assert seen and seen[0].source == "MeanActivation" and seen[0].threshold == -1.0
    assert trainer.current_epoch == (1 if action == "stop" else 3)
    assert len(cb.alerts_) == len(seen)
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["alerts/probe_mean"][-1][1] == len(seen)


def test_resume_keeps_history_and_alerts(tmp_path, datamodule):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MeanActivation(threshold=-1.0, probe_size=40, probe_selector="random")
    with pytest.warns(InterpretationWarning):
        make_trainer(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True).fit(DigitsCNN(), datamodule)
    resumed = MeanActivation(threshold=-1.0, probe_size=40, probe_selector="random")
    with pytest.warns(InterpretationWarning):
        make_trainer(tmp_path, [resumed], max_epochs=3).fit(DigitsCNN(), datamodule,
                                                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history_] == [0, 1, 2]
    assert [a.epoch for a in resumed.alerts_][:len(first.alerts_)] == [a.epoch for a in first.alerts_]
    assert torch.equal(resumed.coreset_["indices"], first.coreset_["indices"])  # the same probe after resume


def test_testing_an_earlier_checkpoint_keeps_the_history_of_the_fit(tmp_path, datamodule):
    """Lightning loads callback state in every stage; test(ckpt_path="best") must not rewind the history."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    cb = MeanActivation(threshold=-1.0)
    trainer = make_trainer(tmp_path, [cb, ckpt], max_epochs=3, enable_checkpointing=True)
    with pytest.warns(InterpretationWarning):
        trainer.fit(DigitsCNN(), datamodule)
    alerts = list(cb.alerts_)
    first_epoch = str(tmp_path / "ckpt" / "epoch=0.ckpt")
    trainer.validate(datamodule=datamodule, ckpt_path=first_epoch, verbose=False)
    trainer.test(datamodule=datamodule, ckpt_path=first_epoch, verbose=False)
    assert [h["epoch"] for h in cb.history_] == [0, 1, 2] and cb.alerts_ == alerts
    fresh = MeanActivation(threshold=-1.0)  # one without history of its own takes the checkpoint's
    make_trainer(tmp_path, [fresh]).validate(DigitsCNN(), datamodule=datamodule, ckpt_path=first_epoch,
                                             verbose=False)
    assert [h["epoch"] for h in fresh.history_] == [0]


def test_a_resumed_run_with_other_coreset_settings_chooses_again(tmp_path, datamodule):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MeanActivation(probe_size=40, probe_fidelity=False)
    make_trainer(tmp_path, [first, ckpt], max_epochs=1, enable_checkpointing=True).fit(DigitsCNN(), datamodule)
    resumed = MeanActivation(probe_size=60, probe_selector="kcenter", probe_fidelity=False)
    with pytest.warns(InterpretationWarning, match="chosen with probe_size=40, selector='random'.*now asks for "
                                                   "probe_size=60, selector='kcenter'"):
        make_trainer(tmp_path, [resumed], max_epochs=2).fit(DigitsCNN(), datamodule,
                                                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.coreset_["selector"] == "kcenter" and len(resumed.coreset_["indices"]) == 60
    assert resumed.coreset_["epoch"] == 1


def test_coreset_options_without_a_probe_size_are_named():
    with pytest.warns(InterpretationWarning,
                      match="probe_selector='kcenter', reselect_every_n_epochs=2 only apply to a coreset"):
        MeanActivation(probe_selector="kcenter", reselect_every_n_epochs=2)


def test_weights_only_checkpoints_warn_that_state_is_lost(tmp_path, datamodule):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    with pytest.warns(InterpretationWarning, match="save_weights_only=True"):
        trainer = make_trainer(tmp_path, [MeanActivation(), ckpt], max_epochs=1, enable_checkpointing=True)
        trainer.fit(DigitsCNN(), datamodule)


def test_without_tensorboard_media_go_to_files_after_one_warning(tmp_path, datamodule):
    cb = MeanActivation()
    with pytest.warns(InterpretationWarning, match="no TensorBoardLogger") as record:
        make_trainer(tmp_path, [cb], max_epochs=2, logger=False).fit(DigitsCNN(), datamodule)
    assert sum("no TensorBoardLogger" in str(w.message) for w in record) == 1
    files = {p.name for p in (tmp_path / "lightning_interp_output").iterdir()}
    assert "scalars.csv" in files and any(f.startswith("probe_mean_outputs_step") for f in files)


def test_bad_configuration_fails_fast_with_what_exists(tmp_path, datamodule):
    with pytest.raises(LayerSelectionError, match="available layers: conv1"):
        make_trainer(tmp_path, [MeanActivation(layers=["encoder.*"])]).fit(DigitsCNN(), datamodule)
    for kwargs, match in [
        ({"alert_action": "email"}, "alert_action must be one of"),
        ({"probe": "test"}, "probe must be 'train', 'val'"),
        ({"probe_size": 1.5}, r"fraction must be in \(0, 1\]"),
        ({"probe_size": 0}, "count must be >= 1"),
        ({"probe_selector": "best"}, "probe_selector must be one of"),
        ({"every_n_epochs": -1}, "every_n_epochs"),
        ({"every_n_epochs": 0}, "would never run MeanActivation"),
    ]:
        with pytest.raises(ValueError, match=match):
            MeanActivation(**kwargs)
    with pytest.raises(TypeError, match=r"probe=loader.dataset"):
        MeanActivation(probe=datamodule.val_dataloader())
    with pytest.raises(ValueError, match=r"MeanActivation\(probe_size=5, .*probe_balance=True\) cannot choose its "
                                         r"coreset of 5 from 270 .* each of the 10 classes"):
        make_trainer(tmp_path, [MeanActivation(probe_size=5, probe_balance=True, strict=True)]).fit(DigitsCNN(),
                                                                                                    datamodule)


def _empty_digits():
    from torch.utils.data import TensorDataset

    return TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long))


@pytest.mark.parametrize("build, argument", [
    (lambda: MeanActivation(probe=_empty_digits()), "MeanActivation(probe=...)"),
    (lambda: LayerClusters(probe=_empty_digits()), "LayerClusters(probe=...)"),
    (lambda: ARMDrift(shift_data=_empty_digits()), "ARMDrift(shift_data=...)"),
    (lambda: MirroredInfluence(trusted=_empty_digits()), "MirroredInfluence(trusted=...)"),
    (lambda: MirroredInfluence(leak_queries=_empty_digits()), "MirroredInfluence(leak_queries=...)"),
])
def test_an_empty_dataset_is_named_at_setup(tmp_path, datamodule, build, argument):
    """Before, an empty probe failed at every analysis (one warning, then nothing, for the whole fit)."""
    trainer = make_trainer(tmp_path, [build()], max_epochs=1, logger=False)
    with pytest.raises(ProbeDataError, match=re.escape(argument) + " got an empty TensorDataset"):
        trainer.fit(DigitsCNN(), datamodule)
    assert trainer.global_step == 0  # failed at setup, before any training


def test_a_failing_analysis_warns_once_and_training_continues(tmp_path, datamodule):
    class Broken(MeanActivation):
        def compute(self, trainer, pl_module, probe):
            raise RuntimeError("activations contain NaN")

    cb = Broken()
    with pytest.warns(InterpretationWarning, match="skipped epoch 0: activations contain NaN") as record:
        trainer = make_trainer(tmp_path, [cb], max_epochs=3)
        trainer.fit(DigitsCNN(), datamodule)
    assert trainer.current_epoch == 3
    assert sum("activations contain NaN" in str(w.message) for w in record) == 1
    assert [s["epoch"] for s in cb.skipped_] == [0, 1, 2]  # the later skips are listed, not hidden
    assert cb.skipped_[0]["error"] == "RuntimeError: activations contain NaN"
    with pytest.raises(RuntimeError, match="NaN"):
        make_trainer(tmp_path, [Broken(strict=True)], max_epochs=1).fit(DigitsCNN(), datamodule)


def test_missing_validation_data_is_named(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))), batch_size=16)
    with pytest.raises(ProbeDataError, match=r"MeanActivation\(probe='val'\) needs validation data, but the trainer "
                                             "has none"):  # at setup, also without strict: a configuration error
        make_trainer(tmp_path, [MeanActivation()], max_epochs=1).fit(DigitsCNN(), data)


def test_several_validation_loaders_say_which_one_is_read(tmp_path, datamodule):
    from torch.utils.data import DataLoader, TensorDataset

    class TwoValSets(DigitsCNN):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return super().validation_step(batch, batch_idx)

    cb = MeanActivation(probe="val", strict=True)
    first = datamodule.val_dataloader()
    second = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=8)
    with pytest.warns(InterpretationWarning, match="2 val dataloaders; 'val' here means the first one") as caught:
        make_trainer(tmp_path, [cb], max_epochs=2).fit(TwoValSets(), datamodule.train_dataloader(), [first, second])
    assert sum("val dataloaders" in str(w.message) for w in caught) == 1
    assert len(cb.probe_) == len(first.dataset)


def test_a_failing_write_is_one_warning_and_the_analysis_goes_on(tmp_path, datamodule):
    class FullDisk(MeanActivation):
        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)

            def refuse(*args, **kwargs):
                raise OSError("No space left on device")

            trainer.logger.experiment.add_histogram = refuse

    cb = FullDisk()
    failed_write = r"could not write probe_mean/outputs \(log_histogram\): No space"
    with pytest.warns(InterpretationWarning, match=failed_write) as w:
        make_trainer(tmp_path, [cb], max_epochs=2).fit(DigitsCNN(), datamodule)
    assert sum("could not write" in str(m.message) for m in w) == 1
    assert [h["epoch"] for h in cb.history_] == [0, 1]  # the analyses went on and logged their scalars
    assert "probe_mean/conv1" in read_scalars(tmp_path / "tb")
    with pytest.raises(OSError, match="No space"):
        make_trainer(tmp_path, [FullDisk(strict=True)], max_epochs=1).fit(DigitsCNN(), datamodule)


def test_batch_transfer_hooks_the_probes_skip_are_named_once(tmp_path, datamodule):
    class Normalising(DigitsCNN):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            return (x - 0.5) / 0.5, y

    skipped_hooks = "Normalising.on_after_batch_transfer: lightning_interp's probes .* do not run batch-transfer"
    with pytest.warns(InterpretationWarning, match=skipped_hooks) as w:
        make_trainer(tmp_path, [MeanActivation(), MeanActivation(probe="train")], max_epochs=1).fit(
            Normalising(), datamodule)
    ours = [m for m in w if issubclass(m.category, InterpretationWarning) and "batch_transfer" in str(m.message)]
    assert len(ours) == 1

    def normalised(batch):
        x, y = batch
        return (x - 0.5) / 0.5, y

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*on_after_batch_transfer", category=InterpretationWarning)
        make_trainer(tmp_path, [MeanActivation(batch_to_xy=normalised)], max_epochs=1).fit(Normalising(), datamodule)


def test_batch_hooks_of_a_datamodule_are_named_and_lightning_lookalikes_are_not_lightning():
    from lightning_interp.callbacks.base import overridden_batch_hooks
    from lightning_interp.demo import DigitsDataModule

    class Normalised(DigitsDataModule):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            return batch

    Normalised.__module__ = "lightning_models.data"  # a user package whose name starts like Lightning's
    assert overridden_batch_hooks(DigitsCNN(), Normalised()) == ["Normalised.on_after_batch_transfer"]
    module = DigitsCNN()
    module.transfer_batch_to_device = lambda batch, device, idx: batch  # set on the instance
    assert overridden_batch_hooks(module, None) == ["DigitsCNN.transfer_batch_to_device"]
    assert overridden_batch_hooks(DigitsCNN(), DigitsDataModule()) == []


def test_a_layer_that_never_runs_is_left_out_before_the_coreset_is_chosen(tmp_path, datamodule):
    class WithUnused(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Linear(4, 4)

    cb = MeanActivation(probe_size=50, head="fc2", strict=True)
    with pytest.warns(InterpretationWarning, match=r"leaves out \['unused'\]"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(WithUnused(), datamodule)
    assert cb.coreset_ is not None and cb.coreset_["size"] == 50 and "fidelity" in cb.coreset_
    assert "unused" not in cb.history_[0]


def test_a_layer_called_twice_per_sample_is_left_out_of_the_default_layers(tmp_path, datamodule):
    class Twice(DigitsCNN):  # fc1 applied to two views of each sample (shared weights)
        def forward(self, x):
            h = torch.nn.functional.relu(self.conv1(x))
            h = torch.nn.functional.relu(self.bn2(self.conv2(h)))
            h = torch.nn.functional.max_pool2d(torch.nn.functional.relu(self.conv3(h)), 2).flatten(1)
            both = torch.nn.functional.relu(self.fc1(torch.cat([h, h.flip(1)])))
            return self.fc2(both[: len(x)] + both[len(x):])

    cb = MeanActivation(strict=True)
    with pytest.warns(InterpretationWarning, match=r"leaves out \['fc1'\]: .* more than once per sample"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(Twice(), datamodule)
    assert set(cb.history_[0]) == {"epoch", "conv1", "conv2", "conv3"}


@pytest.mark.parametrize("strict", [False, True])
def test_a_failing_alert_hook_is_one_warning_or_under_strict_the_error(tmp_path, datamodule, strict):
    def broken(alert):
        raise ConnectionError("webhook unreachable")

    cb = MeanActivation(threshold=-1.0, alert_hooks=[broken], strict=strict)
    trainer = make_trainer(tmp_path, [cb], max_epochs=2)
    if strict:
        with pytest.raises(ConnectionError, match="webhook unreachable"):
            trainer.fit(DigitsCNN(), datamodule)
        return
    with pytest.warns(InterpretationWarning, match="alert hook .*broken failed"):
        trainer.fit(DigitsCNN(), datamodule)
    assert trainer.current_epoch == 2 and len(cb.history_) == 2 and len(cb.alerts_) >= 2 and cb.skipped_ == []


def test_a_callback_reused_by_another_trainer_says_its_history_carries_over(tmp_path, datamodule):
    cb = MeanActivation()
    make_trainer(tmp_path / "a", [cb], max_epochs=1).fit(DigitsCNN(), datamodule)
    with pytest.warns(InterpretationWarning, match="history of a fit by another Trainer"):
        make_trainer(tmp_path / "b", [cb], max_epochs=1).fit(DigitsCNN(), datamodule)
    assert len(cb.history_) == 2
    again = MeanActivation()
    trainer = make_trainer(tmp_path / "c", [again], max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InterpretationWarning)
        trainer.fit(DigitsCNN(), datamodule)
        trainer.fit_loop.max_epochs = 4
        trainer.fit(trainer.lightning_module, datamodule)  # the same Trainer going on: no warning
    assert [h["epoch"] for h in again.history_] == [0, 1, 2, 3]


def test_activation_profile_keeps_means_and_stds_apart(monkeypatch):
    """One ranking over means and stds together would agree through their offset alone."""
    from lightning_interp.probe import ProbeOutputs

    cb = MeanActivation()
    acts = torch.randn(50, 6) * torch.arange(1, 7) + 100 * torch.arange(6)
    monkeypatch.setattr(cb, "select_layers", lambda module: {"layer": None})
    monkeypatch.setattr(cb, "forward_probe", lambda *a, **k: ProbeOutputs(torch.zeros(50, 2), None, torch.arange(50),
                                                                          {"layer": acts}))
    profile = cb.activation_profile(None, None, None)
    assert set(profile) == {"layer/mean", "layer/std"}
    assert torch.allclose(profile["layer/mean"], acts.mean(0)) and torch.allclose(profile["layer/std"], acts.std(0))


def test_a_model_error_met_by_the_coreset_fidelity_first_is_one_warning(tmp_path, datamodule):
    """The fidelity measure meets the same error as the analysis it precedes: the user hears of it once."""

    class TupleOutput(DigitsCNN):
        def forward(self, x):
            return super().forward(x), None

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0])[0], batch[1])

        def validation_step(self, batch, batch_idx):
            pass

    cb = MeanActivation(probe_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb], max_epochs=2, logger=False).fit(TupleOutput(), datamodule)
    about = [str(w.message) for w in caught if "returned a tuple" in str(w.message)]
    assert len(about) == 1 and about[0].startswith("MeanActivation skipped epoch 0"), about
    assert [s["epoch"] for s in cb.skipped_] == [0, 1]
