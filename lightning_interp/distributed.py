"""Shard per-sample work over ranks and gather it back in dataset-index order."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


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


class FailedOnAnotherRank(RuntimeError):
    """A rank's share of a sharded analysis failed, so this rank stops the analysis too (see :func:`fail_together`)."""


@contextlib.contextmanager
def fail_together(strategy, what: str) -> Iterator[None]:
    """Run this rank's share of sharded work; if it raises on any rank, raise on every rank.

    Wrap the local work that precedes a gather: an error that only one rank's shard causes (a bad sample, a
    label the head does not have) would otherwise leave that rank skipping the analysis while the others wait in
    the gather, a deadlock. One boolean all-reduce per use, under DDP only.
    """
    error: Exception | None = None
    try:
        yield
    except Exception as err:
        error = err
    failed_anywhere = error is not None
    if getattr(strategy, "world_size", 1) > 1:
        failed_anywhere = bool(strategy.reduce_boolean_decision(error is not None, all=False))
    if error is not None:
        raise error
    if failed_anywhere:
        raise FailedOnAnotherRank(f"{what} failed on another rank (its shard of the data); that rank's warning, "
                                  "or strict=True, shows the error")


_BROADCAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (key, rank zero's buffers)


@contextlib.contextmanager
def rank_zero_buffers(module: nn.Module, key: object) -> Iterator[None]:
    """Inside, every buffer of ``module`` holds rank zero's values; each rank's own tensors are put back after.

    DDP keeps the parameters equal across ranks but each rank updates BatchNorm statistics on its own batches;
    DDP re-broadcasts rank zero's at the next forward, so a probe sharded over ranks before then would mix
    models. The rank's tensors are swapped out, not written, so training never sees a change. The broadcast
    copies are reused for the same ``key`` (the training step) while rank zero's buffers still equal them (rank
    zero decides and tells the others), so callbacks at one step share them, and with them the forward-pass
    cache, which is keyed on tensor identity. A no-op outside a multi-process group.
    """
    slots = [(owner, name) for owner in module.modules() for name, b in owner._buffers.items() if b is not None]
    if not slots or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    own = [owner._buffers[name] for owner, name in slots]
    cached = _BROADCAST.get(module)
    reuse = cached is not None and cached[0] == key and len(cached[1]) == len(slots)
    if reuse:  # rank zero decides for all: its buffers may have been rewritten since (pruning masks, swaps)
        same = all(torch.equal(a, b) for a, b in zip(own, cached[1])) if dist.get_rank() == 0 else True
        flag = torch.tensor([1 if same else 0], device=own[0].device)
        dist.broadcast(flag, src=0)
        reuse = bool(flag.item())
    if not reuse:
        copies = []
        for owner, name in slots:
            copy = owner._buffers[name].detach().clone()
            as_bytes = copy.dtype == torch.bool  # NCCL has no bool
            shared = copy.to(torch.uint8) if as_bytes else copy
            dist.broadcast(shared, src=0)
            copies.append(shared.to(torch.bool) if as_bytes else shared)
        cached = _BROADCAST[module] = (key, copies)
    for (owner, name), copy in zip(slots, cached[1]):
        owner._buffers[name] = copy
    try:
        yield
    finally:
        for (owner, name), tensor in zip(slots, own):
            owner._buffers[name] = tensor
