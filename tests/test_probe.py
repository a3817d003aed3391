import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lightning_interp.capture import select_layers
from lightning_interp.demo import DigitsCNN
from lightning_interp.probe import (
    ProbeCache,
    ProbeData,
    ProbeDataError,
    UnreadableLayers,
    default_batch_to_xy,
    evaluation_mode,
    run_probe,
)


class DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def test_batch_conventions():
    x, y = torch.randn(4, 3), torch.arange(4)
    assert default_batch_to_xy((x, y))[1] is y
    assert default_batch_to_xy([x])[1] is None
    assert default_batch_to_xy({"pixel_values": x, "labels": y})[0] is x
    assert default_batch_to_xy({"input_ids": y, "attention_mask": y, "labels": y})[0] is y  # text batches
    assert default_batch_to_xy(x)[1] is None
    with pytest.raises(ProbeDataError, match=r"keys \['foo'\].*batch_to_xy"):
        default_batch_to_xy({"foo": x})
    with pytest.raises(ProbeDataError, match="type str"):
        default_batch_to_xy("nope")


def test_evaluation_mode_restores_modes_and_rng_even_on_error():
    model = DigitsCNN().train()
    model.bn2.eval()  # a user's frozen BatchNorm must stay frozen, the rest stays in training mode
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with pytest.raises(RuntimeError):
        with evaluation_mode(model):
            assert not model.training and not torch.is_grad_enabled()
            torch.rand(10), random.random(), np.random.rand()
            raise RuntimeError("inside")
    assert model.training and model.conv1.training and not model.bn2.training
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_run_probe_keys_by_dataset_index_and_matches_a_plain_forward():
    model = DigitsCNN()
    x, y = torch.rand(50, 1, 8, 8), torch.randint(0, 10, (50,))
    idx = torch.tensor([7, 3, 41, 0, 19])
    for dataset in (TensorDataset(x, y), DictDataset(x, y)):
        outs = run_probe(model, ProbeData(dataset, idx, batch_size=2), select_layers(model), features=True)
        assert torch.equal(outs.indices, idx) and torch.equal(outs.labels, y[idx])
        with torch.no_grad():
            model.eval()
            torch.testing.assert_close(outs.outputs, model(x[idx]))
            torch.testing.assert_close(outs.activations["conv1"], model.conv1(x[idx]).mean((2, 3)))
        assert outs.features.shape == (5, 64)
        model.train()


def test_bad_probe_data_is_named():
    with pytest.raises(ProbeDataError, match="empty"):
        ProbeData(TensorDataset(torch.empty(0, 3)))
    with pytest.raises(ProbeDataError, match="outside the dataset of 4"):
        ProbeData(TensorDataset(torch.empty(4, 3)), torch.tensor([4]))
    outs = run_probe(DigitsCNN(), ProbeData(TensorDataset(torch.rand(6, 1, 8, 8))))
    with pytest.raises(ProbeDataError, match="needs class labels.*inputs only"):
        outs.require_class_labels("MirroredInfluence")
    outs = run_probe(DigitsCNN(), ProbeData(TensorDataset(torch.rand(6, 1, 8, 8), torch.rand(6))))
    with pytest.raises(ProbeDataError, match="integer class labels.*regression"):
        outs.require_class_labels("MirroredInfluence")


def test_cache_shares_one_pass_per_step_and_grows_to_the_union_of_layers():
    model = DigitsCNN()
    probe = ProbeData(TensorDataset(torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))))
    cache = ProbeCache()
    a = cache.get(model, probe, {"conv1": model.conv1}, step=0)
    b = cache.get(model, probe, {"conv1": model.conv1}, step=0)
    assert cache.forward_passes == 1 and a.outputs is b.outputs
    c = cache.get(model, probe, {"fc1": model.fc1}, step=0)
    assert cache.forward_passes == 2 and list(c.activations) == ["fc1"]
    cache.get(model, probe, {"conv1": model.conv1, "fc1": model.fc1}, step=0)
    assert cache.forward_passes == 2  # the union was recorded by the second pass
    cache.get(model, probe, {"conv1": model.conv1}, step=1)
    assert cache.forward_passes == 3


def test_cache_serves_a_coreset_from_a_pass_over_more_samples_and_records_the_extra_layers_it_can():
    class WithUnusedLayer(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(3, 3)
            self.fc2 = self._modules.pop("fc2")  # still the last registered: the output head

    model = WithUnusedLayer()
    data = TensorDataset(torch.rand(50, 1, 8, 8), torch.randint(0, 10, (50,)))
    whole, coreset = ProbeData(data, batch_size=16), ProbeData(data, torch.tensor([41, 3, 17, 3]), batch_size=16)
    cache = ProbeCache()
    conv1 = {"conv1": model.conv1}
    extra = {"fc1": model.fc1, "unused": model.unused}  # another reader's layers; one never runs: left out
    full = cache.get(model, whole, conv1, step=0, extra_layers=extra, extra_features=True)
    assert cache.forward_passes == 1 and list(full.activations) == ["conv1"]
    served = cache.get(model, coreset, {"fc1": model.fc1}, step=0, features=True)
    assert cache.forward_passes == 1 and served.indices.tolist() == [41, 3, 17, 3]
    direct = run_probe(model, coreset, {"fc1": model.fc1}, features=True)
    torch.testing.assert_close(served.outputs, direct.outputs)
    torch.testing.assert_close(served.activations["fc1"], direct.activations["fc1"])
    torch.testing.assert_close(served.features, direct.features)
    assert torch.equal(served.labels, direct.labels)
    with pytest.raises(UnreadableLayers, match="unused"):  # asked for by the reader itself: an error, as before
        cache.get(model, coreset, {"unused": model.unused}, step=0)

    cache = ProbeCache()  # the coreset reader comes first and another reader will need the whole set
    first = cache.get(model, coreset, conv1, step=0, covering=whole)
    cache.get(model, whole, conv1, step=0)
    assert cache.forward_passes == 1 and first.indices.tolist() == [41, 3, 17, 3]


def test_a_pass_that_other_readers_additions_break_runs_again_without_them_once_per_step():
    class WithAuxiliaryLast(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(64, 5)  # registered last, never called: a wrong guess of the output head

    model = WithAuxiliaryLast()
    data = TensorDataset(torch.rand(30, 1, 8, 8), torch.randint(0, 10, (30,)))
    cache = ProbeCache()
    whole = cache.get(model, ProbeData(data), {"fc1": model.fc1}, step=0, extra_features=True)
    assert cache.forward_passes == 2 and len(whole.indices) == 30  # the failed attempt counts
    part = ProbeData(data, torch.tensor([2, 9]))
    cache.get(model, part, {"conv1": model.conv1}, step=0, extra_features=True)
    assert cache.forward_passes == 3  # the additions are not tried again at this step
    with pytest.raises(ProbeDataError, match="never called it"):  # the reader's own request still fails clearly
        cache.get(model, part, {"conv1": model.conv1}, step=0, features=True)


def test_cache_is_not_served_after_a_weight_changed_at_the_same_step():
    model = DigitsCNN()
    probe = ProbeData(TensorDataset(torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))))
    cache = ProbeCache()
    before = cache.get(model, probe, {"conv1": model.conv1}, step=0)
    with torch.no_grad():
        model.conv1.weight.zero_()  # e.g. a pruning callback between two readers
    pruned = cache.get(model, probe, {"conv1": model.conv1}, step=0)
    model.conv1.bias.data = torch.zeros_like(model.conv1.bias)  # a .data swap keeps the tensor's version
    swapped = cache.get(model, probe, {"conv1": model.conv1}, step=0)
    assert cache.forward_passes == 3
    assert not torch.equal(before.activations["conv1"], pruned.activations["conv1"])
    assert torch.equal(swapped.activations["conv1"], torch.zeros_like(swapped.activations["conv1"]))


def test_a_forward_that_returns_a_tuple_is_named():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x.mean()

    probe = ProbeData(TensorDataset(torch.rand(6, 4), torch.randint(0, 3, (6,))))
    with pytest.raises(ProbeDataError, match="TwoHeads.forward returned a tuple; .* Return the logits"):
        run_probe(TwoHeads(), probe)


def test_layers_and_heads_that_never_run_are_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.aux = nn.Linear(4, 2)  # registered last, never called

        def forward(self, x):
            return self.fc(x)

    model, probe = Unused(), ProbeData(TensorDataset(torch.rand(6, 4), torch.randint(0, 3, (6,))))
    never_ran = r"layer\(s\) \['aux'\] never ran in Unused.forward.*Layers that ran: \['fc'\]"
    with pytest.raises(ProbeDataError, match=never_ran):
        run_probe(model, probe, {"fc": model.fc, "aux": model.aux})
    with pytest.raises(ProbeDataError, match="head was taken to be 'aux'.*never called it"):
        run_probe(model, probe, features=True)


def test_batches_restore_the_rng_a_random_dataset_consumed():
    class Random(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(3), torch.tensor(i % 2)

    state = torch.get_rng_state()
    list(ProbeData(Random(), batch_size=4).batches())
    assert torch.equal(torch.get_rng_state(), state)


def test_inputs_that_are_not_one_tensor_get_a_message_naming_the_limitation():
    class Tabular(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"num": torch.rand(3), "cat": torch.tensor(i % 2), "label": torch.tensor(i % 3)}

    probe = ProbeData(Tabular(), batch_size=4, batch_to_xy=lambda b: ({"num": b["num"], "cat": b["cat"]}, b["label"]))
    with pytest.raises(ProbeDataError, match="inputs must be one tensor .* returned x of type dict"):
        next(probe.batches())


@pytest.mark.parametrize("stored", [torch.uint8, torch.int16, torch.int32])
def test_integer_labels_of_any_width_or_one_column_become_class_indices(stored):
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    for labels in (y.to(stored), y.to(stored)[:, None]):
        (_, got, _), = ProbeData(TensorDataset(x, labels)).batches()
        assert got.dtype == torch.int64 and torch.equal(got, y)
    (_, got, _), = ProbeData(TensorDataset(x, y == 1)).batches()
    assert got.dtype == torch.int64 and torch.equal(got, (y == 1).long())  # a bool label is class 0 or 1
    floats = torch.rand(6, 1)  # regression or BCE targets stay as they are
    (_, got, _), = ProbeData(TensorDataset(x, floats)).batches()
    assert torch.equal(got, floats)


def test_a_dict_batch_without_a_label_key_names_its_keys_once_read():
    from lightning_interp import InterpretationWarning

    x, y = torch.randn(4, 3), torch.arange(4)
    with pytest.warns(InterpretationWarning, match=r"keys \['cls', 'x'\]: 'x' is read as the input, and none is a"):
        assert default_batch_to_xy({"x": x, "cls": y})[1] is None
    with warnings.catch_warnings():  # once: later batches (and runs that reset the warning filters) are quiet
        warnings.simplefilter("error")
        assert default_batch_to_xy({"cls": y, "x": x})[1] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_batch_to_xy({"x": x})[1] is None  # inputs only: nothing to say
