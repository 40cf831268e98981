"""Small helpers shared by the launchers (no Triton import here)."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def clamp_block(n: int, lo: int, hi: int) -> int:
    """A power-of-two block covering ``n`` if possible, within ``[lo, hi]``."""
    return max(lo, min(hi, next_pow2(n)))
