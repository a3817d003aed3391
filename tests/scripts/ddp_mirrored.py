"""Run by tests/test_mirrored.py: MirroredInfluence under 2-process CPU DDP, and at the same weights the single-process
scores; rank zero saves both."""

import sys

import torch
from _ddp_exit import close_process_group

from lightning_interp._lightning import Callback, Trainer, pl
from lightning_interp.callbacks.mirrored import MirroredInfluence
from lightning_interp.demo import DigitsCNN, DigitsDataModule
from lightning_interp.methods.mirrored import mislabel_scores, tensor_batches


class SaveSingleProcess(Callback):
    def __init__(self, mirrored, out_path):
        self.mirrored, self.out_path = mirrored, out_path

    def on_train_epoch_end(self, trainer, pl_module):
        s = trainer.datamodule.splits
        single = mislabel_scores(pl_module, s.x_val, s.y_val, tensor_batches(s.x_train, s.y_train, 100))
        if trainer.is_global_zero:
            torch.save({"ddp": self.mirrored.scores_.clone(), "single": single.scores,
                        "world_size": trainer.world_size, "runs": len(self.mirrored.history_)}, self.out_path)


if __name__ == "__main__":
    pl.seed_everything(0)
    mirrored = MirroredInfluence(every_n_epochs=1, strict=True, leak_queries=None)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[mirrored, SaveSingleProcess(mirrored, sys.argv[1])])
    trainer.fit(DigitsCNN(), DigitsDataModule(noise_fraction=0.2, batch_size=128))
    close_process_group()
