"""Real 2-process DDP on CPU: sharded probe work gathered back equals the single-process result."""

import os
import subprocess
import sys

import torch
from conftest import REPO


def test_sharded_probe_gathers_to_the_single_process_result(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "ddp_probe.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=240,
    )
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
    first, second = result["buffers"]
    assert not torch.equal(first, second) and bool((second == 10.0).all())  # rank zero's new values, on every rank
