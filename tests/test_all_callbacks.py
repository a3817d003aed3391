"""All four callbacks together, each active every epoch: training untouched, every tag family in TensorBoard."""

from conftest import assert_same_training, read_scalars, read_tags

from lightning_interp import ARMDrift, ComponentAttribution, LayerClusters, MirroredInfluence
from lightning_interp._lightning import TensorBoardLogger


def test_all_callbacks_leave_training_bit_identical_and_log_everything(tmp_path):
    callbacks = [
        ARMDrift(strict=True),
        MirroredInfluence(every_n_epochs=1, strict=True),
        ComponentAttribution(every_n_epochs=1, at_checkpoints=False, n_masks=60, n_eval_masks=10, probe_size=10,
                             progress_bar=False, strict=True),
        LayerClusters(every_n_epochs=1, probe_size=128, strict=True),
    ]
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    assert_same_training(tmp_path, callbacks, epochs=3, logger=logger)

    assert [h["epoch"] for h in callbacks[0].history_] == [1, 2]  # "previous" needs a first epoch
    assert callbacks[1].scores_ is not None and callbacks[2].correlation_ is not None
    assert callbacks[3].results_
    scalars = set(read_scalars(tmp_path / "tb"))
    for prefix in ("arm/", "influence/", "components/", "clusters/"):
        assert any(tag.startswith(prefix) for tag in scalars), f"no {prefix} scalars in {sorted(scalars)}"
    tags = read_tags(tmp_path / "tb")
    assert any(t.startswith("clusters/") for t in tags["images"])
