"""Run by tests/test_ddp.py: a 2-process CPU DDP fit under ``max_overhead`` where only rank zero's analyses are slow.

Each rank's own clock would decide differently (rank one's analyses take no time, so it would run every one), and a
rank running an analysis the other skipped waits in its gather forever. Rank zero decides for both.
"""

import time

from _ddp_exit import close_process_group
from lightning_interp._lightning import Trainer, pl
from lightning_interp.callbacks.base import InterpretationCallback
from lightning_interp.demo import DigitsCNN, DigitsDataModule


class SlowOnRankZero(InterpretationCallback):
    tag = "slow_on_rank_zero"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.epochs: list[int] = []

    def compute(self, trainer, pl_module, probe):
        self.forward_probe(trainer, pl_module, probe)  # a gather: both ranks must be here
        self.epochs.append(trainer.current_epoch)
        if trainer.is_global_zero:
            time.sleep(1.0)


if __name__ == "__main__":
    pl.seed_everything(0)
    callback = SlowOnRankZero(max_overhead=0.2, probe="val")
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=2,
        limit_val_batches=0, callbacks=[callback],
    )
    trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=128))
    print(f"rank {trainer.global_rank} finished {trainer.current_epoch} epochs, analysed {callback.epochs}, "
          f"postponed {callback.cost_['postponed']}", flush=True)
    close_process_group()
