"""COAR: component enumeration, hook ablation, batched masks, the fit, baselines, editing and the callback."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.methods import coar as C


class ConvNet(nn.Module):
    """Conv (with bias) -> BatchNorm -> Conv -> Linear -> head: the demo's layout in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc1 = nn.Linear(5 * 16, 7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class AttentionNet(nn.Module):
    def __init__(self, batch_first: bool = True, kdim: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.key_embed = nn.Linear(3, kdim or 8)
        self.head = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        q, k = self.embed(x), self.key_embed(x)
        if not self.batch_first:
            q, k = q.transpose(0, 1), k.transpose(0, 1)
        out, _ = self.attn(q, k, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


def _trained_bn(model: ConvNet) -> ConvNet:
    with torch.no_grad():  # non-trivial BN statistics, so "zero the conv" differs from "zero after BN"
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-1, 1)
        model.conv1.bias.uniform_(-1, 1)
    return model.eval()


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return _trained_bn(ConvNet())


def _zero_rows(model: nn.Module, components: C.Components, ablated: torch.Tensor) -> nn.Module:
    """Reference ablation written independently of the library: zero weight AND bias rows / head columns."""
    edited = copy.deepcopy(model)
    names = components.names
    with torch.no_grad():
        for i in ablated.tolist():
            module_name, index = names[i].rsplit("[", 1)
            index = int(index[:-1])
            if module_name.endswith(".head"):
                mha = edited.get_submodule(module_name[: -len(".head")])
                d = mha.head_dim
                mha.out_proj.weight[:, index * d : (index + 1) * d] = 0
            else:
                module = edited.get_submodule(module_name)
                module.weight[index] = 0
                module.bias[index] = 0
    return edited


# ------------------------------------------------------------------------------------------ enumeration


def test_components_are_named_per_channel_neuron_and_head(convnet):
    comps = C.find_components(convnet)
    assert [g.name for g in comps.groups] == ["conv1", "conv2", "fc1"]  # head fc2 excluded
    assert len(comps) == 6 + 5 + 7
    assert comps.names[6] == "conv2[0]" and comps.names[-1] == "fc1[6]"
    only_convs = C.find_components(convnet, layer_types=["conv"])
    assert len(only_convs) == 11
    globbed = C.find_components(convnet, include=["conv*"])
    assert [g.name for g in globbed.groups] == ["conv1", "conv2"]
    attention = C.find_components(AttentionNet(), layer_types=["attention"])
    assert attention.names == [f"attn.head[{h}]" for h in range(4)]  # out_proj is not a separate layer


def test_no_eligible_component_names_the_layers_found():
    model = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(4, 2))  # the only Linear is the head
    with pytest.raises(C.AblationError, match=r"Available layers: 0 \(Flatten\), 1 \(ReLU\), 2 \(Linear\)"):
        C.find_components(model)
    with pytest.raises(C.AblationError, match=r"matching \['bn'\].*Available layers: .*conv1 \(Conv2d\)"):
        C.find_components(ConvNet(), include=["bn"])
    with pytest.raises(ValueError, match="layer_types"):
        C.find_components(ConvNet(), layer_types=["lstm"])


# -------------------------------------------------------------------------------------------- ablation


def test_hook_ablation_equals_zeroing_weight_and_bias_rows(convnet):
    comps = C.find_components(convnet)
    x = torch.randn(5, 1, 8, 8)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        keep = C.sample_keep_masks(1, len(comps), 0.3, gen)[0]
        ablated = (~keep).nonzero().flatten()
        with torch.no_grad(), C.ablate(convnet, comps, keep.float()):
            hooked = convnet(x)
        by_hand = _zero_rows(convnet, comps, ablated)(x)
        assert torch.allclose(hooked, by_hand, atol=1e-5)
        assert torch.allclose(C.ablated_copy(convnet, comps, ablated)(x), by_hand, atol=1e-5)
    # ablation zeroes the channel the BN reads; zeroing the weight alone would leave the bias there
    weight_only = copy.deepcopy(convnet)
    with torch.no_grad():
        weight_only.conv1.weight[0] = 0
        with C.ablate(convnet, comps, (torch.arange(len(comps)) != 0).float()):
            assert torch.all(convnet.conv1(x)[:, 0] == 0)
        assert torch.allclose(weight_only.conv1(x)[:, 0], convnet.conv1.bias[0].expand(5, 8, 8))
        assert convnet.conv1.bias[0].abs() > 1e-3


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_ablation_equals_zeroing_the_heads_out_proj_columns(batch_first):
    torch.manual_seed(0)
    model = AttentionNet(batch_first=batch_first, kdim=6).eval()
    comps = C.find_components(model, layer_types=["attention"])
    x = torch.randn(3, 5, 3)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    with torch.no_grad():
        reference = model(x, attn_mask=causal, key_padding_mask=padding)
        with C.ablate(model, comps, torch.ones(len(comps))):  # the recomputation reproduces the module
            assert torch.allclose(model(x, attn_mask=causal, key_padding_mask=padding), reference, atol=1e-5)
        keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
        with C.ablate(model, comps, keep):
            hooked = model(x, attn_mask=causal, key_padding_mask=padding)
        by_hand = _zero_rows(model, comps, torch.tensor([1, 3]))(x, attn_mask=causal, key_padding_mask=padding)
    assert torch.allclose(hooked, by_hand, atol=1e-5)
    assert not torch.allclose(hooked, reference, atol=1e-3)


def test_batched_masks_equal_one_by_one_and_chunking_changes_nothing(convnet):
    comps = C.find_components(convnet)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    masks = C.sample_keep_masks(9, len(comps), 0.2, torch.Generator().manual_seed(2))
    batched = C.margins_under_masks(convnet, comps, x, y, masks)
    with torch.no_grad():
        one_by_one = torch.stack(
            [C.margins(C.ablated_copy(convnet, comps, (~m).nonzero().flatten())(x), y) for m in masks])
    assert batched.shape == (9, 6)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    # a budget of 4 rows per forward pass: examples and masks are both chunked, same numbers
    assert torch.allclose(C.margins_under_masks(convnet, comps, x, y, masks, max_batch_size=4), batched, atol=1e-5)


class SequenceFirstClassifier(nn.Module):
    """Tokens [N, T, D] through a transformer layer built with batch_first=False, mean-pooled, then a head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x.transpose(0, 1)).mean(0))


def test_layers_inside_a_sequence_first_transformer_are_ablated_per_sample():
    torch.manual_seed(0)
    model = SequenceFirstClassifier().eval()
    comps = C.find_components(model, include=["encoder.linear*"])
    x, y = torch.randn(4, 4, 8), torch.randint(0, 3, (4,))  # as many positions as samples: shapes alone can't tell
    masks = C.sample_keep_masks(4, len(comps), 0.3, torch.Generator().manual_seed(1))
    batched = C.margins_under_masks(model, comps, x, y, masks)
    with torch.no_grad():
        one_by_one = torch.stack(
            [C.margins(C.ablated_copy(model, comps, (~m).nonzero().flatten())(x), y) for m in masks])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_ablation_leaves_the_model_untouched_even_when_the_forward_fails(convnet):
    comps = C.find_components(convnet)
    convnet.train()
    before = {k: v.clone() for k, v in convnet.state_dict().items()}
    with pytest.raises(C.AblationError, match="not a multiple"):
        with C.ablate(convnet, comps, torch.ones(3, len(comps))):
            convnet(torch.randn(4, 1, 8, 8))  # 4 rows cannot carry 3 masks
    assert all(not m._forward_hooks for m in convnet.modules())
    C.margins_under_masks(convnet, comps, torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long),
                          torch.ones(2, len(comps), dtype=torch.bool))
    assert convnet.training and all(m.training for m in convnet.modules())
    assert all(torch.equal(before[k], v) for k, v in convnet.state_dict().items())  # BN stats too


# ------------------------------------------------------------------------------------------------ fit


def _two_class_linear(n_hidden: int = 6):
    """x -> Linear (the components) -> 2-class head, no nonlinearity: the margin is exactly linear in keep."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, n_hidden), nn.Linear(n_hidden, 2)).eval()
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with torch.no_grad():
        hidden = model[0](x)
        direction = model[1].weight[y] - model[1].weight[1 - y]  # [n, hidden]
    return model, x, y, direction * hidden


def test_fit_recovers_exact_linear_attributions_and_baselines_agree():
    model, x, y, truth = _two_class_linear()
    comps = C.find_components(model)
    weights, bias = C.fit_attributions(model, comps, x, y, n_masks=200, alpha=0.3, max_batch_size=64)
    assert torch.allclose(weights, truth, atol=1e-4)
    loo_w, _ = C.leave_one_out_attributions(model, comps, x, y)
    gxp_w, _ = C.grad_times_param_attributions(model, comps, x, y)
    assert torch.allclose(loo_w, truth, atol=1e-4) and torch.allclose(gxp_w, truth, atol=1e-4)
    corr = C.heldout_correlation(model, comps, x, y, {"coar": (weights, bias)}, n_masks=50, alpha=0.3)["coar"]
    assert corr.min() > 0.9999


def test_grad_times_param_sums_gradient_times_weight_and_bias_of_the_component(convnet):
    comps = C.find_components(convnet)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    weights, _ = C.grad_times_param_attributions(convnet, comps, x, y, max_batch_size=2)
    for i in range(3):
        convnet.zero_grad()
        C.margins(convnet(x[i : i + 1]), y[i : i + 1]).sum().backward()
        conv = convnet.conv2
        per_channel = (conv.weight.grad * conv.weight).flatten(1).sum(1) + conv.bias.grad * conv.bias
        assert torch.allclose(weights[i, 6:11], per_channel.detach(), atol=1e-5)


def test_coar_beats_baselines_on_a_nonlinear_model():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    coar = C.COAR(alpha=0.2, n_masks=600, seed=0).fit(model, x, y)
    assert coar.attributions_.shape == (16, 24) and coar.component_names_[12] == "2[0]"
    score = coar.score(model, x, y, n_masks=200)
    comps = coar.components_
    base = C.heldout_correlation(
        model, comps, x, y,
        {"loo": C.leave_one_out_attributions(model, comps, x, y),
         "gxp": C.grad_times_param_attributions(model, comps, x, y)},
        n_masks=200, alpha=0.2, seed=1,
    )
    assert score > 0.8
    assert score > float(base["loo"].nanmean()) and score > float(base["gxp"].nanmean())


def test_bad_alpha_and_budgets_are_rejected_clearly(convnet):
    comps = C.find_components(convnet)
    x, y = torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha .* \(0, 1\)"):
            C.COAR(alpha=alpha)
        with pytest.raises(ValueError, match="alpha"):
            C.fit_attributions(convnet, comps, x, y, n_masks=10, alpha=alpha)
    with pytest.raises(ValueError, match="max_batch_size"):
        C.fit_attributions(convnet, comps, x, y, n_masks=10, max_batch_size=0)
    # far more masks than the budget allows in one pass: chunked (1 row per forward), same fit
    small = C.fit_attributions(convnet, comps, x, y, n_masks=40, alpha=0.2, max_batch_size=1)
    large = C.fit_attributions(convnet, comps, x, y, n_masks=40, alpha=0.2, max_batch_size=10_000)
    assert torch.allclose(small[0], large[0], atol=1e-3) and torch.allclose(small[1], large[1], atol=1e-3)


# ---------------------------------------------------------------------------------------------- edit


def test_welch_t_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    target, reference = torch.randn(5, 3, generator=gen) + 1, torch.randn(9, 3, generator=gen)
    expected = scipy_stats.ttest_ind(target.numpy(), reference.numpy(), equal_var=False).statistic
    assert torch.allclose(C.welch_t(target, reference), torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_edit_fixes_a_target_and_returns_a_copy():
    model, x, y, truth = _two_class_linear(n_hidden=8)
    model_margins = truth.sum(1) + (model[1].bias[y] - model[1].bias[1 - y]).detach()
    wrong = (model_margins < 0).nonzero().flatten()
    assert len(wrong) > 0
    target = wrong[:1]
    reference = torch.tensor([i for i in range(len(x)) if i != int(target)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comps = C.find_components(model)
    result = C.edit(model, comps, truth, x, y, target, reference, max_components=8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert result.model is not model and len(result.ablated) == len(result.ablated_index) >= 1
    assert result.target_margins_before.item() < 0
    with torch.no_grad():
        edited_margin = C.margins(result.model(x[target]), y[target])
    assert result.fixed and edited_margin.item() > 0
    assert torch.allclose(edited_margin, result.target_margins_after, atol=1e-5)
    # the first ablated component is the one with the most negative Welch t
    assert int(result.ablated_index[0]) == int(result.scores.argmin())


def test_copy_model_detaches_the_trainer_reference():
    from lightning_interp.demo import DigitsCNN

    model = DigitsCNN()
    sentinel = object()
    model._trainer = sentinel
    twin = C.copy_model(model)
    assert model._trainer is sentinel and twin._trainer is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


# ------------------------------------------------------------------------------------------ callback


def _fit_demo(tmp_path, callbacks, max_epochs=2, checkpoint=True):
    from conftest import make_trainer


    from lightning_interp._lightning import ModelCheckpoint
    from lightning_interp.demo import DigitsCNN, DigitsDataModule

    torch.manual_seed(0)
    extra = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)] if checkpoint else []
    trainer = make_trainer(
        tmp_path, [*callbacks, *extra], max_epochs=max_epochs, enable_checkpointing=checkpoint, limit_train_batches=2,
        limit_val_batches=1,
    )
    model = DigitsCNN()
    trainer.fit(model, DigitsDataModule(noise_fraction=0.0, n_leaked=0, batch_size=128))
    return model


def _small_callback(**kwargs):
    from lightning_interp import ComponentAttribution

    kwargs.setdefault("every_n_epochs", 1)
    return ComponentAttribution(layers=["conv1", "fc1"], n_masks=120, n_eval_masks=20, probe_size=10, strict=True,
                                **kwargs)


def test_callback_at_checkpoints_logs_saves_alerts_and_leaves_training_alone(tmp_path):
    from conftest import read_scalars, read_tags

    from lightning_interp.alerts import InterpretationWarning

    callback = _small_callback(min_correlation=0.999, dominance_threshold=0.01, every_n_epochs=2)
    with pytest.warns(InterpretationWarning, match="depends on a single component"):
        with_callback = _fit_demo(tmp_path / "a", [callback], max_epochs=4)
    without = _fit_demo(tmp_path / "b", [], max_epochs=4)
    assert all(torch.equal(a, b) for a, b in zip(with_callback.state_dict().values(), without.state_dict().values()))

    assert callback.attributions_.shape == (10, 16 + 64) and callback.component_names_[16] == "fc1[0]"
    assert -1 <= callback.correlation_ <= 1
    assert [h["epoch"] for h in callback.history_] == [1, 3]  # a checkpoint every epoch, a run every 2
    ckpts = sorted((tmp_path / "a" / "ckpt").glob("*.ckpt"))
    saved = sorted((tmp_path / "a" / "ckpt").glob("*.components.pt"))
    assert len(ckpts) == 4
    analysed = [c for c in ckpts if "epoch=1" in c.name or "epoch=3" in c.name]
    assert [p.name for p in saved] == [c.name.replace(".ckpt", ".components.pt") for c in analysed]
    record = torch.load(saved[-1])
    assert torch.equal(record["attributions"], callback.attributions_)
    assert record["component_names"] == callback.component_names_ and record["epoch"] == 3
    assert torch.equal(record["dataset_indices"], callback.probe_indices_)
    # the state saved inside the checkpoint already holds this run
    state = torch.load(ckpts[-1], weights_only=False)["callbacks"][callback.state_key]
    assert len(state["history"]) == 2

    tags = read_tags(tmp_path / "a")
    assert {"components/correlation", "components/dominance_max"} <= tags["scalars"]
    assert "components/class_heatmap" in tags["images"]
    assert any(t.startswith("components/top_per_class") for t in tags["tensors"])
    assert len(read_scalars(tmp_path / "a")["components/correlation"]) == 2
    metrics = {a.metric for a in callback.alerts_}
    assert metrics == {"components/correlation", "components/dominance"}


def test_attribution_files_go_with_the_checkpoints_modelcheckpoint_deletes(tmp_path):
    from conftest import make_trainer

    from lightning_interp._lightning import ModelCheckpoint
    from lightning_interp.demo import DigitsCNN, DigitsDataModule

    callback = _small_callback(every_n_epochs=1)
    keep_one = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=1, monitor="step", mode="max")
    trainer = make_trainer(tmp_path, [callback, keep_one], max_epochs=3, enable_checkpointing=True,
                           limit_train_batches=2, limit_val_batches=1)
    user_file = tmp_path / "ckpt" / "notes.components.pt"  # not ours: never touched
    user_file.parent.mkdir(parents=True)
    user_file.write_text("mine")
    trainer.fit(DigitsCNN(), DigitsDataModule(noise_fraction=0.0, n_leaked=0, batch_size=128))

    assert len(callback.history_) == 3 and len(callback.history_[0]["files"]) == 1
    ckpts = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [c.name for c in ckpts] == ["epoch=2-step=6.ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.components.pt")) == [
        "epoch=2-step=6.components.pt", "notes.components.pt"]
    assert user_file.read_text() == "mine"


def test_callback_without_checkpoints_runs_every_n_epochs_and_restores_state(tmp_path):
    from lightning_interp.alerts import InterpretationWarning

    callback = _small_callback()
    with pytest.warns(InterpretationWarning, match="no ModelCheckpoint"):
        _fit_demo(tmp_path, [callback], max_epochs=1, checkpoint=False)
    files = list((tmp_path / "tb" / "version_0" / "component_attributions").glob("*.components.pt"))
    assert [f.name for f in files] == [f"epoch=0-step={callback.history_[0]['step']}.components.pt"]
    assert callback.history_[0]["step"] > 0 and callback.history_[0]["files"] == [str(files[0])]
    restored = _small_callback()
    restored.load_state_dict(callback.state_dict())
    assert restored.history_ == callback.history_


def test_callback_rejects_bad_configuration():
    from lightning_interp import ComponentAttribution

    for bad in ({"alpha": 0.0}, {"alpha": 1.2}, {"layer_types": ["rnn"]}, {"n_masks": 1}, {"every_n_epochs": 0}):
        with pytest.raises(ValueError):
            ComponentAttribution(**bad)
    with pytest.raises(C.AblationError, match="Available layers"):
        ComponentAttribution()._check_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(C.AblationError, match=r"\['Lin1'\] matched no .* Eligible layers: \['0', '2'\]"):
        ComponentAttribution(layers=["Lin1", "2"])._check_layers(model)  # one misspelt name among good ones


def test_final_model_is_analysed_when_no_checkpoint_came_due(tmp_path):
    """A ModelCheckpoint that never saves within the run must not leave the user without attributions."""
    from conftest import make_trainer

    from lightning_interp import ComponentAttribution

    from lightning_interp._lightning import ModelCheckpoint
    from lightning_interp.demo import DigitsCNN, DigitsDataModule

    cb = ComponentAttribution(every_n_epochs=1, n_masks=60, n_eval_masks=10, probe_size=10, progress_bar=False,
                              strict=True)
    never = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=100)
    trainer = make_trainer(tmp_path, [cb, never], max_epochs=2, enable_checkpointing=True)
    trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=128))
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("*.ckpt"))
    assert cb.correlation_ is not None and len(cb.history_) == 1
    assert cb.history_[0]["epoch"] == cb.coreset_["epoch"] == 1  # the last epoch trained, not Lightning's count of 2
    files = list((tmp_path / "tb" / "version_0" / "component_attributions").glob("*.components.pt"))
    assert [f.name.split("-")[0] for f in files] == ["epoch=1"]
    assert torch.load(files[0], weights_only=False)["attributions"].shape[1] == len(cb.component_names_)


def test_weights_only_checkpoints_fall_back_to_the_epoch_schedule(tmp_path):
    """Lightning never calls on_save_checkpoint for weights-only saves: say so and run on the epoch schedule."""
    from conftest import make_trainer

    from lightning_interp import ComponentAttribution, InterpretationWarning
    from lightning_interp._lightning import ModelCheckpoint
    from lightning_interp.demo import DigitsCNN, DigitsDataModule

    cb = ComponentAttribution(every_n_epochs=1, n_masks=40, n_eval_masks=8, probe_size=10, progress_bar=False,
                              strict=True)
    weights_only = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    with pytest.warns(InterpretationWarning, match="only weights-only ModelCheckpoints"):
        make_trainer(tmp_path, [cb, weights_only], max_epochs=2, enable_checkpointing=True).fit(
            DigitsCNN(), DigitsDataModule(batch_size=128))
    assert [r["epoch"] for r in cb.history_] == [0, 1]


def test_modules_forward_never_calls_are_left_out_of_the_default_components(tmp_path):
    """An unused (auxiliary) module would get attributions fitted to noise: left out with one warning by default,
    an error when the user names it."""
    from conftest import make_trainer

    from lightning_interp import ComponentAttribution
    from lightning_interp.alerts import InterpretationWarning
    from lightning_interp.demo import DigitsCNN, DigitsDataModule

    class WithAuxiliaryHead(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(64, 5)  # registered before the head, never called by forward()
            self.fc2 = self._modules.pop("fc2")  # the output layer stays the last one registered

    components = C.find_components(WithAuxiliaryHead())
    assert "aux" in [g.name for g in components.groups]
    assert C.silent_modules(WithAuxiliaryHead(), components, torch.randn(2, 1, 8, 8)) == ["aux"]
    assert [g.name for g in components.without(["aux"]).groups] == ["conv1", "conv2", "conv3", "fc1"]
    assert len(components.without(["aux"])) == len(components) - 5

    def fit(callback):
        trainer = make_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
        trainer.fit(WithAuxiliaryHead(), DigitsDataModule(noise_fraction=0.0, n_leaked=0, batch_size=128))

    default = ComponentAttribution(n_masks=40, n_eval_masks=10, probe_size=10, strict=True, every_n_epochs=1)
    with pytest.warns(InterpretationWarning, match=r"leaves out \['aux'\]"):
        fit(default)
    assert not any(name.startswith("aux") for name in default.component_names_)
    assert default.attributions_.shape[1] == 16 + 32 + 32 + 64

    named = ComponentAttribution(layers=["fc1", "aux"], n_masks=40, n_eval_masks=10, probe_size=10, strict=True,
                                 every_n_epochs=1)
    with pytest.warns(InterpretationWarning, match=r"leaves out \['aux'\]: forward\(\) calls them on none of the 10"):
        fit(named)
    assert named.component_names_[0] == "fc1[0]" and len(named.component_names_) == 64
    only_silent = ComponentAttribution(layers=["aux"], n_masks=40, n_eval_masks=10, probe_size=10, strict=True,
                                       every_n_epochs=1)
    with pytest.raises(C.AblationError, match=r"calls none of the chosen layers \['aux'\].*Available layers"):
        fit(only_silent)


def test_silent_modules_checks_every_example_and_leaves_a_training_model_alone():
    """Routed modules (experts) that only some examples use are not silent; the check itself runs in eval mode."""

    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            x = self.bn(x)
            route = x[:, 0].gt(0).long() + x[:, 1].gt(0).long()  # 0, 1 or 2 per example
            mixed = torch.zeros_like(x)
            for k, expert in enumerate(self.experts):
                if bool((route == k).any()):
                    mixed[route == k] = expert(x[route == k])
            return self.out(mixed)

    model = Routed().train()
    x = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]] + [[-1.0, -1.0, 0, 0]] * 300 + [[1.0, -1.0, 0, 0]])
    components = C.find_components(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert C.silent_modules(model, components, x[:2]) == ["experts.0", "experts.1"]
    assert C.silent_modules(model, components, x, batch_size=64) == []  # expert 1 first runs in the last batch
    assert model.training and all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_checkpoint_runs_over_the_overhead_budget_wait_for_a_later_checkpoint(tmp_path):
    """max_overhead also spaces the checkpoint-driven runs: after the first, a 1% budget is not reached again
    within 4 short epochs, so the other checkpoints pass without a run (counted, not silent)."""
    from lightning_interp.alerts import InterpretationWarning

    from lightning_interp._lightning import ModelCheckpoint

    callback = _small_callback(max_overhead=0.01)
    last = ModelCheckpoint(dirpath=tmp_path / "last", monitor="val/acc", mode="max", save_last=True)  # 2+ files a step
    with pytest.warns(InterpretationWarning, match="ComponentAttribution postponed its analysis of epoch 1"):
        _fit_demo(tmp_path, [callback, last], max_epochs=4)
    assert [h["epoch"] for h in callback.history_] == [0]
    assert callback.cost_["runs"] == 1 and callback.cost_["postponed"] == 3


def test_resuming_a_finished_fit_does_not_analyse_its_final_model_again(tmp_path):
    """A checkpoint at the last batch still says 'no run' (the final-model run came after it): resumed, the fit trains
    no step, and the final model is not analysed (nor saved) a second time."""
    from conftest import make_trainer

    from lightning_interp._lightning import ModelCheckpoint
    from lightning_interp.demo import DigitsCNN, DigitsDataModule

    def fit(ckpt=None):
        cb = _small_callback(every_n_epochs=10)
        steps = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1,
                                filename="{epoch}-{step}")
        make_trainer(tmp_path, [cb, steps], max_epochs=3, enable_checkpointing=True, logger=False).fit(
            DigitsCNN(), DigitsDataModule(batch_size=128), ckpt_path=ckpt)
        return cb

    first = fit()
    assert [h["epoch"] for h in first.history_] == [2] and first.cost_["runs"] == 1
    again = fit(str(tmp_path / "ckpt" / "epoch=2-step=30.ckpt"))
    assert again.cost_["runs"] == 0
