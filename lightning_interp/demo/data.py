"""Scikit-learn's 8x8 digits, split for training, with label noise and leaked test images injected.

The data ships inside scikit-learn, so the demo never downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from .._lightning import LightningDataModule


@dataclass
class DigitsSplits:
    """Tensors of the three splits and the ground truth of what was injected.

    ``flipped`` holds the training indices whose label was changed; ``leaked`` holds
    ``(test_index, train_index)`` pairs where a test image was copied into the training set.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_train_clean: torch.Tensor
    flipped: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    leaked: list[tuple[int, int]] = field(default_factory=list)


def load_digits_tensors(
    noise_fraction: float = 0.0,
    n_leaked: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> DigitsSplits:
    """Digits as ``[N, 1, 8, 8]`` float tensors in [0, 1], stratification-free random splits.

    ``noise_fraction`` of the training labels are flipped to a different class chosen uniformly (symmetric
    noise); ``n_leaked`` test images are appended to the training set with their true labels.
    """
    if not 0.0 <= noise_fraction < 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction}")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    n_test = int(round(test_fraction * len(y)))
    n_val = int(round(val_fraction * len(y)))
    test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]

    leaked: list[tuple[int, int]] = []
    if n_leaked:
        if n_leaked > len(test_idx):
            raise ValueError(f"n_leaked={n_leaked} exceeds the {len(test_idx)} test images")
        chosen = torch.randperm(len(test_idx), generator=gen)[:n_leaked]
        leaked = [(int(t), len(y_train) + i) for i, t in enumerate(chosen)]
        x_train = torch.cat([x_train, x_test[chosen]])
        y_train = torch.cat([y_train, y_test[chosen]])

    y_clean = y_train.clone()
    n_flip = int(round(noise_fraction * len(y_train)))
    flipped = torch.randperm(len(y_train), generator=gen)[:n_flip].sort().values
    offsets = torch.randint(1, 10, (n_flip,), generator=gen)
    y_train = y_train.clone()
    y_train[flipped] = (y_train[flipped] + offsets) % 10
    return DigitsSplits(
        x_train, y_train, x[val_idx], y[val_idx], x_test, y_test, y_clean, flipped, leaked
    )


class DigitsDataModule(LightningDataModule):
    """Digits with optional label noise and leaked test images, as a ``LightningDataModule``."""

    def __init__(
        self,
        noise_fraction: float = 0.1,
        n_leaked: int = 10,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits = load_digits_tensors(noise_fraction, n_leaked, seed=seed)

    def train_dataloader(self) -> DataLoader:
        s = self.splits
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            TensorDataset(s.x_train, s.y_train), batch_size=self.hparams.batch_size, shuffle=True, generator=gen
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.splits.x_val, self.splits.y_val), batch_size=256)

    @property
    def test_dataset(self) -> TensorDataset:
        """The test split (the demo copies some of its images into the training set)."""
        return TensorDataset(self.splits.x_test, self.splits.y_test)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=256)
