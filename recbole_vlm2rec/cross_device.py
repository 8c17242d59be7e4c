"""Cross-device negatives: a batch's rows gathered from every process of a ``torch.distributed`` group.

Under ``run_recbole --nproc=N`` RecBole gives each process ``train_batch_size / N`` of a step's pairs. An
in-batch contrastive loss scores each row against the other rows of *its* batch, so without gathering each
process would see ``B/N - 1`` negatives, not ``B - 1``. :func:`gather_rows` concatenates the shards in rank
order on every process (``torch.distributed.nn.functional.all_gather``: its backward sends each process the
sum, over processes, of the gradient with respect to the rows it owns). Every process then computes the loss
of the whole batch, ``L``, the same on all of them, and its parameters get ``N * dL/dtheta_local``; DDP
averages over the N processes, which gives ``dL/dtheta`` of one process training on the whole batch.
Anything computed from the gathered rows (WPCL, CRTR, the weak-modality detector) is the same on every
process, so the detector's decision is too.

Shards may differ in length (a last, shorter batch): they are padded to the longest for the collective and
the padding is cut off again, so the gathered batch is exactly the concatenation of the shards.
"""
from __future__ import annotations

import warnings
from logging import getLogger
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Processes in the default group; 1 when ``torch.distributed`` is not in use."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def leave_process_group() -> None:
    """Wait for every process, then destroy the default group. Without the barrier a process that finished
    first tears its gloo connections down while a peer is still in its last collective, and the peer can
    abort ("terminate called without an active exception", SIGABRT; seen once in CI on a loaded machine)."""
    dist.barrier()
    dist.destroy_process_group()


def _shard_lengths(rows: int, device: torch.device) -> List[int]:
    length = torch.tensor([rows], dtype=torch.long, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    return [int(n) for n in lengths]


def gather_rows(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """Every process's ``tensor`` (rows along dim 0) concatenated in rank order, differentiable for floating
    tensors; ``None`` and one-process runs pass through unchanged. A collective: every process must call it
    with the same sequence of tensors (``None`` on all or on none)."""
    if tensor is None or world_size() == 1:
        return tensor
    lengths = _shard_lengths(tensor.shape[0], tensor.device)
    longest = max(lengths)
    padded = tensor
    if tensor.shape[0] < longest:
        padded = torch.cat([tensor, tensor.new_zeros((longest - tensor.shape[0],) + tuple(tensor.shape[1:]))])
    if tensor.is_floating_point():
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # torch 2.13 calls it deprecated for a private successor
            warnings.simplefilter("ignore", FutureWarning)
            shards = list(all_gather(padded))
    else:  # ids and masks carry no gradient; gloo has no bool collectives
        sent = padded.to(torch.uint8) if padded.dtype == torch.bool else padded
        shards = [torch.empty_like(sent) for _ in lengths]
        dist.all_gather(shards, sent.contiguous())
        shards = [shard.to(tensor.dtype) for shard in shards]
    return torch.cat([shard[:n] for shard, n in zip(shards, lengths)])


def cross_device_negatives(config, model: str) -> bool:
    """The ``cross_device_negatives`` setting of a model's run: ``~`` (the default) = on whenever several
    processes train; off in one process (nothing to gather). Logs what it means for the run."""
    processes = world_size()
    if processes == 1:
        return False
    requested = config["cross_device_negatives"]
    if requested is None or requested:
        getLogger().info(
            f"{model} on {processes} processes: cross_device_negatives: each step gathers the train_batch_size "
            "pairs of all processes, so every pair is contrasted with the whole batch, and WPCL, CRTR and the "
            "weak-modality detector see it too (the same decision on every process)"
        )
        return True
    getLogger().warning(
        f"{model} on {processes} processes with cross_device_negatives: False: each process contrasts only its "
        f"own train_batch_size / {processes} pairs (fewer negatives), and its weak-modality detector decides on "
        "them alone"
    )
    return False
