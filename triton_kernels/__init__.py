"""prunepeft's Triton kernels, importable as ``prunepeft_triton``.

The directory is named ``triton_kernels/`` in the repository; it installs under the import name
``prunepeft_triton`` so it cannot clash with another distribution's ``triton_kernels`` package.
The kernels themselves arrive with the Triton-kernels issue; importing this package never imports
Triton and never touches CUDA.
"""

from __future__ import annotations

__all__: list[str] = []
