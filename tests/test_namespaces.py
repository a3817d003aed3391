"""The callbacks work with ``lightning.pytorch.Trainer`` too (skipped when the ``lightning`` package is absent)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import MeanActivation, read_scalars
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")


class UnifiedNamespaceModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.hidden = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(F.relu(self.hidden(F.relu(self.conv(x)).mean((2, 3)))))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_pytorch_trainer_runs_logs_and_resumes(tmp_path):
    data = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    loader = DataLoader(data, batch_size=32)

    def trainer(callbacks, epochs):
        return L.Trainer(
            max_epochs=epochs, accelerator="cpu",
            logger=L.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0),
            callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=str(tmp_path),
        )

    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MeanActivation(probe="train", strict=True)
    trainer([first, ckpt], 2).fit(UnifiedNamespaceModel(), loader, loader)
    assert [h["epoch"] for h in first.history_] == [0, 1]
    assert "probe_mean/hidden" in read_scalars(tmp_path / "tb")  # TensorBoard recognised across namespaces

    resumed = MeanActivation(probe="train", strict=True)
    trainer([resumed], 3).fit(UnifiedNamespaceModel(), loader, loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history_] == [0, 1, 2]
