"""Run by tests/test_ddp.py: a 2-process CPU DDP fit whose probe has one sample that fails to load, in rank one's
shard only. Both ranks must skip the analysis alike and finish (the failing rank used to skip it while rank zero
waited in the gather: a deadlock)."""

import torch
from _ddp_exit import close_process_group
from torch.utils.data import Dataset

from lightning_interp._lightning import Trainer, pl
from lightning_interp.callbacks.base import InterpretationCallback
from lightning_interp.demo import DigitsCNN, DigitsDataModule


class OneBadSample(Dataset):
    """Eight digits-shaped samples; sample 1 (rank one's shard: positions 1, 3, 5, 7) fails to load."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 1:
            raise OSError("sample 1: unreadable file")
        return torch.full((1, 8, 8), float(i)), torch.tensor(i % 10)


class MeanOutput(InterpretationCallback):
    tag = "mean_output"

    def compute(self, trainer, pl_module, probe):
        self.last_mean = float(self.forward_probe(trainer, pl_module, probe).outputs.mean())


if __name__ == "__main__":
    pl.seed_everything(0)
    callback = MeanOutput(probe=OneBadSample())
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=2,
        limit_val_batches=0, callbacks=[callback],
    )
    trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=128))
    errors = sorted({s["error"].split(":")[0] for s in callback.skipped_})
    print(f"rank {trainer.global_rank} finished {trainer.current_epoch} epochs, skipped {len(callback.skipped_)}: "
          f"{errors}", flush=True)
    close_process_group()
