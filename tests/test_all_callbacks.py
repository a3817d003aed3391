"""All four callbacks together, each active every epoch: training untouched, every tag family in TensorBoard."""

import pytest
import torch
from conftest import assert_same_training, make_trainer, read_scalars, read_tags
from torch.utils.data import DataLoader, Dataset

from lightning_interp import ARMDrift, ComponentAttribution, LayerClusters, MirroredInfluence
from lightning_interp._lightning import TensorBoardLogger
from lightning_interp.demo import DigitsCNN, DigitsDataModule


def every_epoch_callbacks():
    """All four callbacks, each active every epoch, small enough for a test, strict."""
    return [
        ARMDrift(strict=True),
        MirroredInfluence(every_n_epochs=1, strict=True),
        ComponentAttribution(every_n_epochs=1, at_checkpoints=False, n_masks=60, n_eval_masks=10, probe_size=10,
                             progress_bar=False, strict=True),
        LayerClusters(every_n_epochs=1, probe_size=128, strict=True),
    ]


def test_all_callbacks_leave_training_bit_identical_and_log_everything(tmp_path):
    callbacks = every_epoch_callbacks()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    assert_same_training(tmp_path, callbacks, epochs=3, logger=logger)

    assert [h["epoch"] for h in callbacks[0].history_] == [1, 2]  # "previous" needs a first epoch
    assert callbacks[1].scores_ is not None and callbacks[2].correlation_ is not None
    assert callbacks[3].results_
    scalars = set(read_scalars(tmp_path / "tb"))
    for prefix in ("arm/", "influence/", "components/", "clusters/"):
        assert any(tag.startswith(prefix) for tag in scalars), f"no {prefix} scalars in {sorted(scalars)}"
    tags = read_tags(tmp_path / "tb")
    assert any(t.startswith("clusters/") for t in tags["images"])
    for cb in callbacks:  # each run's wall time and the callback's share of the fit so far, in TensorBoard
        assert cb.cost_["runs"] >= 2 and 0 < cb.cost_["share"] < 1 and cb.cost_["seconds"] > 0, type(cb).__name__
        assert {f"{cb.tag}/cost/seconds", f"{cb.tag}/cost/share"} <= scalars


class NoisyDigits(DigitsDataModule):
    """Training images with random-noise augmentation drawn from the global torch RNG in ``__getitem__``."""

    class Augmented(Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]

    def train_dataloader(self):
        s = self.splits
        return DataLoader(self.Augmented(s.x_train, s.y_train), batch_size=128, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


def test_probes_over_an_augmenting_dataset_leave_the_rng_alone(tmp_path):
    """Reading the training set for probes, thumbnails or labels must not advance the training RNG."""
    callbacks = [
        LayerClusters(every_n_epochs=1, probe="train", probe_size=64, strict=True),
        ComponentAttribution(at_checkpoints=False, every_n_epochs=1, probe="train", n_masks=40, n_eval_masks=8,
                             probe_size=10, progress_bar=False, strict=True),
        MirroredInfluence(every_n_epochs=1, strict=True),
        ARMDrift(probe="train", strict=True),
    ]
    assert_same_training(tmp_path, callbacks, epochs=2, datamodule_factory=lambda: NoisyDigits(batch_size=128))
    assert callbacks[0].results_ and callbacks[1].correlation_ is not None


def test_arm_with_a_reselected_coreset_only_compares_the_same_samples(tmp_path):
    arm = ARMDrift(probe_size=64, reselect_every_n_epochs=2, strict=True)
    make_trainer(tmp_path, [arm], max_epochs=5).fit(DigitsCNN(), DigitsDataModule(batch_size=128))
    # epoch 0: reference; 1: drift; 2: new coreset -> new reference; 3: drift; 4: new coreset again
    assert [r["epoch"] for r in arm.history_] == [1, 3]


def test_true_half_precision_models_are_analysed(tmp_path):
    """precision="bf16-true" keeps float32 data but bf16 weights: every callback must still run (strict)."""
    callbacks = every_epoch_callbacks()
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, precision="bf16-true")
    trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=128))
    assert len(callbacks[0].history_) == 1 and callbacks[1].scores_.isfinite().all()
    assert callbacks[2].correlation_ is not None and callbacks[3].results_


def test_fast_dev_run_runs_the_analyses_once_and_writes_no_files(tmp_path):
    import warnings

    from lightning_interp import InterpretationWarning

    callbacks = every_epoch_callbacks()
    trainer = make_trainer(tmp_path, callbacks, fast_dev_run=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*TensorBoardLogger", category=InterpretationWarning)
        trainer.fit(DigitsCNN(), DigitsDataModule(noise_fraction=0.0, n_leaked=0))
    assert callbacks[1].scores_ is not None and callbacks[2].correlation_ is not None and callbacks[3].results_
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fast_dev_run_runs_callbacks_scheduled_every_tenth_epoch_without_a_schedule_warning(tmp_path):
    import warnings

    callbacks = [MirroredInfluence(), LayerClusters(), ComponentAttribution(n_masks=60, progress_bar=False)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, callbacks, fast_dev_run=True).fit(DigitsCNN(), DigitsDataModule())
    assert [c.cost_["runs"] for c in callbacks] == [1, 1, 1]
    assert not [w for w in caught if "never comes due" in str(w.message)]


class WithAuxiliaryHead(DigitsCNN):
    """An unused auxiliary layer registered after the real output layer ``fc2``."""

    def __init__(self):
        super().__init__()
        self.aux = torch.nn.Linear(64, 4)


def test_head_names_the_output_layer_when_the_last_registered_is_not(tmp_path):
    import pytest

    from lightning_interp import InterpretationWarning, ProbeDataError

    callbacks = [
        ARMDrift(head="fc2", strict=True),
        MirroredInfluence(every_n_epochs=1, head="fc2", strict=True),
        ComponentAttribution(every_n_epochs=1, at_checkpoints=False, n_masks=60, n_eval_masks=10, probe_size=10,
                             progress_bar=False, layers=["conv*", "fc1"], head="fc2", strict=True),
        LayerClusters(every_n_epochs=1, probe_size=128, probe_selector="kcenter", head="fc2", strict=True),
    ]
    with pytest.warns(InterpretationWarning, match=r"leaves out \['aux'\]: layer\(s\) \['aux'\] never ran") as caught:
        make_trainer(tmp_path, callbacks, max_epochs=2).fit(WithAuxiliaryHead(), DigitsDataModule(n_leaked=3))
    assert sum("leaves out" in str(w.message) for w in caught) == 2  # once each for ARMDrift and LayerClusters
    assert set(callbacks[0].history_[-1]["per_layer"]) == {"conv1", "conv2", "conv3", "fc1"}
    assert callbacks[1].scores_ is not None and set(callbacks[3].results_) == {"conv1", "conv2", "conv3", "fc1"}
    assert not any(name.startswith(("fc2", "aux")) for name in callbacks[2].component_names_)

    guessed = MirroredInfluence(every_n_epochs=1, strict=True)  # the guess is 'aux', which never runs
    with pytest.raises(ProbeDataError, match="head was taken to be 'aux'.*head= argument"):
        make_trainer(tmp_path, [guessed], max_epochs=1).fit(WithAuxiliaryHead(), DigitsDataModule(n_leaked=3))
    named = LayerClusters(every_n_epochs=1, layers=["aux"], strict=True)  # named by the user: an error, not a skip
    with pytest.raises(ProbeDataError, match=r"layer\(s\) \['aux'\] never ran"):
        make_trainer(tmp_path, [named], max_epochs=1).fit(WithAuxiliaryHead(), DigitsDataModule())
    with pytest.raises(ValueError, match="head='fc9' is not a module of WithAuxiliaryHead; available layers: conv1"):
        make_trainer(tmp_path, [LayerClusters(head="fc9")], max_epochs=1).fit(WithAuxiliaryHead(), DigitsDataModule())


@pytest.mark.parametrize("order", ["mirrored first", "clusters first"])
def test_callbacks_due_at_one_step_share_one_pass_over_the_training_set(tmp_path, order):
    """MirroredInfluence reads the whole training set, LayerClusters a coreset of it plus the whole set once for
    the coreset's fidelity: whichever runs first records what the other needs, so one pass serves all three."""
    from lightning_interp.callbacks.base import probe_cache

    mirrored = MirroredInfluence(every_n_epochs=1, leak_queries=None, strict=True)
    clusters = LayerClusters(every_n_epochs=1, probe_size=96, label_map_images=0, embeddings="none", strict=True)
    callbacks = [mirrored, clusters] if order == "mirrored first" else [clusters, mirrored]
    model = DigitsCNN()
    make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(
        model, DigitsDataModule(noise_fraction=0.1, n_leaked=0))
    assert probe_cache(model).forward_passes == 1
    assert clusters.coreset_["size"] == 96 and clusters.coreset_["fidelity"] is not None and clusters.results_
    assert int(mirrored.scores_.isfinite().sum()) == len(mirrored.scores_)


def test_a_peer_whose_head_guess_is_wrong_does_not_break_another_callbacks_pass(tmp_path):
    """What a callback due at the same step adds to a shared pass is best effort: MirroredInfluence guesses the
    output head (the last Conv/Linear registered: an unused auxiliary layer here) and fails on its own, while
    LayerClusters, told the real head, analyses as it would alone."""
    from torch import nn

    from lightning_interp.alerts import InterpretationWarning

    class WithAuxiliaryLast(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(64, 5)  # registered last, never called

    clusters = LayerClusters(every_n_epochs=1, probe_size=96, label_map_images=0, embeddings="none", head="fc2")
    mirrored = MirroredInfluence(every_n_epochs=1)
    with pytest.warns(InterpretationWarning, match="MirroredInfluence skipped epoch 0"):
        make_trainer(tmp_path, [clusters, mirrored], max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(
            WithAuxiliaryLast(), DigitsDataModule(noise_fraction=0.1, n_leaked=0))
    assert list(clusters.results_) == ["conv1", "conv2", "conv3", "fc1"] and clusters.skipped_ == []
    assert clusters.coreset_["fidelity"] is not None
    assert mirrored.skipped_ and "aux" in mirrored.skipped_[0]["error"]


@pytest.mark.parametrize("clusters_first", [False, True])
def test_a_coreset_readers_layers_are_not_recorded_for_every_sample_of_a_large_pass(tmp_path, monkeypatch,
                                                                                    clusters_first):
    """Memory: LayerClusters' layers go into a whole-set pass (MirroredInfluence's, or one run for it) only when that
    pass is no larger than the fidelity reference LayerClusters records itself."""
    from lightning_interp.callbacks.base import InterpretationCallback, probe_cache

    monkeypatch.setattr(InterpretationCallback, "fidelity_reference_size", 200)  # the training set has 1,257
    mirrored = MirroredInfluence(every_n_epochs=1, leak_queries=None, strict=True)
    clusters = LayerClusters(every_n_epochs=1, probe_size=96, label_map_images=0, embeddings="none",
                             probe_fidelity=False, strict=True)
    model = DigitsCNN()
    callbacks = [clusters, mirrored] if clusters_first else [mirrored, clusters]
    make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(
        model, DigitsDataModule(noise_fraction=0.1, n_leaked=0))
    passes = [entry for entries in probe_cache(model)._entries.values() for entry, _ in entries]
    assert sorted((len(p.indices), sorted(p.activations)) for p in passes) == [
        (96, ["conv1", "conv2", "conv3", "fc1"]), (1257, [])]


@pytest.mark.parametrize("schedule", [{"check_val_every_n_epoch": 2}, {"limit_val_batches": 0}])
def test_val_loaders_given_to_fit_are_found_before_lightning_first_validates(tmp_path, schedule):
    """Lightning loads val loaders passed to fit() at its first validation; with check_val_every_n_epoch=2 that comes
    after epoch 0's analyses, and with limit_val_batches=0 never. MirroredInfluence used to fail fit() at its start
    and ARMDrift to skip epoch 0, both saying there was no validation data."""
    dm = DigitsDataModule(noise_fraction=0.1, n_leaked=0, batch_size=128, seed=0)
    arm, mirrored = ARMDrift(strict=True), MirroredInfluence(every_n_epochs=2, leak_queries=None, strict=True)
    make_trainer(tmp_path, [arm, mirrored], max_epochs=4, logger=False, limit_train_batches=3, **schedule).fit(
        DigitsCNN(), train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
    assert [r["epoch"] for r in arm.history_] == [1, 2, 3]
    assert mirrored.cost_["runs"] == 2 and len(mirrored.scores_) == len(dm.splits.y_train)


def test_uint8_labels_work_in_every_analysis(tmp_path):
    """Labels stored as uint8 (common for image datasets) once broke the leak search and every ComponentAttribution
    run (index tensors must be int64); they are class indices like any other."""
    from torch.utils.data import TensorDataset

    s = DigitsDataModule(noise_fraction=0.1, n_leaked=5, seed=0).splits
    train = DataLoader(TensorDataset(s.x_train, s.y_train.to(torch.uint8)), batch_size=128, shuffle=True)
    val = DataLoader(TensorDataset(s.x_val, s.y_val.to(torch.uint8)), batch_size=256)
    callbacks = [MirroredInfluence(every_n_epochs=1, strict=True),
                 ComponentAttribution(every_n_epochs=1, at_checkpoints=False, n_masks=40, n_eval_masks=8,
                                      probe_size=10, strict=True, progress_bar=False)]
    make_trainer(tmp_path, callbacks, max_epochs=1, logger=False).fit(DigitsCNN(), train, val)
    assert all(cb.cost_["runs"] == 1 and not cb.skipped_ for cb in callbacks)
    assert len(callbacks[0].scores_) == len(s.y_train)


class BuiltInConfigureModel(DigitsCNN):
    """DigitsCNN whose layers are made in ``configure_model()``, as Lightning recommends for large or sharded models:
    at the callbacks' ``setup`` the module has no layers yet."""

    def __init__(self):
        super().__init__()
        self._later = dict(self.named_children())
        for name in self._later:
            delattr(self, name)

    def configure_model(self):
        for name, module in self._later.items():
            if not hasattr(self, name):
                setattr(self, name, module)


def test_layers_made_in_configure_model_are_found(tmp_path, datamodule):
    callbacks = [ARMDrift(strict=True), MirroredInfluence(every_n_epochs=1, strict=True),
                 LayerClusters(every_n_epochs=1, probe_size=128, strict=True),
                 ComponentAttribution(every_n_epochs=1, at_checkpoints=False, n_masks=40, n_eval_masks=8,
                                      probe_size=10, strict=True, progress_bar=False)]
    make_trainer(tmp_path, callbacks, max_epochs=2, logger=False).fit(BuiltInConfigureModel(), datamodule)
    assert [cb.cost_["runs"] for cb in callbacks] == [2, 2, 2, 2]
    assert set(callbacks[2].results_) == {"conv1", "conv2", "conv3", "fc1"}


def test_training_that_ends_before_the_schedule_still_gets_one_analysis_of_the_final_model(tmp_path, datamodule):
    """max_steps (like EarlyStopping) ends the fit at epoch 2 of a schedule due at epoch 9: each callback analyses
    the final model once, recorded under the last trained epoch, instead of ending the fit without a result."""
    mirrored = MirroredInfluence(strict=True)
    clusters = LayerClusters(probe_size=128, strict=True)
    drift = ARMDrift(every_n_epochs=5, strict=True)
    shift = ARMDrift(every_n_epochs=5, shift_data=datamodule.test_dataset, strict=True)
    trainer = make_trainer(tmp_path, [mirrored, clusters, drift, shift], max_epochs=30, max_steps=25, logger=False)
    trainer.fit(DigitsCNN(), datamodule)
    assert trainer.global_step == 25
    assert [h["epoch"] for h in mirrored.history_] == [2] and len(mirrored.scores_) == len(datamodule.splits.y_train)
    assert {h["epoch"] for h in clusters.history_} == {2} and clusters.cost_["runs"] == 1
    assert drift.cost_["runs"] == 0  # one analysis alone would only set a reference: nothing to report, not run
    assert shift.cost_["runs"] == 1 and shift.reference_epoch_ == 2  # against shift_data it reports the shift

    again = LayerClusters(probe_size=128, strict=True)  # a schedule out of reach of max_epochs was named at setup
    make_trainer(tmp_path, [again], max_epochs=2, logger=False).fit(DigitsCNN(), datamodule)
    assert again.history_ == []


def test_a_resumed_fit_analyses_its_final_model_only_when_its_own_schedule_was_in_reach(tmp_path, datamodule):
    """Resumed after epoch 4 of an every-5 schedule: up to max_epochs=7 the next analysis (epoch 9) is out of reach,
    as in an uninterrupted 7-epoch fit, so nothing more runs; stopped early on the way to 20 epochs, the final
    model is analysed (and a failing final analysis is one skipped_ entry, never an error at the end of training)."""
    from torch.utils.data import Dataset

    from conftest import MeanActivation

    from lightning_interp._lightning import ModelCheckpoint, pl

    class Flaky(Dataset):
        fail = False

        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            if Flaky.fail:
                raise OSError("disk gone")
            return self.x[i], self.y[i]

    s = datamodule.splits

    def fit(max_epochs, callback, folder, resume=False, extra=()):
        checkpoints = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        trainer = make_trainer(tmp_path / folder, [callback, checkpoints, *extra], max_epochs=max_epochs, logger=False,
                               enable_checkpointing=True)
        trainer.fit(DigitsCNN(), datamodule, ckpt_path=str(tmp_path / folder / "last.ckpt") if resume else None)
        return trainer

    first = MeanActivation(every_n_epochs=5)
    fit(5, first, "a")
    resumed = MeanActivation(every_n_epochs=5)
    fit(7, resumed, "a", resume=True)
    assert [h["epoch"] for h in first.history_] == [4] and [h["epoch"] for h in resumed.history_] == [4]

    def flaky_attribution():
        return ComponentAttribution(at_checkpoints=False, every_n_epochs=5, n_masks=8, n_eval_masks=4,
                                    probe=Flaky(s.x_val, s.y_val), progress_bar=False)

    fit(5, flaky_attribution(), "b")
    Flaky.fail = True
    ca = flaky_attribution()
    trainer = fit(20, ca, "b", resume=True, extra=[pl.callbacks.EarlyStopping(monitor="val/loss", min_delta=10.0,
                                                                                     patience=1)])
    assert trainer.current_epoch < 9 and [e["error"].split(":")[0] for e in ca.skipped_] == ["OSError"]
    assert [h["epoch"] for h in ca.history_] == [4]
