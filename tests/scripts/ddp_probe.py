"""Run by tests/test_ddp.py: a 2-process CPU DDP fit whose callback shards the probe and gathers it back.

Rank zero saves what the callback gathered and, at the same weights, the single-process forward pass. Without a
validation pass the ranks' BatchNorm running statistics differ (each saw its own batches); the probe must use rank
zero's on every rank.
"""

import sys

import torch

from _ddp_exit import close_process_group
from lightning_interp._lightning import Callback, Trainer, pl
from lightning_interp.callbacks.base import InterpretationCallback
from lightning_interp.distributed import rank_zero_buffers
from lightning_interp.demo import DigitsCNN, DigitsDataModule
from lightning_interp.probe import ProbeData, run_probe


class GatherCheck(InterpretationCallback):
    tag = "ddp_check"

    def __init__(self, out_path: str, **kwargs):
        super().__init__(**kwargs)
        self.out_path = out_path

    def compute(self, trainer, pl_module, probe):
        layers = self.select_layers(pl_module)
        gathered = self.forward_probe(trainer, pl_module, probe, layers, features=True)
        full = run_probe(pl_module, ProbeData(probe.dataset, probe.indices), layers, features=True)
        # a part of the probe right after it: ranks whose shard of the part lies inside their cached shard must not
        # be served while the others run a pass (different gathers, a hang); nor may features nobody asked for come
        part = probe.subset(torch.tensor([4, 5, 7]))
        part_gathered = self.forward_probe(trainer, pl_module, part, layers)
        part_single = run_probe(pl_module, ProbeData(part.dataset, part.indices), layers)
        if trainer.is_global_zero:
            torch.save({"gathered": gathered, "single": full, "world_size": trainer.world_size,
                        "coreset": self.coreset_, "part": (part_gathered, part_single)}, self.out_path)


class BufferReuseCheck(Callback):
    """After training: rank zero's broadcast buffers are reused for a key only while rank zero's still equal them."""

    def __init__(self, out_path: str):
        self.out_path = out_path

    def on_train_end(self, trainer, pl_module):
        buffer = pl_module.bn2.running_mean
        kept = buffer.clone()
        with rank_zero_buffers(pl_module, "end"):
            first = pl_module.bn2.running_mean.clone()
        buffer.fill_(float(trainer.global_rank + 10))  # rewritten at the same key (as a pruning callback would)
        with rank_zero_buffers(pl_module, "end"):
            second = pl_module.bn2.running_mean.clone()
        buffer.copy_(kept)
        if trainer.is_global_zero:
            result = torch.load(self.out_path, weights_only=False)
            torch.save({**result, "buffers": (first, second)}, self.out_path)


if __name__ == "__main__":
    pl.seed_everything(0)
    callback = GatherCheck(sys.argv[1], probe="val", probe_size=0.5, probe_selector="kcenter", strict=True)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[callback, BufferReuseCheck(sys.argv[1])],
        limit_val_batches=0,  # no validation forward re-broadcasts rank zero's BatchNorm statistics before the probe
    )
    trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=128))
    close_process_group()
