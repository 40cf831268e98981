"""The native backend (``prunepeft._C``) against the pure-torch reference.

Random banks of several sizes (odd dims, width-0 candidates, shared-input
groups), every optional path of ``block_stats`` at 1 and 2 threads, bitwise
determinism across thread counts, selection with ties and group extras, and
the error cases of both backends.

CI builds the extension, so these tests FAIL (they do not skip) when
``prunepeft._C`` cannot be imported: build it with ``pip install -e .``.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

from prunepeft.backends import native
from prunepeft.backends import reference as ref
from prunepeft.layout import CandRow, Seg, Stat

SUM_COLS = [0, 1, 2, 3, 6]  # float sums: compared with a tolerance
COUNT_COLS = [4, 5, 7]  # integer counts: compared exactly

# The native kernel forms columns 0-3 from float32 products (w*w, |w g|, (w g)^2)
# and sums them in float32 per SIMD lane over runs of 64 terms before adding the
# run into float64 (the reference works in float64 throughout). For sums of
# nonnegative terms the relative error is at most ~(64 + 2) * 2**-24 = 3.9e-6
# (typically ~1e-8); 1e-5 covers the worst case with margin. Column 6 stays in
# float64 (its products are exact) and is far inside this bound.
STATS_RTOL, STATS_ATOL = 1e-5, 1e-12


@pytest.fixture(autouse=True)
def _require_native():
    if not native.available():
        pytest.fail("prunepeft._C is not built (run `pip install -e .`); native tests fail rather than skip")


# --------------------------------------------------------------------------- helpers


def random_spec(rng: np.random.Generator, n: int, max_dim: int = 12, zero_width: bool = True) -> tuple:
    """Random candidate descriptors: non-dense group ids, shared in_dim per group."""
    n_groups = int(rng.integers(1, n + 1))
    ids = rng.choice(100, size=n_groups, replace=False)
    group = ids[rng.integers(0, n_groups, size=n)]
    in_by_group = {int(g): int(rng.integers(1, max_dim)) for g in ids}
    in_dim = np.array([in_by_group[int(g)] for g in group], dtype=np.int64)
    out_dim = rng.integers(1, max_dim, size=n)
    block_size = rng.integers(1, 5, size=n)
    width = block_size * rng.integers(0 if zero_width else 1, 5, size=n)
    has_bias = rng.random(n) < 0.5
    return in_dim, out_dim, width, block_size, group.astype(np.int64), has_bias


def assert_plan_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b) == {"cand", "block", "seg", "total"}
    assert a["total"] == b["total"]
    for k in ("cand", "block", "seg"):
        assert a[k].dtype == b[k].dtype == torch.int64, k
        assert torch.equal(a[k], b[k]), k


def unpack(flat: torch.Tensor, p: dict, spec: tuple) -> list[dict]:
    """Per-candidate D, Ut, bd, bu views of a flat bank, read through the cand table."""
    in_dim, out_dim, _, _, _, has_bias = spec
    out = []
    for i, (d_off, u_off, bd_off, bu_off, w, *_rest) in enumerate(p["cand"].tolist()):
        di, do = int(in_dim[i]), int(out_dim[i])
        out.append(
            {
                "D": flat[d_off : d_off + w * di].view(w, di),
                "Ut": flat[u_off : u_off + w * do].view(w, do),
                "bd": flat[bd_off : bd_off + w] if has_bias[i] else None,
                "bu": flat[bu_off : bu_off + do] if bu_off >= 0 else None,
            }
        )
    return out


def assert_stats_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got[:, SUM_COLS], want[:, SUM_COLS], rtol=STATS_RTOL, atol=STATS_ATOL)
    assert torch.equal(got[:, COUNT_COLS], want[:, COUNT_COLS])


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("n", [1, 3, 8, 25])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_matches_reference(n: int, seed: int) -> None:
    spec = random_spec(np.random.default_rng(seed * 100 + n), n)
    got, want = native.plan(*spec), ref.plan(*spec)
    assert_plan_equal(got, want)

    # Invariants: segments tile [0, total) in order; owners index blocks then bu's.
    seg, nb = got["seg"], got["block"].shape[0]
    ends = seg[:, Seg.OFFSET] + seg[:, Seg.LENGTH]
    assert seg.shape[0] == 0 or (seg[0, 0] == 0 and ends[-1] == got["total"])
    assert torch.equal(seg[1:, 0], ends[:-1])
    assert bool((seg[:, Seg.LENGTH] > 0).all()) and bool((seg[:, Seg.OWNER] < nb + n).all())
    # Each group's D region is one stacked [total width, in_dim] matrix: members' D's follow each other.
    rows = [CandRow(*r) for r in got["cand"].tolist()]
    for gid in set(int(g) for g in spec[4]):
        members = [i for i in range(n) if int(spec[4][i]) == gid]
        for a, b in zip(members, members[1:], strict=False):
            assert rows[b].d_off == rows[a].d_off + rows[a].width * int(spec[0][a])


def test_plan_input_types() -> None:
    spec = random_spec(np.random.default_rng(7), 6)
    want = ref.plan(*spec)
    variants = [
        tuple(x.tolist() for x in spec),
        tuple(np.asarray(x, dtype=np.int32 if x.dtype != bool else np.uint8) for x in spec),
        tuple(torch.as_tensor(x) for x in spec),
    ]
    for args in variants:
        assert_plan_equal(native.plan(*args), want)
        assert_plan_equal(ref.plan(*args), want)


# --------------------------------------------------------------------------- compact


@pytest.mark.parametrize("n", [1, 4, 12])
@pytest.mark.parametrize("keep_mode", ["random", "all", "none", "first"])
def test_compact_matches_reference(n: int, keep_mode: str) -> None:
    rng = np.random.default_rng(n)
    spec = random_spec(rng, n)
    old = native.plan(*spec)
    nb = old["block"].shape[0]
    keep = {
        "random": rng.random(nb) < 0.5,
        "all": np.ones(nb, dtype=bool),
        "none": np.zeros(nb, dtype=bool),
        "first": np.arange(nb) == 0,
    }[keep_mode]
    new, gather, block_gather = native.compact(*spec, keep)
    new_r, gather_r, block_gather_r = ref.compact(*spec, keep)
    assert_plan_equal(new, new_r)
    assert gather.dtype == block_gather.dtype == torch.int64
    assert torch.equal(gather, gather_r) and torch.equal(block_gather, block_gather_r)

    # Same layout as planning the new widths directly.
    new_width = new["cand"][:, CandRow._fields.index("width")].numpy()
    assert_plan_equal(new, native.plan(spec[0], spec[1], new_width, spec[3], spec[4], spec[5]))
    # block_gather lists the kept blocks in order.
    assert block_gather.tolist() == np.flatnonzero(keep).tolist()

    # Semantics: the gathered bank holds exactly the kept rows of every tensor.
    flat = torch.randn(old["total"], dtype=torch.float64)
    before, after = unpack(flat, old, spec), unpack(flat[gather], new, spec)
    blocks = old["block"].tolist()
    for i in range(n):
        bs = int(spec[3][i])
        kept = [b for b in np.flatnonzero(keep) if blocks[b][0] == i]
        rows = [u for b in kept for u in range(blocks[b][1], blocks[b][1] + bs)]
        assert torch.equal(after[i]["D"], before[i]["D"][rows])
        assert torch.equal(after[i]["Ut"], before[i]["Ut"][rows])
        if spec[5][i]:
            assert torch.equal(after[i]["bd"], before[i]["bd"][rows])
        if rows and spec[5][i]:
            assert torch.equal(after[i]["bu"], before[i]["bu"])
        else:
            assert after[i]["bu"] is None


# --------------------------------------------------------------------------- block_stats


def stats_bank(kind: str) -> tuple[torch.Tensor, int]:
    """A segment table and its owner count: a random plan, a bank with segments longer
    than one native chunk, or a hand-made table (unordered, gaps, empty owner)."""
    if kind == "large":  # 2 candidates, one block each, segments of 76800 > CHUNK elements
        p = ref.plan([300, 300], [256, 300], [256, 256], [256, 128], [0, 0], [True, False])
        return p["seg"], p["block"].shape[0] + 2
    if kind == "custom":
        chunk = 1 << 16
        seg = torch.tensor(
            [[10, 2 * chunk + 17, 0], [2 * chunk + 100, 7, 1], [2 * chunk + 27, 3, 0], [3 * chunk, 1000, 1]]
        )
        return seg, 3
    n = int(kind)
    spec = random_spec(np.random.default_rng(n), n, max_dim=40, zero_width=n > 1)
    p = ref.plan(*spec)
    return p["seg"], p["block"].shape[0] + n


def stats_inputs(seg: torch.Tensor, seed: int) -> dict:
    total = int((seg[:, Seg.OFFSET] + seg[:, Seg.LENGTH]).max()) + 5 if seg.shape[0] else 5
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(total, generator=g)
    param[::37] = 0.0  # exact zeros for column 4
    param[::41] *= 1e-4  # small weights for column 5
    return {
        "param": param,
        "grad": torch.randn(total, generator=g),
        "sens": torch.rand(total, generator=g),
        "unc": torch.rand(total, generator=g),
    }


@pytest.mark.parametrize("kind", ["1", "5", "20", "large", "custom"])
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("with_sens", [True, False])
def test_block_stats_matches_reference(kind: str, with_grad: bool, with_sens: bool) -> None:
    seg, n_owners = stats_bank(kind)
    x = stats_inputs(seg, seed=len(kind))
    grad = x["grad"] if with_grad else None
    want_sens, want_unc = x["sens"].clone(), x["unc"].clone()
    want = ref.block_stats(
        x["param"], grad, seg, n_owners, 1e-3,
        sens=want_sens if with_sens else None, unc=want_unc if with_sens else None, beta1=0.8, beta2=0.9,
    )  # fmt: skip
    runs = []
    for n_threads in (1, 2, 3):
        sens, unc = x["sens"].clone(), x["unc"].clone()
        got = native.block_stats(
            x["param"], grad, seg, n_owners, 1e-3,
            sens=sens if with_sens else None, unc=unc if with_sens else None, beta1=0.8, beta2=0.9,
            n_threads=n_threads,
        )  # fmt: skip
        assert_stats_close(got, want)
        if with_sens:  # same float64 operations, same rounding to float32
            assert torch.equal(sens, want_sens) and torch.equal(unc, want_unc)
        else:
            assert torch.equal(sens, x["sens"]) and not bool(got[:, Stat.SUM_SENS_UNC].any())
        runs.append((got, sens, unc))
    for got, sens, unc in runs[1:]:  # bitwise identical for every thread count
        assert torch.equal(got, runs[0][0]) and torch.equal(sens, runs[0][1]) and torch.equal(unc, runs[0][2])


@pytest.mark.parametrize("accum_beta", [-1.0, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_block_stats_accum(accum_beta: float, n_threads: int) -> None:
    seg, n_owners = stats_bank("large")
    x = stats_inputs(seg, seed=3)
    start = torch.rand(n_owners, 8, dtype=torch.float64)
    acc_n, acc_r = start.clone(), start.clone()
    for _ in range(2):
        got = native.block_stats(
            x["param"],
            x["grad"],
            seg,
            n_owners,
            0.01,
            accum=acc_n,
            accum_beta=accum_beta,
            n_threads=n_threads,
        )
        ref.block_stats(x["param"], x["grad"], seg, n_owners, 0.01, accum=acc_r, accum_beta=accum_beta)
    torch.testing.assert_close(acc_n, acc_r, rtol=STATS_RTOL, atol=STATS_ATOL)
    # The update rule itself, on the native result.
    prev = acc_n.clone()
    native.block_stats(x["param"], x["grad"], seg, n_owners, 0.01, accum=acc_n, accum_beta=accum_beta)
    expect = prev + got if accum_beta < 0 else accum_beta * prev + (1 - accum_beta) * got
    assert torch.equal(acc_n, expect)


def test_block_stats_empty_and_noncontiguous() -> None:
    # No segments: all-zero stats. Non-contiguous read-only inputs are accepted.
    param = torch.randn(20, 2)[:, 0]
    seg = torch.zeros(0, 3, dtype=torch.int64)
    for be in (native, ref):
        assert torch.equal(be.block_stats(param, None, seg, 4, 0.1), torch.zeros(4, 8, dtype=torch.float64))
    seg = torch.tensor([[0, 20, 1]])
    assert_stats_close(
        native.block_stats(param, param, seg, 2, 0.1), ref.block_stats(param, param, seg, 2, 0.1)
    )


# --------------------------------------------------------------------------- thread pool

# A bank of ~9.6 chunks whose first candidate has segments longer than one chunk (128 000 elements).
POOL_SPEC = ([1000, 1000, 300], [700, 1500, 300], [256, 64, 60], [128, 4, 3], [0, 0, 1], [True, False, True])


def pool_bank() -> tuple[dict, torch.Tensor, int]:
    p = ref.plan(*POOL_SPEC)
    assert p["total"] > 8 * native._native().CHUNK
    assert int(p["seg"][:, Seg.LENGTH].max()) > native._native().CHUNK
    return stats_inputs(p["seg"], seed=11), p["seg"], p["block"].shape[0] + 3


def _task_count() -> int:
    return len(os.listdir("/proc/self/task"))


def test_block_stats_bitwise_across_threads_multi_chunk() -> None:
    x, seg, n_owners = pool_bank()
    runs = []
    for n_threads in (1, 2, 3, 0, 2, 1):
        sens, unc = x["sens"].clone(), x["unc"].clone()
        accum = torch.ones(n_owners, 8, dtype=torch.float64)
        got = native.block_stats(
            x["param"], x["grad"], seg, n_owners, 1e-3, sens=sens, unc=unc, accum=accum, accum_beta=0.5,
            n_threads=n_threads,
        )  # fmt: skip
        runs.append((got, sens, unc, accum))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0], strict=True))
    want = ref.block_stats(
        x["param"], x["grad"], seg, n_owners, 1e-3, sens=x["sens"].clone(), unc=x["unc"].clone()
    )
    assert_stats_close(runs[0][0], want)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_pool_is_reused() -> None:
    """block_stats starts its workers once: 100 calls do not add threads."""
    x, seg, n_owners = pool_bank()
    args = (x["param"], x["grad"], seg, n_owners, 1e-3)
    before = _task_count()
    want = native.block_stats(*args, n_threads=3)  # creates (or grows) the pool
    warm = _task_count()
    assert warm - before <= max((os.cpu_count() or 1) - 1, 2)
    for i in range(100):
        assert torch.equal(native.block_stats(*args, n_threads=(0, 1, 2, 3)[i % 4]), want)
    assert _task_count() == warm


def _stats_in_child(args: tuple, want: torch.Tensor) -> None:
    """Target of a forked child: exit code 0 iff block_stats runs and gives the parent's result."""
    ok = all(torch.equal(native.block_stats(*args, n_threads=t), want) for t in (2, 0))
    sys.exit(0 if ok else 3)


@pytest.mark.parametrize("busy", [False, True], ids=["quiet", "busy"])
def test_pool_after_fork(busy: bool) -> None:
    """A child forked from a process whose pool runs (idle, or mid-call in another thread when
    busy) gets a fresh pool instead of deadlocking on the parent's."""
    x, seg, n_owners = pool_bank()
    args = (x["param"], x["grad"], seg, n_owners, 1e-3)
    want = native.block_stats(*args, n_threads=2)  # the parent's pool exists
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            native.block_stats(*args, n_threads=2)

    thread = threading.Thread(target=hammer, daemon=True) if busy else None
    if thread:
        thread.start()
    try:
        ctx = multiprocessing.get_context("fork")
        for _ in range(3 if busy else 1):
            with warnings.catch_warnings():  # Python >= 3.12 warns about fork() with threads
                warnings.simplefilter("ignore", DeprecationWarning)
                child = ctx.Process(target=_stats_in_child, args=(args, want))
                child.start()
            child.join(timeout=60)
            if child.exitcode is None:
                child.kill()
                child.join()
                pytest.fail("block_stats deadlocked in a forked child")
            assert child.exitcode == 0
    finally:
        stop.set()
        if thread:
            thread.join()
    assert torch.equal(native.block_stats(*args, n_threads=2), want)


_EXIT_WHILE_BUSY = """
import threading, time
import numpy as np
from prunepeft import _C
n = 1 << 21
p, g = np.ones(n, np.float32), np.ones(n, np.float32)
seg = np.array([[0, n, 0]], dtype=np.int64)
busy = threading.Event()
def hammer():
    while True:
        _C.block_stats(p, g, seg, 1, 1e-3, n_threads=2)
        busy.set()
threading.Thread(target=hammer, daemon=True).start()
busy.wait()
"""


def test_exit_while_a_daemon_thread_scores() -> None:
    """The interpreter exits cleanly (no abort) while a daemon thread is inside block_stats: the GIL
    is retaken outside a noexcept destructor, and the pool is shut down at exit."""
    for _ in range(3):
        r = subprocess.run(
            [sys.executable, "-c", _EXIT_WHILE_BUSY], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr[-2000:]


# --------------------------------------------------------------------------- select_prune


@pytest.mark.parametrize("m", [0, 1, 10, 200])
@pytest.mark.parametrize("seed", range(5))
def test_select_prune_matches_reference(m: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1000 * m)
    n_groups = max(1, m // 4)
    scores = rng.integers(0, 8, size=m) / 4.0  # many ties
    costs = rng.integers(0, 50, size=m)
    group = rng.integers(0, n_groups, size=m)
    extra = rng.integers(0, 30, size=n_groups)
    eligible = rng.random(m) < 0.8
    scores[~eligible & (rng.random(m) < 0.3)] = np.nan  # ignored when ineligible
    current = int(costs.sum() + extra.sum())
    for target in (current + 1, current, current * 2 // 3, current // 3, 0, -1):
        got = native.select_prune(scores, costs, group, extra, eligible, current, target)
        want = ref.select_prune(scores, costs, group, extra, eligible, current, target)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), target


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_select_prune_semantics(backend: str) -> None:
    be = native if backend == "native" else ref
    scores, costs, group, extra = [0.5, 0.1, 0.3, 0.1, 0.9], [10, 10, 10, 20, 20], [0, 0, 0, 1, 1], [5, 7]

    def run(eligible: list[bool], target: int) -> list[int]:
        return be.select_prune(scores, costs, group, extra, eligible, 100, target).tolist()

    assert run([True] * 5, 100) == []  # already at target
    assert run([True] * 5, 80) == [1, 3]  # ties broken by index
    assert run([True] * 5, 45) == [1, 3, 2, 0]  # group 0 complete frees its extra (5)
    assert run([True] * 5, 0) == [1, 3, 2, 0, 4]  # everything, still above target
    assert run([False, True, True, True, True], 46) == [1, 3, 2, 4]  # ineligible 0 blocks group 0's extra


# --------------------------------------------------------------------------- errors

SPEC = ([4, 5, 4], [3, 2, 6], [4, 2, 2], [2, 1, 2], [7, 3, 7], [True, True, False])
SEG = ref.plan(*SPEC)["seg"]
N_OWN = int(SEG[:, Seg.OWNER].max()) + 1
TOTAL = ref.plan(*SPEC)["total"]


def _spec(**changes) -> tuple:
    names = ("in_dim", "out_dim", "width", "block_size", "group", "has_bias")
    return tuple(changes.get(k, v) for k, v in zip(names, SPEC, strict=True))


def _stats(**kw) -> dict:
    args = dict(param=torch.randn(TOTAL), grad=None, seg=SEG, n_owners=N_OWN, threshold=0.1)
    args.update(kw)
    return args


def _prune(**kw) -> dict:
    args = dict(
        scores=[0.1, 0.2],
        costs=[1, 1],
        group=[0, 1],
        group_extra=[0, 0],
        eligible=[True, True],
        current=5,
        target=0,
    )
    args.update(kw)
    return args


ERROR_CASES = [
    ("plan", lambda: _spec(width=[4, 2, 3]), r"plan: width\[2\] = 3 is not a multiple of block_size\[2\]"),
    ("plan", lambda: _spec(in_dim=[4, 5, 8]), r"in_dim\[2\] = 8 differs from in_dim\[0\]"),
    ("plan", lambda: _spec(group=[7, -3, 7]), r"group\[1\] = -3 must be >= 0"),
    ("plan", lambda: _spec(block_size=[2, 0, 2]), r"block_size\[1\] = 0 must be >= 1"),
    ("plan", lambda: _spec(out_dim=[3, 0, 6]), r"out_dim\[1\] = 0 must be >= 1"),
    ("plan", lambda: _spec(width=[4, -1, 2]), r"width\[1\] = -1 must be >= 0"),
    ("plan", lambda: _spec(out_dim=[3, 2]), r"out_dim has 2 entries, expected 3"),
    ("plan", lambda: ([], [], [], [], [], []), r"at least one candidate"),
    ("plan", lambda: _spec(in_dim=[4.0, 5.0, 4.0]), r"in_dim must be an integer array"),
    ("plan", lambda: _spec(width=[[4, 2, 2]]), r"width must be 1-D"),
    ("compact", lambda: (*SPEC, [True, False]), r"compact: keep has 2 entries, expected 5"),
    ("compact", lambda: (*_spec(width=[4, 2, 1]), [True] * 5), r"compact: width\[2\] = 1"),
    ("block_stats", lambda: _stats(param=torch.randn(TOTAL, dtype=torch.float64)), r"param must have dtype"),
    ("block_stats", lambda: _stats(grad=torch.randn(TOTAL - 1)), r"grad has \d+ elements"),
    ("block_stats", lambda: _stats(n_owners=N_OWN - 1), r"seg\[\d+\] owner = \d+ is outside"),
    ("block_stats", lambda: _stats(param=torch.randn(TOTAL - 1)), r"seg\[\d+\] = .* lies outside param"),
    ("block_stats", lambda: _stats(seg=SEG[:, :2]), r"seg must have shape \(n_segs, 3\)"),
    ("block_stats", lambda: _stats(sens=torch.zeros(TOTAL)), r"sens and unc must be given together"),
    ("block_stats", lambda: _stats(sens=torch.zeros(TOTAL), unc=torch.zeros(TOTAL - 1)), r"unc has"),
    (
        "block_stats",
        lambda: _stats(
            seg=torch.tensor([[0, 4, 0], [2, 4, 1]]), sens=torch.zeros(TOTAL), unc=torch.zeros(TOTAL)
        ),
        r"seg\[0\] and seg\[1\] overlap",
    ),
    ("block_stats", lambda: _stats(beta1=1.5), r"beta1 = 1.5 must be in \[0, 1\]"),
    ("block_stats", lambda: _stats(beta2=-0.1), r"beta2 = -0.1 must be in \[0, 1\]"),
    ("block_stats", lambda: _stats(threshold=float("nan")), r"threshold must not be NaN"),
    ("block_stats", lambda: _stats(accum_beta=2.0), r"accum_beta = 2"),
    (
        "block_stats",
        lambda: _stats(accum=torch.zeros(N_OWN, 7, dtype=torch.float64)),
        r"accum must have shape",
    ),
    ("block_stats", lambda: _stats(n_threads=-1), r"n_threads = -1 must be >= 0"),
    ("block_stats", lambda: _stats(n_owners=-1), r"n_owners = -1 must be >= 0"),
    ("select_prune", lambda: _prune(scores=[0.1, float("nan")]), r"scores\[1\] = nan is not finite"),
    ("select_prune", lambda: _prune(scores=[float("inf"), 0.0]), r"scores\[0\] = inf is not finite"),
    ("select_prune", lambda: _prune(costs=[1, -2]), r"costs\[1\] = -2 must be >= 0"),
    (
        "select_prune",
        lambda: _prune(group=[0, 2]),
        r"group\[1\] = 2 is outside \[0, len\(group_extra\) = 2\)",
    ),
    ("select_prune", lambda: _prune(group_extra=[0, -1]), r"group_extra\[1\] = -1 must be >= 0"),
    ("select_prune", lambda: _prune(eligible=[True]), r"eligible has 1 entries, expected 2"),
]


@pytest.mark.parametrize(
    "fn, make, match", ERROR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ERROR_CASES)]
)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_errors(backend: str, fn: str, make, match: str) -> None:
    be = native if backend == "native" else ref
    args = make()
    with pytest.raises(ValueError, match=match):
        if isinstance(args, dict):
            getattr(be, fn)(**args)
        else:
            getattr(be, fn)(*args)


def test_native_inplace_arguments_must_be_cpu_contiguous() -> None:
    args = _stats()
    bad = torch.zeros(TOTAL * 2)[::2]
    with pytest.raises(ValueError, match="sens must be a contiguous CPU"):
        native.block_stats(**args, sens=bad, unc=torch.zeros(TOTAL))
    with pytest.raises(ValueError, match="accum must be a contiguous CPU"):
        native.block_stats(**args, accum=torch.zeros(N_OWN, 8))  # float32


def test_import_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing _C never breaks the import; a call says how to build it."""
    monkeypatch.setitem(sys.modules, "prunepeft._C", None)  # makes `import prunepeft._C` fail
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_import_error", None)
    assert native.available() is False
    with pytest.raises(RuntimeError, match=r"prunepeft\._C is not built: run `pip install -e \.`"):
        native.plan(*SPEC)


def test_forced_reference_backend_scores_on_cuda_too(monkeypatch):
    """PRUNEPEFT_BACKEND (or an explicit ModuleBank backend) decides scoring on every device."""
    import prunepeft.backends as B

    monkeypatch.setattr(B, "available_backends", lambda: ("reference", "native", "triton"))
    monkeypatch.delenv("PRUNEPEFT_BACKEND", raising=False)
    assert B.scoring_backend_name("cuda", "native", explicit=False) == "triton"
    assert B.scoring_backend_name("cpu", "native", explicit=False) == "native"
    assert B.scoring_backend_name("cuda", "reference", explicit=True) == "reference"
    monkeypatch.setenv("PRUNEPEFT_BACKEND", "reference")
    assert B.scoring_backend_name("cuda", "reference", explicit=False) == "reference"
