"""prunepeft: find which PEFT modules to train, where and how wide, by hybrid pruning of a supernet.

Importing prunepeft never initialises CUDA and never fails because an optional piece (the C++
extension, Triton, bitsandbytes) is missing.
"""

from __future__ import annotations

from .api import (
    SearchConfig,
    SearchError,
    SearchResult,
    evaluate,
    finetune,
    init_regression_head,
    search,
    seed_everything,
)
from .backends import available_backends, get_backend
from .bank import KINDS, CandidateSpec, ModuleBank
from .criteria import CRITERIA
from .export import export_peft, load, save
from .layout import STAT_COLUMNS
from .modules import BottleneckSite
from .space import ARCHITECTURES, SearchSpace, SpaceConfig
from .supernet import Supernet, attach


def __getattr__(name: str):
    # the Trainer callback imports transformers' Trainer machinery: load it only when asked for
    if name == "PrunePEFTCallback":
        from .callback import PrunePEFTCallback

        return PrunePEFTCallback
    raise AttributeError(f"module 'prunepeft' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "CRITERIA",
    "PrunePEFTCallback",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "evaluate",
    "export_peft",
    "finetune",
    "init_regression_head",
    "load",
    "save",
    "search",
    "seed_everything",
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
