import pytest
import torch
from torch import nn

from lightning_interp.capture import (
    ActivationRecorder,
    HeadInputRecorder,
    LayerSelectionError,
    find_head,
    select_layers,
)
from lightning_interp.demo import DigitsCNN


def test_default_selection_is_conv_and_linear_without_the_head():
    model = DigitsCNN()
    assert list(select_layers(model)) == ["conv1", "conv2", "conv3", "fc1"]
    assert find_head(model) == "fc2"


def test_glob_selection_keeps_order_and_may_name_the_head():
    model = DigitsCNN()
    assert list(select_layers(model, include=["conv*"])) == ["conv1", "conv2", "conv3"]
    assert list(select_layers(model, include=["fc2", "bn2"])) == ["bn2", "fc2"]


def test_unmatched_pattern_lists_available_layers():
    with pytest.raises(LayerSelectionError) as err:
        select_layers(DigitsCNN(), include=["encoder.*"])
    message = str(err.value)
    assert "encoder.*" in message and "conv1 (Conv2d)" in message and "fc2 (Linear)" in message


def test_model_without_eligible_layers_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 2))  # only a head
    with pytest.raises(LayerSelectionError, match="no Conv1d, Conv2d, Conv3d, Linear layer besides its output head"):
        select_layers(model)


def test_recorder_pools_conv_maps_and_always_removes_hooks():
    model = DigitsCNN().eval()
    x = torch.randn(5, 1, 8, 8)
    layers = select_layers(model)
    with ActivationRecorder(model, layers) as rec:
        model(x)
    acts = rec.stacked()
    assert acts["conv1"].shape == (5, 16) and acts["fc1"].shape == (5, 64)
    expected = torch.relu(model.conv1(x)) if False else model.conv1(x).mean(dim=(2, 3))
    torch.testing.assert_close(acts["conv1"], expected)
    assert all(not m._forward_hooks for m in model.modules())

    with pytest.raises(RuntimeError, match="boom"):
        with ActivationRecorder(model, layers, pool=False) as rec:
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_unpooled_maps_and_head_inputs():
    model = DigitsCNN().eval()
    x = torch.randn(3, 1, 8, 8)
    with ActivationRecorder(model, {"conv2": model.conv2}, pool=False) as rec, HeadInputRecorder(model, "fc2") as head:
        out = model(x)
    assert rec.stacked()["conv2"].shape == (3, 32, 8, 8)
    feats = head.stacked()["fc2"]
    torch.testing.assert_close(model.fc2(feats), out)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


class _TokenModel(nn.Module):
    """Tokens ``[N, T, D]`` through a Linear, a sequence-first attention layer and a Conv1d, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.attn = nn.MultiheadAttention(6, 2)  # batch_first=False: [T, N, E]
        self.conv = nn.Conv1d(6, 3, 1)  # channels first: [N, C, T]
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.proj(x)
        s = h.transpose(0, 1)
        h = self.attn(s, s, s)[0].transpose(0, 1)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h).mean(1)


def test_units_are_the_layers_own_features_for_linear_attention_and_conv_on_tokens():
    torch.manual_seed(0)
    model, x = _TokenModel(), torch.randn(8, 5, 4)
    with ActivationRecorder(model, {n: model.get_submodule(n) for n in ("proj", "attn", "conv")}) as rec:
        model(x)
    acts = rec.stacked()
    proj = model.proj(x)
    assert torch.allclose(acts["proj"], proj.mean(1))  # [N, 6]: positions averaged, not features
    assert acts["attn"].shape == (8, 6)  # samples first although the layer is sequence-first
    assert acts["conv"].shape == (8, 3)
    with HeadInputRecorder(model, "head") as rec:
        model(x)
    assert rec.stacked()["head"].shape == (8, 3)


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_and_recurrent_layers_record_samples_by_features(batch_first):
    torch.manual_seed(0)
    layers = {"encoder": nn.TransformerEncoderLayer(6, 2, 12, batch_first=batch_first),
              "lstm": nn.LSTM(6, 5, batch_first=batch_first)}
    tokens = torch.randn(8, 4, 6) if batch_first else torch.randn(4, 8, 6)  # 8 samples of 4 positions
    with ActivationRecorder(nn.ModuleDict(layers), layers) as rec:
        layers["lstm"](layers["encoder"](tokens))
    assert rec.stacked()["encoder"].shape == (8, 6) and rec.stacked()["lstm"].shape == (8, 5)


def test_linear_layers_inside_a_sequence_first_transformer_record_samples_by_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(6, 2, 12, batch_first=False))
    with ActivationRecorder(model, {"0.linear1": model[0].linear1, "0.linear2": model[0].linear2}) as rec:
        model(torch.randn(5, 8, 6))  # 5 positions of 8 samples
    assert rec.stacked()["0.linear1"].shape == (8, 12) and rec.stacked()["0.linear2"].shape == (8, 6)


def test_default_selection_leaves_out_the_insides_of_attention():
    model = nn.Sequential(nn.MultiheadAttention(6, 2), nn.Linear(6, 6), nn.Linear(6, 2))
    assert list(select_layers(model)) == ["1"]  # not 0.out_proj: attention calls its weights directly


def test_only_torchs_sequence_modules_mark_their_insides_sequence_first():
    from lightning_interp.capture import sequence_first_layers

    class Block(nn.Module):  # a user's batch-first block that happens to own a sequence-first attention
        def __init__(self):
            super().__init__()
            self.self_attn = nn.MultiheadAttention(6, 2)
            self.mlp = nn.Sequential(nn.Linear(6, 6))

        def forward(self, x):  # x: [N, T, D]
            s = x.transpose(0, 1)
            return self.mlp(self.self_attn(s, s, s)[0].transpose(0, 1))

    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(6, 2, 12), num_layers=2, enable_nested_tensor=False)
    model = nn.ModuleDict({"block": Block(), "encoder": encoder})
    marked = sequence_first_layers(model)
    assert "block.self_attn" in marked and "block.mlp.0" not in marked and "block" not in marked
    assert {"encoder", "encoder.layers.1.linear2"} <= marked
    with ActivationRecorder(model, {"block.mlp.0": model["block"].mlp[0], "encoder": encoder}) as rec:
        model["block"](torch.randn(8, 5, 6))
        encoder(torch.randn(5, 8, 6))
    assert rec.stacked()["block.mlp.0"].shape == (8, 6) and rec.stacked()["encoder"].shape == (8, 6)


def test_a_users_module_inside_a_transformer_keeps_its_own_layout():
    from lightning_interp.capture import sequence_layout

    class Decoder(nn.Module):  # a custom_decoder working batch-first inside a sequence-first nn.Transformer
        def __init__(self):
            super().__init__()
            self.gru, self.proj = nn.GRU(6, 6, batch_first=True), nn.Linear(6, 6)

        def forward(self, tgt, memory, **kwargs):
            return self.proj(self.gru(tgt.transpose(0, 1))[0]).transpose(0, 1)

    model = nn.Transformer(6, 2, 1, 1, 12, dropout=0.0, custom_decoder=Decoder())
    layout = sequence_layout(model)
    assert layout[""] is False and layout["encoder.layers.0.dropout1"] is False
    assert "decoder" not in layout and layout["decoder.gru"] is True and "decoder.proj" not in layout
    layers = {"encoder.layers.0.dropout1": model.encoder.layers[0].dropout1, "decoder.gru": model.decoder.gru}
    with ActivationRecorder(model, layers) as rec:
        model(torch.randn(5, 3, 6), torch.randn(4, 3, 6))  # 3 samples, 5 source and 4 target positions
    assert rec.stacked()["encoder.layers.0.dropout1"].shape == (3, 6) and rec.stacked()["decoder.gru"].shape == (3, 6)
