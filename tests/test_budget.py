"""``max_overhead``: analyses postponed to keep a callback within a share of the fit's wall time."""

import time

import pytest
from conftest import MeanActivation, make_trainer, read_scalars

from lightning_interp import InterpretationWarning
from lightning_interp._lightning import Callback
from lightning_interp.budget import OverheadBudget, within_budget
from lightning_interp.demo import DigitsCNN


def test_the_next_analysis_counts_in_the_wall_time_it_lengthens():
    assert within_budget(spent=0.0, expected=0.0, elapsed=0.0, share=0.05)  # the first always runs
    assert not within_budget(spent=1.0, expected=1.0, elapsed=30.0, share=0.05)  # 2 s > 5% of 31 s
    assert within_budget(spent=1.0, expected=1.0, elapsed=39.0, share=0.05)  # 2 s = 5% of 40 s


def test_a_postponed_analysis_waits_for_the_budget_and_runs_once():
    budget = OverheadBudget(0.1)
    assert budget.decide(0, scheduled=True, allowed=True) is False and budget.due(0, scheduled=True)
    assert budget.decide(1, scheduled=True, allowed=False) is True and not budget.due(1, scheduled=True)
    assert budget.pending and budget.postponed == 1
    assert budget.decide(2, scheduled=False, allowed=True) is False and budget.due(2, scheduled=False)
    assert not budget.pending
    assert budget.decide(3, scheduled=False, allowed=True) is False and not budget.due(3, scheduled=False)
    assert budget.due(9, scheduled=True)  # no decision (outside a fit): the schedule alone


@pytest.mark.parametrize("value", [0, -0.1, 1.5, True, "5%"])
def test_a_budget_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match=r"max_overhead must be a share of the fit's wall time in \(0, 1\]"):
        MeanActivation(max_overhead=value)


class SlowMean(MeanActivation):
    def __init__(self, seconds: float, **kwargs):
        super().__init__(**kwargs)
        self.seconds = seconds

    def compute(self, trainer, pl_module, probe):
        super().compute(trainer, pl_module, probe)
        time.sleep(self.seconds)


class SlowTraining(Callback):
    """Makes each epoch cost ``seconds`` more, as a larger model would."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module):
        time.sleep(self.seconds)


def test_analyses_too_costly_for_the_budget_are_postponed_with_one_warning(tmp_path, datamodule):
    """A 1-s analysis under a 20% budget: after the first, the next needs 9 s of fit, which 5 short epochs never
    reach; every later analysis is postponed, counted and charted, and one warning says so."""
    slow = SlowMean(1.0, max_overhead=0.2, strict=True)
    with pytest.warns(InterpretationWarning, match=r"SlowMean postponed its analysis of epoch 1: .*max_overhead=0.2") \
            as caught:
        make_trainer(tmp_path, [slow], max_epochs=5).fit(DigitsCNN(), datamodule)
    assert sum("postponed" in str(w.message) for w in caught) == 1
    assert [h["epoch"] for h in slow.history_] == [0]
    assert slow.cost_["runs"] == 1 and slow.cost_["postponed"] == 4
    assert [value for _, value in read_scalars(tmp_path / "tb")["probe_mean/cost/postponed"]] == [1, 2, 3, 4]


def test_a_postponed_analysis_runs_once_the_training_has_paid_for_it(tmp_path, datamodule):
    """0.2-s analyses, 0.3-s epochs, a 25% budget: the second analysis waits until the fit is long enough, and the
    schedule thins out rather than stopping."""
    slow = SlowMean(0.2, max_overhead=0.25, strict=True)
    with pytest.warns(InterpretationWarning, match="postponed its analysis"):
        make_trainer(tmp_path, [slow, SlowTraining(0.3)], max_epochs=8, logger=False).fit(DigitsCNN(), datamodule)
    epochs = [h["epoch"] for h in slow.history_]
    assert len(epochs) >= 2 and epochs[0] == 0 and epochs[1] >= 2, epochs
    assert slow.cost_["postponed"] >= 1 and len(epochs) + slow.cost_["postponed"] == 8  # each epoch: ran or postponed


def test_without_a_budget_every_scheduled_analysis_runs(tmp_path, datamodule):
    slow = SlowMean(0.2, strict=True)
    make_trainer(tmp_path, [slow], max_epochs=3, logger=False).fit(DigitsCNN(), datamodule)
    assert [h["epoch"] for h in slow.history_] == [0, 1, 2] and slow.cost_["postponed"] == 0


def test_the_cost_charts_count_postponed_analyses_only_under_a_budget():
    from lightning_interp.report import custom_scalars_layout

    chart = "analyses postponed (max_overhead)"
    assert chart not in custom_scalars_layout([MeanActivation(probe_size=0.5)])["lightning_interp: cost"]
    budgeted = custom_scalars_layout([MeanActivation(probe_size=0.5), MeanActivation(max_overhead=0.1)])
    assert budgeted["lightning_interp: cost"][chart] == ["Multiline", [r"[^/]+/cost/postponed"]]


def test_an_analysis_waiting_for_the_budget_survives_a_resume(tmp_path, datamodule):
    """Epoch 3's analysis is postponed when the checkpoint is written; the resumed fit runs it at its first epoch
    (4, off the every-2 schedule) instead of forgetting it."""
    from lightning_interp._lightning import ModelCheckpoint

    first = SlowMean(1.0, every_n_epochs=2, max_overhead=0.2, strict=True)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.warns(InterpretationWarning, match="postponed"):
        make_trainer(tmp_path, [first, checkpoints], max_epochs=4, logger=False, enable_checkpointing=True).fit(
            DigitsCNN(), datamodule)
    assert [h["epoch"] for h in first.history_] == [1] and first.cost_["postponed"] == 1

    resumed = SlowMean(0.0, every_n_epochs=2, max_overhead=0.2, strict=True)
    make_trainer(tmp_path, [resumed], max_epochs=5, logger=False).fit(
        DigitsCNN(), datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history_] == [1, 4]


def test_the_reference_epoch_of_arm_drift_runs_whatever_the_budget(tmp_path, datamodule):
    """Every later drift is measured from it: postponing it would leave the whole fit without a drift."""
    from lightning_interp import ARMDrift

    arm = ARMDrift(reference=1, max_overhead=0.001, strict=True)
    with pytest.warns(InterpretationWarning, match="postponed"):
        make_trainer(tmp_path, [arm], max_epochs=4, logger=False).fit(DigitsCNN(), datamodule)
    assert arm.reference_epoch_ == 1 and arm.cost_["runs"] == 2 and arm.cost_["postponed"] == 2


def test_arm_drift_refuses_a_budget_with_a_reselected_previous_reference():
    from lightning_interp import ARMDrift

    with pytest.raises(ValueError, match="Use max_overhead or reselect_every_n_epochs, not both"):
        ARMDrift(probe_size=50, reselect_every_n_epochs=5, max_overhead=0.05)
    ARMDrift(probe_size=50, reselect_every_n_epochs=5, max_overhead=0.05, reference="first")  # no conflict there
