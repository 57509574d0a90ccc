"""Data-parallel calibration (issue 17) through torch.distributed, not a scheduler of our own.

Under an initialised process group (``torchrun --nproc-per-node N -m cbq_ptq.cli quantize``,
or the API after ``torch.distributed.init_process_group``) every rank holds the whole model
and the calibration windows ``i`` with ``i % N == rank`` (its share of X_fp / X_q and of the
window targets). What one process computes from all windows, the ranks compute from their
shares and reduce:

* CFP and CrossQuant statistics (max |x| per channel): all-reduce MAX;
* the GPTQ / clipping-search second moments (sum of x x^T and the token count): SUM;
* the window loss of a training step: each rank backpropagates its part of the global batch,
  scaled by its share of the batch, and the gradients are all-reduced (SUM), so every rank
  applies the same update as one process with the same global batch;
* held-out losses: SUM of (loss x windows) and of windows.

The global batches do not depend on N: each step takes one training window from each residue
class of the window index modulo the batch size (a per-class permutation from the seed), so a
rank owns exactly batch / N windows of every step (N must divide the batch size). Rank 0
writes the artefact and the log. One process is the case N = 1 (every function here is then
a no-op): the same code, the same batches.
"""

from __future__ import annotations

import torch
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def shard(ids: Tensor) -> Tensor:
    """This rank's calibration windows (rows i with i % N == rank)."""
    rank, size = world()
    return ids[rank::size]


def local_rows(index: Tensor) -> tuple[Tensor, Tensor]:
    """(rows in this rank's share, the global indices they are) of the global window indices
    ``index`` that this rank owns."""
    rank, size = world()
    mine = index[index % size == rank]
    return mine // size, mine


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In place over the ranks (no-op for one process); ``op``: 'sum' or 'max'."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Python floats summed over the ranks (fp64)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return all_reduce_(t).tolist()


def all_reduce_grads(params: list[Tensor]) -> None:
    """Sum every parameter's gradient over the ranks (a rank without a share of this step's
    batch contributes zeros), in one flat buffer."""
    if world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    all_reduce_(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def check_batch(batch_size: int) -> None:
    size = world()[1]
    if batch_size % size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of "
                         f"processes ({size}): each rank takes batch_size / N windows a "
                         "step")  # fmt: skip


def stratified_batches(train_idx: Tensor, batch: int, steps: int, seed: int) -> list[Tensor]:
    """The global batches of ``steps`` steps: step s takes the next window of each residue
    class c = position % batch of ``train_idx`` (each class a permutation from ``seed``,
    drawn again when it runs out); fewer training windows than ``batch``: every window each
    step."""
    g = torch.Generator().manual_seed(seed)
    if train_idx.numel() <= batch:
        return [train_idx.clone() for _ in range(steps)]
    classes = [train_idx[c::batch] for c in range(batch)]
    queues = [torch.empty(0, dtype=torch.long) for _ in classes]
    out = []
    for _ in range(steps):
        pick = []
        for c, members in enumerate(classes):
            if queues[c].numel() == 0:
                queues[c] = members[torch.randperm(members.numel(), generator=g)]
            pick.append(queues[c][0])
            queues[c] = queues[c][1:]
        out.append(torch.stack(pick))
    return out
