"""Carrying an optimizer's state through a compaction of the bank (the flat parameter shrinks).

Compaction replaces the bank's flat parameter by ``old[gather]``; the optimizer must then hold the new
parameter, with its per-element state gathered by the same map, so that training continues exactly
as if only the kept rows had ever been optimised:

- elementwise state of the parameter's shape (torch Adam/AdamW/SGD momentum/Adagrad/RMSprop, torch
  and transformers Adafactor on a 1-D tensor, bitsandbytes 32-bit and paged optimizers): gathered;
- bitsandbytes' block-wise 8-bit state (``state1``/``state2`` uint8 with one ``absmax`` per block of
  256): dequantised, gathered, re-quantised with fresh block maxima — and kept in fp32 when the new
  parameter is below the optimizer's ``min_8bit_size``, as bitsandbytes would have kept it;
- scalars (``step``, Adafactor's ``RMS``, ``unorm_vec``) and quantisation maps: kept.

Anything else (a state tensor of another shape, e.g. a matrix preconditioner) cannot be carried:
:func:`check_carriable` raises before anything is changed.
"""

from __future__ import annotations

import torch
from torch import nn

BNB_BLOCK = 256  # bitsandbytes' block size of 8-bit optimizer state
_KEEP = ("qmap1", "qmap2", "unorm_vec")


def _is_bnb(opt) -> bool:
    return any(c.__module__.startswith("bitsandbytes") for c in type(opt).__mro__)


def check_carriable(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """Raise a clear ``ValueError`` if ``optimizer``'s state of ``param`` cannot follow a compaction."""
    state = optimizer.state.get(param, {})
    for key, v in state.items():
        if not torch.is_tensor(v) or v.numel() <= 1 or key in _KEEP or v.shape == param.shape:
            continue
        if _is_bnb(optimizer) and key in ("absmax1", "absmax2"):
            continue
        raise ValueError(
            f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(v.shape)} for the bank's "
            f"{tuple(param.shape)} parameter: prunepeft cannot carry it through compaction. Supported: torch "
            "Adam/AdamW/SGD/Adagrad/RMSprop/Adafactor, transformers Adafactor, bitsandbytes (Paged)AdamW(8bit)"
        )


@torch.no_grad()
def swap_param(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, gather: torch.Tensor
) -> None:
    """Make ``optimizer`` hold ``new = old[gather]`` instead of ``old``, with its state gathered."""
    check_carriable(optimizer, old)
    found = False
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                found = True
    if not found:
        raise ValueError("the optimizer passed to compact() does not hold the bank's flat parameter")
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    if _is_bnb(optimizer):
        optimizer.state[new] = _gather_bnb(optimizer, state, old, new, gather)
        return
    optimizer.state[new] = {
        k: (v[gather].clone() if torch.is_tensor(v) and v.shape == old.shape else v) for k, v in state.items()
    }


def _gather_bnb(optimizer, state: dict, old: nn.Parameter, new: nn.Parameter, gather: torch.Tensor) -> dict:
    import bitsandbytes.functional as F

    group = next(g for g in optimizer.param_groups if any(p is new for p in g["params"]))
    min_8bit = group.get("min_8bit_size") or getattr(getattr(optimizer, "args", None), "min_8bit_size", 4096)
    out = {k: v for k, v in state.items() if not (torch.is_tensor(v) and v.shape == old.shape)}
    out.pop("absmax1", None)
    out.pop("absmax2", None)
    eight_bit_new = new.numel() >= min_8bit
    for i in (1, 2):
        key = f"state{i}"
        if key not in state:
            continue
        v = state[key]
        if v.dtype == torch.uint8:  # block-wise 8-bit: back to fp32 first
            v = F.dequantize_blockwise(
                v, absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=BNB_BLOCK
            )
        v = v.reshape(-1)[gather].reshape(new.shape).float()
        if state[key].dtype == torch.uint8 and eight_bit_new:
            buf = optimizer.get_state_buffer(new, dtype=torch.uint8)
            q, qs = F.quantize_blockwise(v, code=state[f"qmap{i}"], blocksize=BNB_BLOCK)
            buf.copy_(q)
            out[key], out[f"absmax{i}"] = buf, qs.absmax
        else:  # 32-bit state, or a parameter now too small for 8 bits (bitsandbytes keeps those in fp32)
            buf = optimizer.get_state_buffer(new, dtype=torch.float32)
            buf.copy_(v)
            out[key] = buf
            out.pop(f"qmap{i}", None)
        _release_paged(optimizer, state[key])
    return out


def _release_paged(optimizer, t: torch.Tensor) -> None:
    mng = getattr(optimizer, "page_mng", None)
    if mng is not None and getattr(t, "is_paged", False):
        mng.paged_tensors = [x for x in mng.paged_tensors if x is not t]
