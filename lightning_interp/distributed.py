"""Shard per-sample work over ranks and gather it back in dataset-index order."""

from __future__ import annotations

import torch


def shard_positions(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Positions ``rank, rank + world, ...`` of ``n`` items: a strided, balanced share for one rank.

    A rank left without items (``n < world_size``) repeats item 0, so that every rank reaches the gather with
    work to show; :func:`gather_by_index` drops the repeat.
    """
    positions = torch.arange(rank, n, world_size)
    return positions if len(positions) else torch.zeros(1, dtype=torch.long)


def gather_by_index(strategy, rows: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' ``rows`` (``[n_rank, ...]``) concatenated and sorted by their dataset ``indices``.

    Every rank receives the same result. Shards of unequal length are padded for the collective and the padding
    dropped afterwards. With one process this only sorts.
    """
    world = getattr(strategy, "world_size", 1)
    if world > 1:
        device = strategy.root_device
        sizes = strategy.all_gather(torch.tensor([len(indices)], device=device)).flatten()
        longest = int(sizes.max())
        pad = longest - len(indices)
        padded_rows = torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))]).to(device)
        padded_idx = torch.cat([indices, indices.new_full((pad,), -1)]).to(device)
        all_rows = strategy.all_gather(padded_rows).reshape(-1, *rows.shape[1:]).cpu()
        all_idx = strategy.all_gather(padded_idx).reshape(-1).cpu()
        keep = all_idx >= 0
        rows, indices = all_rows[keep], all_idx[keep]
    order = torch.argsort(indices)
    rows, indices = rows[order], indices[order]
    unique = torch.ones(len(indices), dtype=torch.bool)
    unique[1:] = indices[1:] != indices[:-1]  # an item repeated by an otherwise idle rank
    return rows[unique], indices[unique]
