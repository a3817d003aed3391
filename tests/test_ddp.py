"""Real 2-process DDP on CPU: sharded probe work gathered back equals the single-process result."""


import torch
from conftest import run_ddp_script


def test_sharded_probe_gathers_to_the_single_process_result(tmp_path):
    out = tmp_path / "ddp.pt"
    proc = run_ddp_script("ddp_probe.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["world_size"] == 2
    gathered, single = result["gathered"], result["single"]
    assert torch.equal(gathered.indices, single.indices.sort().values)
    order = torch.argsort(single.indices)
    torch.testing.assert_close(gathered.outputs, single.outputs[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered.features, single.features[order], rtol=1e-5, atol=1e-6)
    assert torch.equal(gathered.labels, single.labels[order])
    for name, act in single.activations.items():
        torch.testing.assert_close(gathered.activations[name], act[order], rtol=1e-5, atol=1e-6)
    assert result["coreset"]["size"] == len(single.indices)
    part, part_single = result["part"]
    assert part.features is None and torch.equal(part.indices, part_single.indices.sort().values)
    torch.testing.assert_close(part.outputs, part_single.outputs[torch.argsort(part_single.indices)])
    first, second = result["buffers"]
    assert not torch.equal(first, second) and bool((second == 10.0).all())  # rank zero's new values, on every rank


def test_an_alert_hook_failing_on_rank_zero_neither_hangs_nor_desynchronises_the_ranks():
    """Hooks run on rank zero only. Its exception used to leave rank zero skipping the rest of the analysis while
    rank one waited in the analysis' next gather (a hang); now both ranks finish, or, with strict=True, both raise."""
    lenient = run_ddp_script("ddp_alert_hook.py", "lenient")
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    assert "rank 0 finished 2 epochs, 2 alerts, 1 hook warnings" in lenient.stdout
    assert "rank 1 finished 2 epochs, 2 alerts, 0 hook warnings" in lenient.stdout

    strict = run_ddp_script("ddp_alert_hook.py", "strict")
    assert strict.returncode != 0
    assert "rank 0 raised ConnectionError: webhook unreachable" in strict.stdout, strict.stderr[-3000:]
    assert "rank 1 raised RuntimeError: AlwaysAlerts: an alert hook failed on global rank zero" in strict.stdout


def test_an_analysis_failing_on_one_rank_is_skipped_on_every_rank_without_a_hang():
    proc = run_ddp_script("ddp_shard_error.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 finished 2 epochs, skipped 2: ['FailedOnAnotherRank']" in proc.stdout, proc.stdout
    assert "rank 1 finished 2 epochs, skipped 2: ['OSError']" in proc.stdout, proc.stdout


def test_a_spawning_strategy_says_the_results_stay_in_the_workers(tmp_path):
    import pytest

    from lightning_interp import ARMDrift, InterpretationWarning
    from lightning_interp._lightning import Trainer
    from lightning_interp.demo import DigitsCNN

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, default_root_dir=tmp_path)
    with pytest.warns(InterpretationWarning, match="start_method='spawn'.*results .* stay empty in this process"):
        ARMDrift().setup(trainer, DigitsCNN(), "fit")


def test_the_overhead_budget_is_decided_once_for_every_rank():
    """Only rank zero's analyses are slow: on its own clock rank one would run every analysis and wait in a gather
    that rank zero never joins. Rank zero decides for both: the first analysis runs, the next three are postponed."""
    proc = run_ddp_script("ddp_budget.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 finished 4 epochs, analysed [0], postponed 3" in proc.stdout, proc.stdout
    assert "rank 1 finished 4 epochs, analysed [0], postponed 3" in proc.stdout, proc.stdout
