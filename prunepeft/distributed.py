"""Several processes: what a search synchronises, through ``torch.distributed`` (a summary in
ARCHITECTURE.md §5b). Every function is a no-op in a single process.

Data-parallel semantics of :func:`prunepeft.search` under ``torchrun`` / ``accelerate launch``:

- every rank builds the same global batch and trains on its shard of it (:func:`shard`);
- gradients of everything that trains are averaged across ranks after backward, before clipping
  (:func:`average_gradients`), so parameters, optimizer states and the bank's gradient statistics
  stay identical on every rank;
- the per-rank statistics (activation sums and token counts, from each rank's own forward) are
  summed across ranks before scoring (:func:`all_reduce_sum_`);
- every decision is checked: a cheap checksum of the kept set (and of the parameters) is gathered
  after every round, and ranks that disagree raise :class:`RankMismatchError` on every rank
  (:func:`check_agree`) — a collective, so no rank is left waiting;
- rank 0 alone writes files and prints (:func:`is_main`).

Inside a ``transformers.Trainer`` (DDP through accelerate) the Trainer averages the head's gradients;
the bank's flat tensor is left out of DDP's reducer (its Parameter is replaced at every compaction,
which a reducer cannot follow) and averaged by a gradient hook instead (:func:`install_grad_average`).
Parameter-sharding engines (FSDP, DeepSpeed ZeRO-3) are refused with a clear error
(:func:`reject_sharded`).
"""

from __future__ import annotations

import atexit
import sys
import zlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class RankMismatchError(RuntimeError):
    """Ranks of a data-parallel search reached different decisions (raised on every rank)."""


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if not initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def init_from_env() -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and
    nothing initialised it yet: NCCL with CUDA, else gloo. Returns whether several processes run."""
    import os

    if initialized():
        return world()[1] > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    atexit.register(_destroy_at_exit)
    return True


def _destroy_at_exit() -> None:
    """Destroy the default process group that :func:`init_from_env` created, while the interpreter
    is still whole: left to interpreter teardown, gloo's worker threads can outlive it and abort the
    process ("terminate called without an active exception") after all the work was done. A no-op
    if the user's script destroyed it already. Skipped after an uncaught exception (Python sets
    ``sys.last_value`` before exit handlers run): other ranks may still wait in a collective, and the
    destroy could then hang the failed rank instead of letting it exit."""
    if initialized() and getattr(sys, "last_value", None) is None:
        torch.distributed.destroy_process_group()


def _device_for_collectives() -> torch.device:
    if initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (moved through the collective's device if needed)."""
    if world()[1] == 1:
        return t
    dev = _device_for_collectives()
    buf = t if t.device == dev else t.to(dev)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    if buf is not t:
        t.copy_(buf)
    return t


def all_min(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (a collective: every rank must call it)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device_for_collectives())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``params`` over ranks (one flat buffer, one all-reduce)."""
    _, n = world()
    if n == 1:
        return
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    dev = _device_for_collectives()
    flat = torch.cat([p.grad.detach().reshape(-1).to(dev, torch.float32) for p in params])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= n
    off = 0
    for p in params:
        k = p.grad.numel()
        p.grad.copy_(flat[off : off + k].view_as(p.grad))
        off += k


def average_mean(x: float) -> float:
    """The mean of a Python float over ranks (e.g. the loss of one step, for identical logs)."""
    _, n = world()
    if n == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_device_for_collectives())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return float(t.item()) / n


def checksum(*parts) -> int:
    """A CRC32 of the parts' text / bytes (tensors by their bytes)."""
    crc = 0
    for p in parts:
        if torch.is_tensor(p):
            data = p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        else:
            data = repr(p).encode()
        crc = zlib.crc32(data, crc)
    return crc


def check_agree(value: int, what: str) -> None:
    """Gather ``value`` (a checksum) from every rank; raise :class:`RankMismatchError` on every rank
    when they differ. A collective: every rank must call it at the same point."""
    rank, n = world()
    if n == 1:
        return
    t = torch.tensor([value], dtype=torch.int64, device=_device_for_collectives())
    got = [torch.zeros_like(t) for _ in range(n)]
    torch.distributed.all_gather(got, t)
    values = [int(g.item()) for g in got]
    if len(set(values)) > 1:
        raise RankMismatchError(
            f"ranks disagree on {what} (checksums by rank: {values}); this rank is {rank}. "
            "Every rank must see the same model, data order and configuration: launch all ranks with the "
            "same command and seed"
        )


def shard(batches: Iterable[dict], rank: int, n: int) -> Iterator[dict]:
    """The rank's contiguous shard of every global batch (every tensor split along dim 0)."""
    for b in batches:
        size = next(v.shape[0] for v in b.values() if torch.is_tensor(v))
        if size % n:
            raise ValueError(
                f"a global batch of {size} examples does not split over {n} processes: choose a batch size "
                f"divisible by the number of processes"
            )
        k = size // n
        yield {key: (v[rank * k : (rank + 1) * k] if torch.is_tensor(v) else v) for key, v in b.items()}


def broadcast_(t: torch.Tensor, src: int = 0) -> None:
    if world()[1] == 1:
        return
    dev = _device_for_collectives()
    buf = t.detach() if t.device == dev else t.detach().to(dev)
    torch.distributed.broadcast(buf, src)
    if buf.data_ptr() != t.data_ptr():
        with torch.no_grad():
            t.copy_(buf)


def install_grad_average(param: nn.Parameter) -> None:
    """Average ``param.grad`` over ranks as soon as autograd has accumulated it (every backward).

    For a parameter left out of DDP's reducer (the bank's flat tensor inside a Trainer). Under
    gradient accumulation the accumulated gradient is averaged after every micro-batch; since the
    earlier part is already equal on every rank, the result is the average of the sums.
    """
    if world()[1] == 1 or getattr(param, "_prunepeft_grad_average", False):
        return

    def hook(p: nn.Parameter) -> None:
        if p.grad is not None:
            average_gradients([p])

    param.register_post_accumulate_grad_hook(hook)
    param._prunepeft_grad_average = True


def reject_sharded(model: nn.Module) -> None:
    """Refuse parameter-sharding engines with a message that says what works."""
    supported = (
        "prunepeft supports data parallelism with replicated parameters: torchrun / accelerate (DDP) "
        "and transformers.Trainer with DDP"
    )
    for m in model.modules():
        name = type(m).__name__
        if name in ("FullyShardedDataParallel", "FSDPModule") or name.startswith("FSDP"):
            raise ValueError(f"the model is sharded by FSDP ({name}); {supported}; FSDP is not supported")
    for p in model.parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            raise ValueError(f"the model's parameters are partitioned by DeepSpeed ZeRO-3; {supported}")
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise ValueError(f"the model's parameters are DTensors (FSDP2 / tensor parallel); {supported}")
