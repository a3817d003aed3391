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

from lightning_interp._lightning import Trainer, TensorBoardLogger  # noqa: E402
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
