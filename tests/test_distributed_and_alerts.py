"""Units of the DDP helpers and the alert policy that the 2-process tests cannot reach cheaply."""

import torch

from lightning_interp.alerts import Alert, AlertPolicy
from lightning_interp.distributed import gather_by_index, shard_positions


class OneProcess:
    world_size = 1


def test_every_rank_gets_work_even_when_the_probe_is_smaller_than_the_world():
    assert shard_positions(5, 1, 2).tolist() == [1, 3]
    assert shard_positions(1, 1, 2).tolist() == [0]  # an idle rank repeats item 0 rather than skip the gather
    rows, idx = gather_by_index(OneProcess(), torch.tensor([[1.0], [7.0], [1.0]]), torch.tensor([4, 9, 4]))
    assert idx.tolist() == [4, 9] and rows.flatten().tolist() == [1.0, 7.0]


def test_alert_hooks_run_on_global_rank_zero_only():
    seen = []
    policy = AlertPolicy("warn", hooks=[seen.append])
    alert = Alert("ARMDrift", "arm/aggregate", 2.0, 1.0, 3, 40, "drift jumped")
    policy.apply(alert, is_global_zero=False)
    assert seen == []
    policy.apply(alert, is_global_zero=True)
    assert seen == [alert]


def test_a_failing_alert_hook_is_recorded_and_reported_once_and_the_other_hooks_still_run():
    import pytest

    from lightning_interp.alerts import InterpretationWarning

    seen = []

    def broken(alert):
        raise ConnectionError("webhook unreachable")

    policy = AlertPolicy("warn", hooks=[broken, seen.append])
    alert = Alert("ARMDrift", "arm/aggregate", 2.0, 1.0, 3, 40, "drift jumped")
    with pytest.warns(InterpretationWarning) as caught:
        policy.apply(alert)
        policy.apply(alert)
    hook_reports = [w for w in caught if "alert hook" in str(w.message)]
    assert len(hook_reports) == 1 and "broken failed on arm/aggregate: ConnectionError" in str(hook_reports[0].message)
    assert seen == [alert, alert] and [type(e) for e in policy.hook_errors] == [ConnectionError, ConnectionError]
