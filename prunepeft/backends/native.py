"""Native (C++) backend of the packed module bank ops: a thin wrapper of ``prunepeft._C``.

Same functions, signatures and semantics as :mod:`prunepeft.backends.reference`
(the oracle). Importing this module never fails: ``prunepeft._C`` is imported
lazily on first use, and a missing build raises :class:`RuntimeError` with the
build command only when a function is called. :func:`available` says whether
the extension can be used.

Tensors cross as numpy arrays on the CPU. Read-only inputs are made CPU and
contiguous (a copy only when needed); arrays updated in place (``sens``,
``unc``, ``accum``) must be CPU, contiguous tensors of the right dtype, since a
copy would lose the update. Results come back as torch tensors sharing the
memory of the numpy arrays the extension allocated (``torch.from_numpy``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..layout import STAT_COLUMNS

__all__ = ["available", "plan", "compact", "block_stats", "select_prune", "STAT_COLUMNS"]

_BUILD_HINT = (
    "prunepeft._C is not built: run `pip install -e .` in the prunepeft repository "
    "(needs a C++17 compiler and pybind11), or select the reference backend with "
    "PRUNEPEFT_BACKEND=reference"
)

_lib: ModuleType | None = None
_import_error: ImportError | None = None


def _native() -> ModuleType:
    """The extension module, imported on first use (failure is cached)."""
    global _lib, _import_error
    if _lib is None:
        if _import_error is None:
            try:
                _lib = importlib.import_module("prunepeft._C")
            except ImportError as e:
                _import_error = e
        if _lib is None:
            raise RuntimeError(f"{_BUILD_HINT} ({_import_error})") from _import_error
    return _lib


def available() -> bool:
    """Whether ``prunepeft._C`` can be imported (imports it if needed)."""
    try:
        _native()
    except RuntimeError:
        return False
    return True


def _ro(x: Any) -> Any:
    """A read-only input as something numpy reads without copying where possible."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().contiguous().numpy()
    return x


def _rw(x: torch.Tensor | None, fn: str, name: str, dtype: torch.dtype) -> np.ndarray | None:
    """An in-place argument as a numpy view of the same memory."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor (it is updated in place)")
    if x.device.type != "cpu" or x.dtype != dtype or not x.is_contiguous():
        raise ValueError(
            f"{fn}: {name} must be a contiguous CPU {dtype} tensor for the native backend "
            f"(it is updated in place), got {x.dtype} on {x.device}"
            + ("" if x.is_contiguous() else ", non-contiguous")
        )
    return x.detach().numpy()


def _float(x: torch.Tensor, fn: str, name: str) -> np.ndarray:
    """param / grad: exact float32 (no silent cast), moved to CPU if needed."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor")
    if x.dtype != torch.float32:
        raise ValueError(f"{fn}: {name} must have dtype torch.float32, got {x.dtype}")
    return x.detach().cpu().contiguous().numpy()


def _plan_to_torch(p: dict[str, Any]) -> dict[str, Any]:
    return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}


def plan(in_dim, out_dim, width, block_size, group, has_bias) -> dict[str, Any]:
    """Lay out a bank; see :func:`prunepeft.backends.reference.plan`."""
    lib = _native()
    return _plan_to_torch(
        lib.plan(_ro(in_dim), _ro(out_dim), _ro(width), _ro(block_size), _ro(group), _ro(has_bias))
    )


def compact(
    in_dim, out_dim, width, block_size, group, has_bias, keep
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Drop blocks from a bank; see :func:`prunepeft.backends.reference.compact`."""
    lib = _native()
    new, gather, block_gather = lib.compact(
        _ro(in_dim), _ro(out_dim), _ro(width), _ro(block_size), _ro(group), _ro(has_bias), _ro(keep)
    )
    return _plan_to_torch(new), torch.from_numpy(gather), torch.from_numpy(block_gather)


def block_stats(
    param: torch.Tensor,
    grad: torch.Tensor | None,
    seg,
    n_owners: int,
    threshold: float,
    sens: torch.Tensor | None = None,
    unc: torch.Tensor | None = None,
    beta1: float = 0.85,
    beta2: float = 0.85,
    accum: torch.Tensor | None = None,
    accum_beta: float = -1.0,
    n_threads: int = 0,
) -> torch.Tensor:
    """Per-owner statistics, multi-threaded and deterministic for any ``n_threads``.

    See :func:`prunepeft.backends.reference.block_stats`. ``sens``, ``unc``
    and ``accum`` must be contiguous CPU tensors (float32, float32, float64).
    ``n_threads`` (0 = all hardware threads) counts the calling thread; the
    others come from a pool that ``prunepeft._C`` starts once and reuses (a
    forked child starts its own). The GIL is released while it runs.
    """
    fn = "block_stats"
    lib = _native()
    out = lib.block_stats(
        _float(param, fn, "param"),
        None if grad is None else _float(grad, fn, "grad"),
        _ro(seg),
        int(n_owners),
        float(threshold),
        _rw(sens, fn, "sens", torch.float32),
        _rw(unc, fn, "unc", torch.float32),
        float(beta1),
        float(beta2),
        _rw(accum, fn, "accum", torch.float64),
        float(accum_beta),
        int(n_threads),
    )
    return torch.from_numpy(out)


def select_prune(scores, costs, group, group_extra, eligible, current: int, target: int) -> torch.Tensor:
    """Greedy budget-constrained selection; see :func:`prunepeft.backends.reference.select_prune`."""
    lib = _native()
    return torch.from_numpy(
        lib.select_prune(
            _ro(scores), _ro(costs), _ro(group), _ro(group_extra), _ro(eligible), int(current), int(target)
        )
    )
