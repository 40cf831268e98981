"""Training step time and peak memory per search round, against peft LoRA of equal size and sites
(issue 12; figure 2 of the foundation issue). all-MiniLM-L6-v2, AdamW, batch 16 x 128 tokens.

States of the supernet (``common.minilm_supernet_config``: LoRA r=32 on q, k, v and the three
``dense`` linears, serial adapters of width 64 after attention and the FFN, blocks of 4):

- ``full``: the whole supernet (1.92 M parameters);
- ``p75``, ``p50``, ``p25``: successive search rounds, each pruned and compacted to 75 / 50 / 25 %
  of the supernet's parameters (Taylor scores |w.g| from two training steps of the state before);
- ``lora_qv_r8``: compacted to exactly peft LoRA r=8 on query, value in every layer (isolates
  prunepeft's own overhead).

Against each state: ``peft_equal_<state>``, peft ``LoraConfig`` with ``rank_pattern`` on exactly the
sites that carry candidates in that state, each site's LoRA rank chosen so its parameters equal the
state's parameters at that site (adapter parameters included: peft LoRA has no serial adapters, so
their site gets the LoRA of the same count); ranks are integers, the largest-remainder rounding
keeps the total within one rank of a site of the state's. For ``lora_qv_r8`` that is peft LoRA r=8
on q, v itself. Ablations of the full supernet: ``full_untapped`` (each site calls its linear's own
forward: the linear and the candidates' down-projection are not one node, ``prunepeft.ops.linear_tap``,
so backward sums two input gradients and the up-projection's ``addmm`` copies the linear's output),
``full_unfused`` (also each site's bottleneck output added to its linear's output by a separate add,
not inside the up-projection GEMM),
``full_per_site`` (the reference path without the layout groups' shared down-projection GEMM) and
``full_narrow_per_site`` (none of these: also every slab a plain ``flat.narrow`` view, as before
issue 12).

The floor of the full supernet's step, for the 0.85x goal: ``base_frozen`` is the base model alone,
no parameter trainable, the outputs of the sites whose input needs no gradient (layer 0's q, k, v)
made to require one, so its forward and backward do the base model's share of the supernet's step
and nothing else; ``floor_full`` adds the fewest FLOPs the full supernet's candidates need with dense
GEMMs (forward, both weight gradients, the bottleneck's gradient, the input's where it is needed:
``adapter_gflop``) at the best rate the base model's own GEMM shapes reach on this machine
(``gemm_gflops``, an upper bound for the thin bottleneck GEMMs) and the faster of torch's foreach and
fused AdamW over the same parameters in one flat tensor (``adamw_ms``). No implementation that keeps the
base model's ops as they are steps faster than ``floor_full`` (CPU only).

Step time, per variant and thread count (1 and 2): the median of ``--repeat`` training steps
(zero_grad, forward, backward, AdamW step) after ``--warmup`` steps, every variant in this process,
taking turns (one step each per round), so a change in the machine's load hits all alike.

Memory, once per variant, each in a fresh worker process (``--worker``) so the numbers are its own:
the peak memory above the loaded model of three training steps (``peak_train_mb``), then of three
search steps (``peak_search_mb``: for a supernet with the scoring pass a search runs after each
backward, ``ModuleBank.accumulate_stats``) — CPU: the peak RSS, ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, minus the RSS before the first step; CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before; the megabytes the ATen ops of one
training step allocate (fresh outputs) and write (fresh and in-place outputs), counted by a
``TorchDispatchMode``: a proxy of memory traffic; and for supernet states the median time of the
scoring pass (``score_ms``).

``--quick`` (about a minute on an idle machine): the full, p50 and LoRA-r8-shape states with
their peft peers, the before-issue-12 ablation and ``base_frozen``, 4 x 32 tokens, 3 repeats,
1 thread; memory only
for the full supernet and its peft peer. ``--inprocess`` measures memory in this process instead of
workers (indicative only: the allocator keeps memory between variants).

    python bench/bench_step.py [--repeat 15] [--threads 1 2] [--device cpu|cuda]
    python bench/bench_step.py --quick

Rows go to ``results/step_time.csv`` (``--quick``: ``results/step_time_quick.csv``) with machine,
versions and commit; the plot of step time against trainable parameters per search round to
``results/step_time.png`` (``_quick.png``). The goals it reports against: full supernet <= 0.85 x
peft LoRA of equal size and sites; compacted to LoRA r8 q,v's shape <= 1.00 x peft LoRA r8 q,v;
step time falling monotonically with the rounds; peak memory of a search step <= peft LoRA of equal
size + 10 %. On a shared, loaded machine the times are noisy: read them as such.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, append_rows, load_minilm, median_time, minilm_supernet_config, versions  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
ROUNDS = (("p75", 0.75), ("p50", 0.50), ("p25", 0.25))
FIELDS = [
    "variant", "state", "kind", "trainable", "threads_run", "seconds", "ratio_to_peft_equal",
    "peak_train_mb", "peak_search_mb", "alloc_mb", "written_mb", "score_ms", "adapter_gflop", "gemm_gflops", "adamw_ms",
    "batch", "repeat", "device", "mode", "versions",
]  # fmt: skip
FALLBACK_TEXT = (
    "a gripping , funny and ultimately moving film",
    "the plot is thin and the jokes fall flat for most of its running time",
    "an intelligent , well acted drama that never quite finds its footing",
    "one of the most beautiful films of the year , and one of the saddest",
)


# --------------------------------------------------------------------------- inputs


def make_batch(tokenizer, n=16, length=128):
    """``n`` SST-2 training sentences padded to ``length`` tokens (a fixed fallback text without the
    shared data, e.g. in CI: the step time depends on the shapes only)."""
    path = os.path.join(SHARED, "glue", "SST-2", "train.tsv")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
        texts, labels = [r[0] for r in rows], [int(r[1]) for r in rows]
    else:
        texts = [FALLBACK_TEXT[i % len(FALLBACK_TEXT)] for i in range(n)]
        labels = [i % 2 for i in range(n)]
    enc = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    enc["labels"] = torch.tensor(labels)
    return dict(enc)


def narrow_views(self, spans):
    """The slab views before issue 12: plain ``narrow`` views of ``flat`` (autograd makes one
    full-size zero gradient per view and sums them)."""
    return tuple(self.flat.narrow(0, off, n).view(shape) for off, n, shape in spans)


# --------------------------------------------------------------------------- states


def build_supernet(model, keep=None, narrow=False, per_site=False, untapped=False):
    """The supernet on ``model``, compacted to the original block ids ``keep`` (None: all)."""
    from prunepeft import attach
    from prunepeft.modules import BottleneckSite

    handle = attach(model, minilm_supernet_config())
    bank = handle.bank
    if untapped:  # every site calls its linear's own forward (the path before linear_tap)
        for m in model.modules():
            if isinstance(m, BottleneckSite):
                m._tapped_base = lambda x, bank: None
    if keep is not None:
        mask = torch.zeros(bank.num_blocks, dtype=torch.bool)
        mask[torch.tensor(keep, dtype=torch.int64)] = True
        bank.compact(mask)
    if narrow:
        bank._views = types.MethodType(narrow_views, bank)
    if per_site:
        bank.input_group = lambda site: None
    return handle


def build_peft(model, ranks):
    """peft LoRA on exactly the sites in ``ranks`` (full module name -> rank)."""
    from peft import LoraConfig, get_peft_model

    names = sorted(ranks)
    r0 = ranks[names[0]]
    cfg = LoraConfig(
        task_type="SEQ_CLS", r=r0, lora_alpha=2 * r0, target_modules=names,
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        alpha_pattern={re.escape(n): 2 * r for n, r in ranks.items()},
    )  # fmt: skip
    return get_peft_model(model, cfg)


def equal_lora_ranks(model, site_params: dict[str, int]) -> dict[str, int]:
    """Per site the LoRA rank whose parameters (rank x (in + out)) equal the state's parameters at
    the site; largest-remainder rounding keeps the total as close as integers allow."""
    cost = {}
    for site in site_params:
        m = model.get_submodule(site)
        m = getattr(m, "base", m)  # a BottleneckSite wraps the linear
        cost[site] = m.in_features + m.out_features
    ideal = {s: p / cost[s] for s, p in site_params.items()}
    ranks = {s: max(1, math.floor(v)) for s, v in ideal.items()}
    rest = sum(site_params.values()) - sum(ranks[s] * cost[s] for s in ranks)
    for s in sorted(ideal, key=lambda s: ideal[s] - math.floor(ideal[s]), reverse=True):
        if abs(rest - cost[s]) < abs(rest):
            ranks[s] += 1
            rest -= cost[s]
    return ranks


def site_params(bank) -> dict[str, int]:
    """Trainable parameters per site in the bank's current state."""
    out: dict[str, int] = {}
    for c, spec in enumerate(bank.specs):
        n = bank.candidate_params(c)
        if n:
            out[spec.site] = out.get(spec.site, 0) + n
    return out


def sites_without_input_grad(model, bank, batch) -> list[str]:
    """Sites whose input needs no gradient in a training step (those reading the embeddings'
    output): one forward with a pre-hook on every site."""
    seen: dict[str, bool] = {}
    hooks = []
    for site in sorted({s.site for s in bank.specs}):

        def pre(mod, args, site=site):
            seen[site] = bool(args[0].requires_grad)

        hooks.append(model.get_submodule(site).register_forward_pre_hook(pre))
    try:
        model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return sorted(s for s, grad in seen.items() if not grad)


def adapter_flops(bank, tokens: int, no_input_grad) -> int:
    """The fewest FLOPs one training step can spend in the bank's live candidates with dense GEMMs:
    per candidate of live width ``w`` (``in`` -> ``w`` -> ``out``), forward ``2 N w (in + out)``;
    backward the two weight gradients ``2 N w (in + out)``, the bottleneck's gradient ``2 N w out``
    and, unless the site's input needs no gradient, the input's ``2 N w in``. Biases, activations
    and the optimizer are left out, so it is a lower bound."""
    no_dx = set(no_input_grad)
    total = 0
    for c, w in enumerate(bank.effective_widths()):
        if not w:
            continue
        s = bank.specs[c]
        total += 2 * tokens * w * (2 * (s.in_dim + s.out_dim) + s.out_dim)
        if s.site not in no_dx:
            total += 2 * tokens * w * s.in_dim
    return total


def gemm_peak_gflops(base, tokens: int, repeat: int = 5) -> float:
    """The best GFLOP/s of the base model's own linear shapes at the current thread count, over the
    three GEMM layouts of a linear's training step (forward ``X W^T``, input gradient ``dY W``, weight
    gradient ``dY^T X``): an upper bound on what any bottleneck GEMM reaches."""
    shapes = sorted(
        {(m.in_features, m.out_features) for m in base.modules() if isinstance(m, torch.nn.Linear)}
    )
    best = 0.0
    for d_in, d_out in shapes:
        x, dy, w = torch.randn(tokens, d_in), torch.randn(tokens, d_out), torch.randn(d_out, d_in)
        for a, b in ((x, w.t()), (dy, w), (dy.t(), x)):
            t = median_time(lambda a=a, b=b: torch.mm(a, b), repeat=repeat)
            best = max(best, 2 * tokens * d_in * d_out / t / 1e9)
    return best


def search_states(base, batch, quick: bool) -> list[dict]:
    """The states a search passes through: the full supernet, then rounds pruned (Taylor scores of
    two training steps each) and compacted to 75 / 50 / 25 % of it; then LoRA r8 q,v's shape.
    Each: name, kept original block ids, trainable parameters, the equal peft LoRA's ranks."""
    model = copy.deepcopy(base)
    handle = build_supernet(model)
    bank = handle.bank
    opt = handle.optimizer(lr=1e-4)
    full = bank.num_params()
    no_dx = sites_without_input_grad(model, bank, batch)
    tokens = int(batch["input_ids"].numel())
    states = [dict(state="full", keep=None, trainable=full, ranks=equal_lora_ranks(model, site_params(bank)),
                   no_dx=no_dx, adapter_flops=adapter_flops(bank, tokens, no_dx))]  # fmt: skip
    rounds = ROUNDS[1:2] if quick else ROUNDS
    for name, frac in rounds:
        bank.stats = None
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            bank.accumulate_stats()
            opt.step()
        nb = bank.num_blocks
        scores = bank.stats[:nb, 2] / bank.stats[:nb, 7].clamp_min(1)
        handle.prune_to_budget(int(full * frac), scores, optimizer=opt)
        states.append(dict(state=name, keep=bank.orig_block.tolist(), trainable=bank.num_params(),
                           ranks=equal_lora_ranks(model, site_params(bank))))  # fmt: skip
    # LoRA r8 on q, v in every layer
    model = copy.deepcopy(base)
    handle = build_supernet(model)
    bank = handle.bank
    keep = []
    for c, spec in enumerate(bank.specs):
        if spec.kind == "lora" and spec.role in ("q", "v"):
            blocks = list(bank.candidate_blocks(c))
            keep += blocks[: 8 // spec.block_size]
    mask = torch.zeros(bank.num_blocks, dtype=torch.bool)
    mask[keep] = True
    bank.set_block_mask(mask)
    states.append(dict(state="lora_qv_r8", keep=sorted(keep), trainable=bank.num_params(),
                       ranks={bank.specs[c].site: 8 for c in range(len(bank.specs))
                              if bank.specs[c].kind == "lora" and bank.specs[c].role in ("q", "v")}))  # fmt: skip
    return states


def variants(states: list[dict], quick: bool) -> list[dict]:
    out = []
    for st in states:
        out.append(dict(variant=f"supernet_{st['state']}", kind="supernet", **st))
        if st["state"] == "full":
            extra = [("full_narrow_per_site", True, True, True, True)] if quick else [
                ("full_untapped", False, False, False, True), ("full_unfused", False, False, True, True),
                ("full_per_site", False, True, False, False), ("full_narrow_per_site", True, True, True, True)]  # fmt: skip
            for name, narrow, per_site, unfused, untapped in extra:
                out.append(dict(variant=f"supernet_{name}", kind="supernet", narrow=narrow, per_site=per_site,
                                unfused=unfused, untapped=untapped, **st))  # fmt: skip
        peft_name = "peft_lora_qv_r8" if st["state"] == "lora_qv_r8" else f"peft_equal_{st['state']}"
        out.append(dict(variant=peft_name, kind="peft", **st))
        if st["state"] == "full":  # the base model's own work in the full supernet's step
            out.append(dict(variant="base_frozen", kind="base", **st))
    return out


# --------------------------------------------------------------------------- measuring


def _rss_kb() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _Traffic:
    """Megabytes of tensors the ATen ops allocate (fresh outputs) and write (fresh + in-place)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        traffic = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                schema = func._schema
                view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                n = sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
                if not view:
                    traffic.written += n
                    if not schema.is_mutable:
                        traffic.alloc += n
                return out

        self.mode, self.alloc, self.written = Mode(), 0, 0


@contextlib.contextmanager
def _unfused_residual():
    """The reference path as before the fused residual: ``y + bottleneck`` as two ops (for this
    variant's forwards only; the variants take turns, so the others keep the fused path)."""
    import prunepeft.ops as ops

    fused = ops._up

    def up(h, ut, pieces, unit_scale, h_abs_sum, acc=None, inplace=False):
        out = fused(h, ut, pieces, unit_scale, h_abs_sum)
        return out if acc is None else acc + out.to(acc.dtype)

    ops._up = up
    try:
        yield
    finally:
        ops._up = fused


def prepare(v: dict, base, batch, device: str):
    """Variant ``v`` on a copy of ``base``: ``(step, trainable, bank)``, ``step()`` one training step."""
    model = copy.deepcopy(base).to(device)
    batch = {k: t.to(device) for k, t in batch.items()}
    if v["kind"] == "base":
        # no trainable parameter; the outputs of the sites whose input needs no gradient require one,
        # so backward runs through the base model exactly as far as the supernet's does
        for p in model.parameters():
            p.requires_grad_(False)
        for site in v["no_dx"]:
            model.get_submodule(site).register_forward_hook(lambda mod, args, out: out.requires_grad_())

        def step(mode: str = "train"):
            model(**batch).loss.backward()

        return step, 0, None
    if v["kind"] == "peft":
        model = build_peft(model, v["ranks"])
        trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        params = [p for p in model.parameters() if p.requires_grad]
        bank = None
    else:
        handle = build_supernet(
            model, v.get("keep"), v.get("narrow", False), v.get("per_site", False), v.get("untapped", False)
        )
        bank, trainable = handle.bank, handle.num_trainable()
        params = list(handle.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    unfused = contextlib.nullcontext if not v.get("unfused") else _unfused_residual

    def step(mode: str = "train"):
        """``train``: one training step; ``search``: with the scoring pass a search round runs
        between backward and the optimizer step; ``backward``: forward and backward only."""
        if mode != "backward":
            opt.zero_grad(set_to_none=True)
        with unfused():
            loss = model(**batch).loss
        loss.backward()
        if mode == "search" and bank is not None:
            bank.accumulate_stats()
        if mode != "backward":
            opt.step()

    return step, trainable, bank


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(steps: dict, threads: list[int], repeat: int, warmup: int, device: str) -> dict:
    """Median seconds per step of every variant at every thread count. The variants take turns
    (one step each, ``repeat`` rounds), so a change in the machine's load hits them all alike."""
    out = {}
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(warmup):
            for step in steps.values():
                step()
        times = {name: [] for name in steps}
        for _ in range(repeat):
            for name, step in steps.items():
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            out[(name, t)] = statistics.median(ts)
    torch.set_num_threads(threads[0])
    return out


def measure_memory(v: dict, base, batch, device: str, steps: int = 3) -> dict:
    """Peak memory above the loaded model of ``steps`` training steps of a fresh variant, then of
    ``steps`` search steps (with the scoring pass, for a supernet); the megabytes one training
    step's ops allocate / write; and (supernet) the fused scoring pass's time."""
    cuda = device == "cuda"
    step, trainable, bank = prepare(v, base, batch, device)
    gc.collect()

    def start():
        if cuda:
            _sync(device)
            torch.cuda.reset_peak_memory_stats()
            return True
        return _reset_peak()

    def peak_mb(base_mem):
        if cuda:
            return round((torch.cuda.max_memory_allocated() - base_mem) / 2**20, 1)
        return round((_peak_kb() - base_mem) / 1024, 1)

    base_mem = torch.cuda.memory_allocated() if cuda else (_rss_kb() or 0)
    if not start():
        base_mem = _peak_kb()  # the peak cannot be reset: deltas are lower bounds
    for _ in range(steps):
        step("train")
    peak_train = peak_mb(base_mem)
    peak_search = ""
    if bank is not None and start():
        for _ in range(steps):
            step("search")
        peak_search = peak_mb(base_mem)
    score_ms = ""
    if bank is not None:  # the fused scoring pass a search runs after each backward
        step("backward")
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            bank.accumulate_stats()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        score_ms = round(statistics.median(ts) * 1e3, 3)
    traffic = _Traffic()
    with traffic.mode:
        step()
    return dict(peak_train_mb=peak_train, peak_search_mb=peak_search or peak_train,
                alloc_mb=round(traffic.alloc / 2**20, 1), written_mb=round(traffic.written / 2**20, 1),
                score_ms=score_ms)  # fmt: skip


def adamw_seconds(n: int, repeat: int = 7) -> float:
    """The fastest AdamW step over ``n`` parameters held as one flat tensor (the cheapest layout),
    the better of torch's ``foreach`` and ``fused`` implementations, at the current thread count."""
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opts = [torch.optim.AdamW([p], lr=1e-4, **{impl: True}) for impl in ("foreach", "fused")]
    return min(median_time(opt.step, repeat=repeat) for opt in opts)


def floor_rows(full: dict, base, secs: dict, threads: list[int], tokens: int) -> list[dict]:
    """Per thread count, the least step time of the full supernet: the base model's own work
    (``base_frozen``, measured) plus :func:`adapter_flops` at the base's best GEMM rate
    (:func:`gemm_peak_gflops`) plus the fastest AdamW step over its parameters
    (:func:`adamw_seconds`). An implementation that keeps the base model's ops as they are cannot
    step faster; its ratio to ``peft_equal_full`` bounds the full-supernet goal from below."""
    gflop = full["adapter_flops"] / 1e9
    out = []
    before = torch.get_num_threads()
    for t in threads:
        torch.set_num_threads(t)
        rate = gemm_peak_gflops(base, tokens)
        opt_s = adamw_seconds(full["trainable"])
        out.append(dict(variant="floor_full", state="full", kind="floor", trainable=full["trainable"], threads_run=t,
                        seconds=secs[("base_frozen", t)] + gflop / rate + opt_s, adapter_gflop=round(gflop, 2),
                        gemm_gflops=round(rate, 1), adamw_ms=round(opt_s * 1e3, 2), peak_train_mb="",
                        peak_search_mb="", alloc_mb="", written_mb="", score_ms=""))  # fmt: skip
    torch.set_num_threads(before)
    return out


def worker(spec: str) -> None:
    a = json.loads(spec)
    torch.manual_seed(0)
    torch.set_num_threads(a["threads"])
    base, tok = load_minilm()
    batch = make_batch(tok, *a["batch"])
    print("MEM " + json.dumps(measure_memory(a["variant"], base, batch, a["device"])))


# --------------------------------------------------------------------------- output


STAMP = ["date", "machine", "torch", "threads", "commit"]  # common.stamp()'s columns, appended last


def _csv_ready(name: str) -> list[str]:
    """Make ``results/<name>.csv`` take rows of :data:`FIELDS`: when the file has another header (an
    older layout), rewrite it as ``FIELDS + extra + STAMP``, its rows kept and columns matched by
    name. Returns the extra (old) columns, which appended rows must carry (empty) to line up."""
    path = RESULTS / f"{name}.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        old, rows = list(reader.fieldnames or []), list(reader)
    extra = [c for c in old if c not in FIELDS and c not in STAMP]
    header = FIELDS + extra + STAMP
    if old != header:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)
    return extra


def write_rows(name: str, rows: list[dict]) -> None:
    extra = _csv_ready(name)
    before = torch.get_num_threads()
    for t in sorted({r["threads_run"] for r in rows}):  # the stamp's "threads" is the step's
        torch.set_num_threads(t)
        out = [
            {**{k: r.get(k, "") for k in FIELDS}, **dict.fromkeys(extra, "")}
            for r in rows
            if r["threads_run"] == t
        ]
        path = append_rows(name, out)
    torch.set_num_threads(before)
    print("wrote", path)


def plot(rows: list[dict], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    threads = sorted({r["threads_run"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False)
    for ax, t in zip(axes[0], threads, strict=True):
        rs = [r for r in rows if r["threads_run"] == t]
        sup = [r for r in rs if r["kind"] == "supernet" and r["variant"] == f"supernet_{r['state']}"]
        rounds = [r for r in sup if r["state"] != "lora_qv_r8"]
        peft = {r["state"]: r for r in rs if r["kind"] == "peft"}
        ax.plot([r["trainable"] for r in rounds], [r["seconds"] * 1e3 for r in rounds], "o-",
                label="prunepeft, per search round")  # fmt: skip
        for r in rounds:
            ax.annotate(
                r["state"], (r["trainable"], r["seconds"] * 1e3), textcoords="offset points", xytext=(4, 4)
            )
        eq = [peft[r["state"]] for r in rounds if r["state"] in peft]
        ax.plot([r["trainable"] for r in eq], [r["seconds"] * 1e3 for r in eq], "s--",
                label="peft LoRA, equal size and sites")  # fmt: skip
        for r in sup:
            if r["state"] == "lora_qv_r8":
                ax.plot(
                    [r["trainable"]],
                    [r["seconds"] * 1e3],
                    "o",
                    color="C2",
                    label="prunepeft, LoRA r8 q,v shape",
                )
        if "lora_qv_r8" in peft:
            r = peft["lora_qv_r8"]
            ax.plot([r["trainable"]], [r["seconds"] * 1e3], "s", color="C3", label="peft LoRA r8 q,v")
        old = [r for r in rs if r["variant"] == "supernet_full_narrow_per_site"]
        if old:
            ax.plot(
                [old[0]["trainable"]],
                [old[0]["seconds"] * 1e3],
                "x",
                color="k",
                label="full, before issue 12",
            )
        floor = [r for r in rs if r["variant"] == "floor_full"]
        if floor:
            ax.plot([floor[0]["trainable"]], [floor[0]["seconds"] * 1e3], "_", color="C4", markersize=14,
                    label="floor of the full supernet")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("ms / training step (median)")
        ax.set_title(f"all-MiniLM-L6-v2, {t} thread{'s' if t > 1 else ''}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


def report(rows: list[dict]) -> None:
    """The ratios and the goals (measured, not claimed: the times are as noisy as the machine)."""
    for t in sorted({r["threads_run"] for r in rows}):
        rs = {r["variant"]: r for r in rows if r["threads_run"] == t}
        print(f"\n{t} thread(s):")
        for r in rows:
            if r["threads_run"] == t:
                print(f"  {r['variant']:34s} {r['trainable']:>10,} params  {r['seconds'] * 1e3:8.1f} ms  "
                      f"x{r['ratio_to_peft_equal']:<6} peak train {r['peak_train_mb']!s:>6} / search "
                      f"{r['peak_search_mb']!s:>6} MB  alloc {r['alloc_mb']!s:>7} MB"
                      f"  written {r['written_mb']!s:>7} MB  score {r['score_ms']!s:>7} ms")  # fmt: skip
        goals = []
        if "supernet_full" in rs and "peft_equal_full" in rs:
            x = rs["supernet_full"]["seconds"] / rs["peft_equal_full"]["seconds"]
            goals.append(("full supernet <= 0.85x peft LoRA of equal size and sites", f"{x:.2f}x", x <= 0.85))
            if "floor_full" in rs:
                f = rs["floor_full"]
                y = f["seconds"] / rs["peft_equal_full"]["seconds"]
                print(f"  floor of the full supernet: base model's own work {rs['base_frozen']['seconds'] * 1e3:.0f} ms"
                      f" + {f['adapter_gflop']} GFLOP of candidates at {f['gemm_gflops']} GFLOP/s"
                      f" + AdamW {f['adamw_ms']} ms"
                      f" = {f['seconds'] * 1e3:.0f} ms = {y:.2f}x peft equal "
                      f"({'the 0.85x goal is out of reach' if y > 0.85 else 'the floor does not rule the 0.85x goal out'}"
                      " with the base model's ops unchanged)")  # fmt: skip
            sup, peft = rs["supernet_full"], rs["peft_equal_full"]
            if peft["peak_train_mb"] not in ("", 0, 0.0):
                m = sup["peak_search_mb"] / peft["peak_train_mb"]
                goals.append(("peak memory of a search step <= peft equal + 10 %", f"{m:.2f}x", m <= 1.10))
                m = sup["peak_train_mb"] / peft["peak_train_mb"]
                goals.append(("(training step only, without the scoring pass)", f"{m:.2f}x", m <= 1.10))
        if "supernet_lora_qv_r8" in rs and "peft_lora_qv_r8" in rs:
            x = rs["supernet_lora_qv_r8"]["seconds"] / rs["peft_lora_qv_r8"]["seconds"]
            goals.append(("compacted to LoRA r8 q,v <= 1.00x peft LoRA r8 q,v", f"{x:.2f}x", x <= 1.0))
        rounds = [
            rs[f"supernet_{s}"]["seconds"] for s in ("full", "p75", "p50", "p25") if f"supernet_{s}" in rs
        ]
        if len(rounds) > 1:
            mono = all(a > b for a, b in zip(rounds, rounds[1:], strict=False))
            goals.append(("step time falls monotonically over the rounds",
                          " > ".join(f"{s * 1e3:.0f}" for s in rounds) + " ms", mono))  # fmt: skip
        for what, value, ok in goals:
            print(f"  goal: {what}: {value} -> {'met' if ok else 'NOT met'} (this run)")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="a quick look: 4 x 32 tokens, 3 repeats, 1 thread, few variants"
    )
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per variant and thread count (15)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (3)")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (1 2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--inprocess", action="store_true", help="memory measured in this process (indicative only)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    quick = args.quick
    repeat = args.repeat or (3 if quick else 15)
    warmup = args.warmup or (1 if quick else 3)
    threads = args.threads or ([1] if quick else [1, 2])
    shape = (4, 32) if quick else (16, 128)
    inprocess = args.inprocess
    t_start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(threads[0])
    base, tok = load_minilm()
    batch = make_batch(tok, *shape)
    states = search_states(base, batch, quick)
    vs = variants(states, quick)
    mem = {}
    for v in vs:  # memory first, each variant in its own process (or here with --inprocess)
        if quick and v["variant"] not in ("supernet_full", "peft_equal_full"):
            mem[v["variant"]] = dict(
                peak_train_mb="", peak_search_mb="", alloc_mb="", written_mb="", score_ms=""
            )
        elif inprocess:
            mem[v["variant"]] = measure_memory(v, base, batch, args.device)
            gc.collect()
        else:
            spec = json.dumps(dict(variant=v, batch=shape, threads=threads[0], device=args.device))
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", spec], capture_output=True, text=True
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEM ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"worker for {v['variant']} failed (exit {proc.returncode})")
            mem[v["variant"]] = json.loads(lines[-1][4:])
        print(f"{v['variant']:34s} {mem[v['variant']]}", flush=True)
    steps, trainable = {}, {}
    for v in vs:
        steps[v["variant"]], trainable[v["variant"]], _ = prepare(v, base, batch, args.device)
    secs = time_round_robin(steps, threads, repeat, warmup, args.device)
    rows = [
        {**mem[v["variant"]], **dict(variant=v["variant"], state=v["state"], kind=v["kind"],
                                     trainable=trainable[v["variant"]], threads_run=t, seconds=secs[(v["variant"], t)])}
        for t in threads
        for v in vs
    ]  # fmt: skip
    if args.device == "cpu":
        rows += floor_rows(states[0], base, secs, threads, int(batch["input_ids"].numel()))
    for r in rows:
        peer = "peft_lora_qv_r8" if r["state"] == "lora_qv_r8" else f"peft_equal_{r['state']}"
        ref = next((q for q in rows if q["variant"] == peer and q["threads_run"] == r["threads_run"]), None)
        r["ratio_to_peft_equal"] = round(r["seconds"] / ref["seconds"], 3) if ref else ""
        r.update(batch=f"{shape[0]}x{shape[1]}", repeat=repeat, device=args.device,
                 mode="quick" if quick else "full", versions=versions())  # fmt: skip
    report(rows)
    name = "step_time_quick" if quick else "step_time"
    write_rows(name, rows)
    plot(rows, RESULTS / f"{name}.png")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
