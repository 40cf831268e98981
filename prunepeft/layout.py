"""Names of the columns of the bank's tables (ARCHITECTURE.md §3), defined once for every layer.

The backends (C++ ``prunepeft._C``, the pure-torch reference, Triton) exchange plain int64 tables;
these names say what each column holds. Rows of ``plan["cand"]`` read as :class:`CandRow`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class CandRow(NamedTuple):
    """One row of ``plan["cand"]``: where a candidate's parameters lie in the flat bank."""

    d_off: int  # offset of D [width, in] (a start offset even for width 0)
    u_off: int  # offset of Ut [width, out]
    bd_off: int  # offset of bd [width]; -1 without bias
    bu_off: int  # offset of bu [out]; -1 without bias or with width 0
    width: int  # current (physical) width
    n_blocks: int  # width // block_size
    first_block: int  # id of its first block in the plan's block table
    group: int  # layout group (candidates sharing an input)


class Block(IntEnum):
    """Columns of ``plan["block"]`` (one row per width-block)."""

    CAND = 0
    UNIT_START = 1  # first unit of the block within its candidate
    BLOCK_SIZE = 2


class Seg(IntEnum):
    """Columns of ``plan["seg"]``: segments tile the flat bank in layout order."""

    OFFSET = 0
    LENGTH = 1
    OWNER = 2  # block id for a block's D / Ut / bd rows, num_blocks + cand for a candidate's bu


class Stat(IntEnum):
    """Columns of the per-owner statistics of ``block_stats`` (sums over the owner's elements)."""

    SUM_W2 = 0
    SUM_ABS_G = 1
    SUM_ABS_WG = 2
    SUM_WG2 = 3
    N_ZERO = 4
    N_BELOW = 5
    SUM_SENS_UNC = 6
    COUNT = 7


STAT_COLUMNS = tuple(s.name.lower() for s in Stat)
"""``("sum_w2", "sum_abs_g", "sum_abs_wg", "sum_wg2", "n_zero", "n_below", "sum_sens_unc", "count")``."""
