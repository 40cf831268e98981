"""prunepeft's Triton kernels, importable as ``prunepeft_triton``.

The directory is named ``triton_kernels/`` in the repository; it installs under the import name
``prunepeft_triton`` so it cannot clash with another distribution's ``triton_kernels`` package.

- :mod:`prunepeft_triton.scoring`: one-pass block scoring over the bank's segment table.
- :mod:`prunepeft_triton.bottleneck`: batched block-sparse bottleneck forward / backward.
- :mod:`prunepeft_triton.compile_check`: compiles every kernel for a GPU target without a GPU.

Importing this package never imports Triton and never touches CUDA; the submodules import Triton
(and raise ImportError with an install hint without it). ``TRITON_INTERPRET=1`` must be set before
a submodule is first imported for the kernels to run on CPU tensors (Triton reads it when the
kernels are decorated).
"""

from __future__ import annotations

import functools
import importlib.util

from ._util import interpreting

__all__ = ["available", "interpreting", "unavailable_reason"]


@functools.lru_cache(maxsize=1)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device_type: str = "cuda") -> str | None:
    """Why the kernels cannot run on ``device_type`` tensors here (None if they can)."""
    if not _has_triton():
        return "Triton is not installed (`pip install triton`)"
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device is available"
    if device_type == "cpu" and not interpreting():
        return (
            "Triton kernels run on CPU tensors only in the interpreter: set TRITON_INTERPRET=1 "
            "before prunepeft's Triton kernels are first imported"
        )
    if device_type not in ("cpu", "cuda"):
        return f"no Triton kernels for {device_type} tensors"
    return None


def available(device_type: str = "cuda") -> bool:
    """Whether the kernels can run on ``device_type`` tensors (does not initialise CUDA)."""
    return unavailable_reason(device_type) is None
