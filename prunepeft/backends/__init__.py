"""Backend dispatch for the bank's kernels.

``reference`` is pure torch (the oracle and CPU fallback); ``native`` is the C++ extension
``prunepeft._C``; ``triton`` the GPU kernels (scoring on the tensors' device; host metadata ops are
native's). The backend is chosen at import: ``native`` when the extension is built, else
``reference``; set ``PRUNEPEFT_BACKEND=reference|native|triton`` to force one. Importing this module never
fails because an optional piece is missing; asking for a backend that is not available raises a
``RuntimeError`` that says how to get it.
"""

from __future__ import annotations

import os
from types import ModuleType

from . import native, reference
from . import triton as triton_backend

BACKENDS = ("reference", "native", "triton")


def available_backends() -> tuple[str, ...]:
    """Names of the backends usable on this machine."""
    ok = {"reference": True, "native": native.available(), "triton": triton_backend.available("cuda")}
    return tuple(name for name in BACKENDS if ok[name])


def forced_backend() -> str | None:
    """The backend ``$PRUNEPEFT_BACKEND`` forces, if any (lower case)."""
    return os.environ.get("PRUNEPEFT_BACKEND", "").strip().lower() or None


def scoring_backend_name(device_type: str, bank_backend: str, explicit: bool) -> str:
    """Which backend scores a bank whose parameters live on ``device_type``.

    On CUDA the fused Triton pass reads parameters and gradients where they are, unless a backend was
    chosen explicitly (``ModuleBank(backend=...)`` or ``$PRUNEPEFT_BACKEND``): then that one scores,
    on every device (``reference`` and ``native`` copy to the host).
    """
    if explicit or forced_backend() is not None:
        return bank_backend
    if device_type == "cuda" and "triton" in available_backends():
        return "triton"
    return bank_backend


def get_backend(name: str | None = None) -> ModuleType:
    """Return the backend module ``name`` (default: ``$PRUNEPEFT_BACKEND`` or the best available)."""
    name = name or os.environ.get("PRUNEPEFT_BACKEND") or ("native" if native.available() else "reference")
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown prunepeft backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "native" and not native.available():
        raise RuntimeError(
            "PRUNEPEFT_BACKEND=native but the C++ extension prunepeft._C is not built; "
            "run `pip install -e .` in the prunepeft checkout (needs a C++17 compiler and pybind11)"
        )
    if name == "triton":
        if triton_backend.unavailable_reason("cuda") is not None and not triton_backend.available("cpu"):
            raise RuntimeError(
                f"PRUNEPEFT_BACKEND=triton but {triton_backend.unavailable_reason('cuda')}; "
                "install Triton (`pip install triton`), or on a CPU machine set TRITON_INTERPRET=1"
            )
        return triton_backend
    return native if name == "native" else reference
