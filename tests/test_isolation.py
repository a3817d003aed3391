"""What a callback's forward passes and data reads must leave exactly as they found it, beyond weights and the
global RNG: buffers written in eval mode, tensors that forward pre-hooks recompute, train()/eval() overrides,
``self.log`` in forward, compiled modules, and random generators a dataset holds itself."""

import random

import numpy as np
import torch
import torch.ao.quantization as tq
from conftest import assert_same_training, make_trainer
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, Dataset

from lightning_interp import LayerClusters, MirroredInfluence
from lightning_interp._lightning import Callback, pl
from lightning_interp.demo import DigitsCNN, DigitsDataModule
from lightning_interp.isolation import evaluation_mode, owned_generators, preserved_rng


class CountingBuffer(nn.Module):
    """Writes a buffer on every forward, in eval mode too (as quantization observers do)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


def test_buffers_written_in_eval_mode_are_restored_in_value_and_identity():
    model = nn.Sequential(nn.Linear(3, 3), CountingBuffer())
    counter = model[1].calls
    with evaluation_mode(model):
        model(torch.randn(2, 3))
        model[1].calls = torch.full((), 9.0)  # reassigned, not written in place
        model(torch.randn(2, 3))
    assert model[1].calls is counter and float(counter) == 0.0


def test_quantization_observers_are_left_as_training_set_them():
    model = nn.Sequential(tq.QuantStub(), nn.Linear(4, 4), tq.DeQuantStub())
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    tq.prepare_qat(model, inplace=True)
    model(torch.randn(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with evaluation_mode(model):
        model(10 * torch.randn(8, 4))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed


def test_tensors_recomputed_by_pruning_pre_hooks_are_restored():
    layer = nn.Linear(4, 4)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    layer(torch.randn(1, 4))
    seen_by_training = layer.weight
    with evaluation_mode(layer):
        torch.func.functional_call(layer, {"weight_orig": torch.ones(4, 4)}, (torch.randn(1, 4),))
    assert layer.weight is seen_by_training  # ModelPruning scores getattr(module, "weight")


class SideEffectOnModeSwitch(nn.Linear):
    """Like loralib's Linear: train()/eval() change the weights (merging is not exactly undone in floats)."""

    def train(self, mode=True):
        with torch.no_grad():
            self.weight.mul_(3.0 if not mode else 1 / 3.0)
        return super().train(mode)


def test_modes_are_switched_without_calling_train_or_eval_overrides():
    model = nn.Sequential(SideEffectOnModeSwitch(3, 3), nn.Dropout(0.5))
    weight = model[0].weight.detach().clone()
    with evaluation_mode(model):
        assert not any(m.training for m in model.modules())
    assert torch.equal(model[0].weight, weight) and all(m.training for m in model.modules())


def test_compiled_modules_run_eagerly_so_hooks_see_every_layer():
    inner = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    compiled = torch.compile(inner, backend="eager")
    compiled(torch.randn(2, 3))
    seen = []
    handle = inner[0].register_forward_hook(lambda *_: seen.append(1))
    try:
        with evaluation_mode(compiled):
            compiled(torch.randn(2, 3))
    finally:
        handle.remove()
    assert seen == [1]


class PrivateRNGDataset(Dataset):
    """Augmentation drawn from generators the dataset owns (NumPy, torch, Python), one inside a transform."""

    class Jitter:
        def __init__(self):
            self.generator = torch.Generator().manual_seed(1)

        def __call__(self, x):
            return x + 0.05 * torch.randn(x.shape, generator=self.generator)

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.rng = np.random.default_rng(0)
        self.py_rng = random.Random(2)
        self.transforms = [self.Jitter()]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] * float(self.rng.uniform(0.9, 1.1)) + 0.01 * self.py_rng.random()
        for transform in self.transforms:
            x = transform(x)
        return x, self.y[i]


def test_owned_generators_are_found_through_wrappers_and_transforms():
    data = PrivateRNGDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    wrapped = torch.utils.data.Subset(data, [0, 1])
    found = owned_generators(wrapped)
    assert {type(g) for g in found} == {np.random.Generator, random.Random, torch.Generator}
    states = data.rng.bit_generator.state, data.py_rng.getstate(), data.transforms[0].generator.get_state()
    with preserved_rng(wrapped):
        data[0]
    assert data.rng.bit_generator.state == states[0] and data.py_rng.getstate() == states[1]
    assert torch.equal(data.transforms[0].generator.get_state(), states[2])


class PrivateRNGDigits(DigitsDataModule):
    def train_dataloader(self):
        s = self.splits
        return DataLoader(PrivateRNGDataset(s.x_train, s.y_train), batch_size=128, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


def test_probes_over_a_dataset_with_its_own_generators_leave_its_augmentation_alone(tmp_path):
    callbacks = [LayerClusters(every_n_epochs=1, probe_size=64, max_iter=20, strict=True),
                 MirroredInfluence(every_n_epochs=1, strict=True)]
    assert_same_training(tmp_path, callbacks, epochs=2, datamodule_factory=lambda: PrivateRNGDigits(batch_size=128))
    assert callbacks[0].results_ and callbacks[1].scores_ is not None


class LogsInForward(DigitsCNN):
    """Logs a statistic of its logits from forward() (every call, not only in training)."""

    def forward(self, x):
        logits = super().forward(x)
        if self._trainer is not None and self._current_fx_name is not None:
            self.log("logit_norm", logits.norm(dim=1).mean(), on_step=False, on_epoch=True)
        return logits


class LoggedValues(Callback):
    def __init__(self):
        self.values = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.values.append(float(trainer.callback_metrics["logit_norm"]))


def _logged_logit_norms(tmp_path, callbacks):
    logged = LoggedValues()
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [*callbacks, logged], max_epochs=2)
    trainer.fit(LogsInForward(), DigitsDataModule(batch_size=128, seed=0))
    return logged.values


def test_self_log_in_forward_never_records_a_probe_pass(tmp_path):
    """The logged epoch value is the training batches' mean, with or without the callbacks' passes."""
    callbacks = [MirroredInfluence(every_n_epochs=1, strict=True),
                 LayerClusters(every_n_epochs=1, probe_size=64, max_iter=20, strict=True)]
    assert _logged_logit_norms(tmp_path / "probed", callbacks) == _logged_logit_norms(tmp_path / "plain", [])
    assert callbacks[0].scores_ is not None and callbacks[1].results_
