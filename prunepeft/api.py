"""The public entry points in one place: ``search``, ``finetune``, ``evaluate`` and their types.

Each lives in a module of its own concern: :mod:`prunepeft.config` (``SearchConfig``),
:mod:`prunepeft.searcher` (the search loop), :mod:`prunepeft.finetune` (training a fixed
configuration), :mod:`prunepeft.taskdata` (splits and batch streams), :mod:`prunepeft.evaluation`,
:mod:`prunepeft.result` (``SearchResult``) and :mod:`prunepeft.state` (resume).
"""

from __future__ import annotations

from .config import SearchConfig
from .evaluation import evaluate
from .finetune import SearchError, finetune, init_regression_head, seed_everything
from .result import SearchResult
from .scheduler import base_param_count, default_budget
from .searcher import search
from .taskdata import BatchStream, PreparedData, prepare_data

__all__ = [
    "BatchStream",
    "PreparedData",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "base_param_count",
    "default_budget",
    "evaluate",
    "finetune",
    "prepare_data",
    "search",
    "init_regression_head",
    "seed_everything",
]
