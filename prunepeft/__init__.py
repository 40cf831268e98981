"""prunepeft: find which PEFT modules to train, where and how wide, by hybrid pruning of a supernet.

Importing prunepeft never initialises CUDA and never fails because an optional piece (the C++
extension, Triton, bitsandbytes) is missing.
"""

from __future__ import annotations

from .backends import available_backends, get_backend
from .bank import KINDS, STAT_COLUMNS, CandidateSpec, ModuleBank
from .modules import BottleneckSite
from .space import ARCHITECTURES, SearchSpace, SpaceConfig
from .supernet import Supernet, attach

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "KINDS",
    "STAT_COLUMNS",
    "BottleneckSite",
    "CandidateSpec",
    "ModuleBank",
    "SearchSpace",
    "SpaceConfig",
    "Supernet",
    "attach",
    "available_backends",
    "get_backend",
    "__version__",
]
