"""Shared fixtures: the demo data, a tiny trainer factory, TensorBoard event reading, a probe callback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(1)  # tiny models: one thread is faster than two contending ones

from lightning_interp._lightning import Callback, Trainer, TensorBoardLogger, pl  # noqa: E402
from lightning_interp.callbacks.base import InterpretationCallback  # noqa: E402
from lightning_interp.demo import DigitsCNN, DigitsDataModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class MeanActivation(InterpretationCallback):
    """Test double for the base: logs each layer's mean activation over the probe and keeps a history."""

    tag = "probe_mean"

    def __init__(self, threshold: float = float("inf"), **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.history_: list[dict] = []
        self.last_outputs = None

    def compute(self, trainer, pl_module, probe):
        outs = self.forward_probe(trainer, pl_module, probe, self.select_layers(pl_module))
        self.last_outputs = outs
        means = {name: float(act.mean()) for name, act in outs.activations.items()}
        self.history_.append({"epoch": trainer.current_epoch, **means})
        self.reporter.log_scalars({f"{self.tag}/{k}": v for k, v in means.items()})
        self.reporter.log_histogram(f"{self.tag}/outputs", outs.outputs)
        for name, value in means.items():
            if abs(value) > self.threshold:
                self.alert(trainer, f"{self.tag}/{name}", value, self.threshold, "mean activation too large")

    def fidelity_scores(self, trainer, pl_module, probe):
        outs = self.forward_probe(trainer, pl_module, probe, self.select_layers(pl_module))
        return torch.cat([a.mean(0) for a in outs.activations.values()])

    def _extra_state(self):
        return {"history": list(self.history_)}

    def _load_extra_state(self, state):
        self.history_ = list(state.get("history", []))


@pytest.fixture
def datamodule():
    return DigitsDataModule(noise_fraction=0.1, n_leaked=5, batch_size=128, seed=0)


def run_ddp_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<name>`` (a 2-process CPU DDP fit) with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / name), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def make_trainer(tmp_path, callbacks=(), max_epochs: int = 2, logger=True, **kwargs) -> Trainer:
    if logger is True:
        logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    return Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        **kwargs,
    )


@pytest.fixture
def trainer_factory(tmp_path):
    def factory(*args, **kwargs):
        return make_trainer(tmp_path, *args, **kwargs)

    return factory


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for run in mux.Runs():
        acc = mux.GetAccumulator(run)
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def read_tags(logdir) -> dict[str, set[str]]:
    """Tags per kind (scalars, images, histograms, tensors) in the event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    tags: dict[str, set[str]] = {}
    for run in mux.Runs():
        for kind, names in mux.GetAccumulator(run).Tags().items():
            if isinstance(names, (list, tuple)):
                tags.setdefault(kind, set()).update(names)
    return tags


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TensorBoardServer:
    """A real ``tensorboard`` process on 127.0.0.1, stopped on exit."""

    def __init__(self, logdir) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(self.port), "--reload_interval", "1", "--load_fast", "false"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def get(self, path: str, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                    return resp.read()
            except Exception as err:  # not up yet
                last = err
                time.sleep(0.5)
        raise TimeoutError(f"tensorboard did not answer {path}: {last}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def tensorboard_server():
    return TensorBoardServer


class TrainingSnapshot(Callback):
    """Records what the training loop sees: module modes at every batch and the RNG after each epoch."""

    def __init__(self):
        self.modes, self.rng = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(tuple(m.training for m in pl_module.modules()))

    def on_train_epoch_end(self, trainer, pl_module):
        self.rng.append(torch.get_rng_state().clone())


def fit_digits(tmp_path, callbacks, epochs=3, logger=False, datamodule=None):
    pl.seed_everything(7, workers=True)
    model = DigitsCNN()
    model.bn2.eval()  # unusual but legal: a frozen BatchNorm must stay frozen
    trainer = make_trainer(tmp_path, callbacks, max_epochs=epochs, logger=logger)
    trainer.fit(model, datamodule or DigitsDataModule(noise_fraction=0.1, n_leaked=5, batch_size=128, seed=0))
    return model, trainer



def assert_same_training(tmp_path, callbacks, epochs=3, logger=False, datamodule_factory=None):
    """Train with and without ``callbacks``; weights, BatchNorm buffers, optimizer state, RNG streams and the
    modules' train/eval modes seen by the loop must be identical bit for bit. Returns the probed trainer."""
    spy_a, spy_b = TrainingSnapshot(), TrainingSnapshot()
    make_dm = datamodule_factory or (lambda: None)
    plain, t_plain = fit_digits(tmp_path / "plain", [spy_a], epochs, datamodule=make_dm())
    probed, t_probed = fit_digits(tmp_path / "probed", [*callbacks, spy_b], epochs, logger=logger, datamodule=make_dm())
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a, b), f"{name} changed"
    opt_a, opt_b = t_plain.optimizers[0].state_dict(), t_probed.optimizers[0].state_dict()
    for key in opt_a["state"]:
        for field, value in opt_a["state"][key].items():
            assert torch.equal(value, opt_b["state"][key][field]), f"optimizer {key}.{field} changed"
    assert spy_a.modes == spy_b.modes and not probed.bn2.training
    assert len(spy_a.rng) == epochs and all(torch.equal(a, b) for a, b in zip(spy_a.rng, spy_b.rng))
    return t_probed
