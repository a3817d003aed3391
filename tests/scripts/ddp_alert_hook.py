"""Run by tests/test_ddp.py: a 2-process CPU DDP fit whose callback alerts every epoch, with an alert hook (called on
global rank zero only) that fails. ``strict`` as argv[1]: every rank must end with the hook's error (no rank left
waiting in a collective); otherwise training finishes on both ranks after one warning."""

import sys
import warnings

from _ddp_exit import close_process_group
from lightning_interp._lightning import Trainer, pl
from lightning_interp.callbacks.base import InterpretationCallback
from lightning_interp.demo import DigitsCNN, DigitsDataModule


class AlwaysAlerts(InterpretationCallback):
    tag = "always"

    def compute(self, trainer, pl_module, probe):
        outs = self.forward_probe(trainer, pl_module, probe)  # a collective before the alert
        self.alert(trainer, "always/mean", float(outs.outputs.mean()), -1e9, "fires every epoch")
        self.forward_probe(trainer, pl_module, probe.subset([0, 1]))  # and one after it


def broken_webhook(alert):
    raise ConnectionError("webhook unreachable")


def count_hook_failure_warnings():
    """Both ranks share one stderr, so their lines can interleave: each rank counts its own warnings instead."""
    counted = []
    show = warnings.showwarning

    def counting(message, *args, **kwargs):
        if "alert hook broken_webhook failed" in str(message):
            counted.append(message)
        show(message, *args, **kwargs)

    warnings.showwarning = counting
    return counted


if __name__ == "__main__":
    pl.seed_everything(0)
    hook_failure_warnings = count_hook_failure_warnings()
    strict = sys.argv[1] == "strict"
    callback = AlwaysAlerts(probe="val", alert_hooks=[broken_webhook], strict=strict)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=2,
        limit_val_batches=0, callbacks=[callback],
    )
    try:
        trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=128))
    except Exception as err:  # one short stdout line per rank: the traceback lines of two ranks may interleave
        print(f"rank {trainer.global_rank} raised {type(err).__name__}: {err}", flush=True)
        raise
    print(f"rank {trainer.global_rank} finished {trainer.current_epoch} epochs, {len(callback.alerts_)} alerts, "
          f"{len(hook_failure_warnings)} hook warnings", flush=True)
    close_process_group()
