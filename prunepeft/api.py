"""``prunepeft.search``: find a PEFT configuration under a budget, train it, return a :class:`SearchResult`.

The search (PrunePEFT): attach the supernet, warm up (one short run, optionally on a small
class-balanced subset), assign criteria to regions (hybrid), then ``rounds`` x (train
``steps_per_round`` -> score every unit with all criteria from one fused pass -> prune to the
round's target -> compact). Then the found configuration trains ``final_steps`` more steps, from
re-initialised weights (paper) or continuing from the search's.

With ``output_dir`` set, the state is written atomically after the warm-up and after every round
(``output_dir/state``: JSON + safetensors only); ``search(..., resume=True)`` continues an
interrupted search from the last finished phase with nothing lost.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .pruner import PruneConfig, Pruner
from .scheduler import resolve_budget
from .space import SearchSpace, SpaceConfig
from .supernet import Supernet, attach
from .train import NonFiniteError, TrainState, predict, train_steps

FINAL_INITS = ("reinit", "continue")
RESULT_FILE = "result.json"
STATE_DIR = "state"


class SearchError(RuntimeError):
    """The search could not finish (e.g. too many non-finite steps)."""


@dataclass
class SearchConfig(PruneConfig):
    """Everything a search needs besides the model and the data (see :class:`PruneConfig` for pruning).

    Attributes:
        space: the supernet's candidates (:class:`SpaceConfig`).
        budget: trainable parameters to end with: an int, a percentage of the base model's
            parameters (``"0.5%"`` or ``0.5``), or None for the size of peft LoRA r=8 on q,v.
        lr: peak AdamW learning rate; weight_decay: AdamW weight decay.
        lr_warmup_ratio: fraction of a phase's steps spent warming the learning rate up.
        max_grad_norm: gradient clipping (None or 0: off). grad_accum: micro-batches per step.
        batch_size, eval_batch_size, max_length: batching and truncation of text data.
        precision: ``auto`` (bf16 on CUDA that supports it, else fp32), ``fp32``, ``bf16``, ``fp16``.
        warmup_subset: if set, the warm-up trains on this many class-balanced training examples
            (the paper's low-fidelity mode); None uses the full training data.
        final_steps: steps of final training of the found configuration (0: none).
        final_init: ``reinit`` (paper: train the found configuration from scratch, head included)
            or ``continue`` (keep the search's weights and optimizer state).
        final_lr: learning rate of the final training (default: ``lr``).
        eval_max_examples: evaluation examples used after each round (None: all); the final
            evaluation always uses the whole eval set.
        max_bad_steps: consecutive non-finite steps tolerated before the search stops.
        task_kind: for pre-batched data: classification, regression or causal_lm.
    """

    space: SpaceConfig = field(default_factory=SpaceConfig)
    budget: int | float | str | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 128
    precision: str = "auto"
    warmup_subset: int | None = None
    final_steps: int = 500
    final_init: str = "reinit"
    final_lr: float | None = None
    eval_max_examples: int | None = 128
    max_bad_steps: int = 10
    task_kind: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.space, dict):
            self.space = SpaceConfig(**self.space)
        if self.final_init not in FINAL_INITS:
            raise ValueError(f"final_init must be one of {', '.join(FINAL_INITS)}, got {self.final_init!r}")
        for name in ("batch_size", "eval_batch_size", "max_length", "grad_accum", "max_bad_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.final_steps, int) or self.final_steps < 0:
            raise ValueError(f"final_steps must be an integer >= 0, got {self.final_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_warmup_ratio < 1:
            raise ValueError(f"lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        if self.warmup_subset is not None and self.warmup_subset < 1:
            raise ValueError(f"warmup_subset must be None or >= 1, got {self.warmup_subset}")
        if self.task_kind not in (None, "classification", "regression", "causal_lm"):
            raise ValueError(
                f"task_kind must be classification, regression or causal_lm, got {self.task_kind!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adalora_betas"] = list(self.adalora_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SearchConfig fields: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("space"), dict):
            d["space"] = SpaceConfig(**d["space"])
        return cls(**d)


@dataclass
class SearchResult:
    """What a search found (JSON-serialisable; weights are saved beside it in safetensors)."""

    model_type: str
    budget: int
    params: int
    base_params: int
    supernet_params: int
    kept: list[dict]
    assignment: dict | None
    history: list[dict]
    warmup: dict
    final: dict
    search_seconds: float
    config: dict
    task: dict
    handle: Supernet | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "handle"}

    def summary(self) -> str:
        lines = [
            f"found configuration: {self.params:,} trainable parameters (budget {self.budget:,}; "
            f"supernet {self.supernet_params:,}; base model {self.base_params:,})",
        ]
        for k in self.kept:
            lines.append(
                f"  layer {k['layer']:>2} {k['role']:>6} {k['kind']:<17} width {k['width']:>3}/{k['max_width']}"
            )
        if self.final.get("metrics"):
            m = ", ".join(f"{n} {v:.4f}" for n, v in self.final["metrics"].items())
            lines.append(f"final ({self.final['steps']} steps): {m}")
        if self.final.get("seconds"):
            lines.append(
                f"search {self.search_seconds:.0f}s, final training {self.final['seconds']:.0f}s "
                f"(search/final = {self.search_seconds / self.final['seconds']:.2f})"
            )
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """``result.json`` and, if the model is still attached, its weights (prunepeft format)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.handle is not None:
            from .export import save as save_weights

            save_weights(self.handle, out / "weights", extra={"result": RESULT_FILE})
        _atomic_write_json(out / RESULT_FILE, self.to_dict())
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """Read ``result.json`` (a directory or the file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / RESULT_FILE
        if not p.exists():
            raise FileNotFoundError(f"no search result at {p}")
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
        missing = {f.name for f in fields(cls) if f.name != "handle"} - set(d)
        if missing:
            raise ValueError(f"{p} is not a complete search result (missing {sorted(missing)})")
        return cls(**d)


# ---------------------------------------------------------------------------- data plumbing
class BatchStream:
    """An endless, resumable stream of batches: epoch ``e`` is ``make_epoch(e)``; ``consumed`` counts."""

    def __init__(self, make_epoch: Callable[[int], Iterable[dict]], consumed: int = 0) -> None:
        self.make_epoch = make_epoch
        self.consumed = 0
        self._epoch = 0
        self._it: Iterator[dict] = iter(make_epoch(0))
        for _ in range(consumed):
            next(self)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        for _ in range(2):
            try:
                b = next(self._it)
                self.consumed += 1
                return b
            except StopIteration:
                self._epoch += 1
                self._it = iter(self.make_epoch(self._epoch))
        raise ValueError("the training data yields no batch (is it empty, or smaller than one batch?)")


@dataclass
class _Data:
    kind: str
    train_epoch: Callable[[int], Iterable[dict]]
    warmup_epoch: Callable[[int], Iterable[dict]]
    eval_batches: Callable[[int | None], Iterable[dict]] | None
    primary: str
    higher_is_better: bool
    info: dict


def _prepare_data(model, train_data, eval_data, cfg: SearchConfig, tokenizer) -> _Data:
    from . import data as D

    if _is_batch_list(train_data):
        kind = cfg.task_kind or "classification"
        train = list(train_data)
        ev = list(eval_data) if eval_data is not None else None
        if not train:
            raise ValueError("train_data is empty")
        primary = {"classification": "accuracy", "regression": "pearson", "causal_lm": "perplexity"}[kind]

        def eval_batches(limit):
            return ev if limit is None else ev[: max(1, math.ceil(limit / max(1, len(ev[0]["labels"]))))]

        return _Data(kind, lambda e: train, lambda e: train, eval_batches if ev else None, primary,
                     kind != "causal_lm", {"kind": kind, "source": "batches"})  # fmt: skip

    if isinstance(train_data, (str, os.PathLike)):
        task = D.load_task(train=train_data, eval=eval_data, kind=cfg.task_kind)
    elif isinstance(train_data, D.Task):
        task = train_data
    else:
        raise ValueError(
            "train_data must be a path to a data file, a prunepeft.data.Task, or a list of batches (dicts of tensors)"
        )
    if not task.train:
        raise ValueError("the training data is empty")
    if (
        task.kind == "classification"
        and getattr(model.config, "num_labels", task.num_labels) != task.num_labels
    ):
        raise ValueError(
            f"the task has {task.num_labels} classes but the model's head has {model.config.num_labels}; "
            f"load the model with num_labels={task.num_labels}"
        )
    if tokenizer is None:
        from transformers import AutoTokenizer

        name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        if not name:
            raise ValueError("pass tokenizer=... : the model has no name_or_path to load its tokenizer from")
        tokenizer = AutoTokenizer.from_pretrained(name)
    kw = dict(tokenizer=tokenizer, max_length=cfg.max_length, kind=task.kind)
    warm_examples = (
        task.class_balanced_subset(cfg.warmup_subset, cfg.seed) if cfg.warmup_subset else task.train
    )

    def train_epoch(e):
        return D.batches(
            task.train,
            batch_size=cfg.batch_size,
            shuffle=True,
            seed=cfg.seed * 100_003 + e,
            drop_last=True,
            **kw,
        )

    def warm_epoch(e):
        bs = min(cfg.batch_size, len(warm_examples))
        return D.batches(
            warm_examples,
            batch_size=bs,
            shuffle=True,
            seed=cfg.seed * 100_003 + 7919 + e,
            drop_last=True,
            **kw,
        )

    def eval_batches(limit):
        ex = task.eval if limit is None else task.eval[:limit]
        return D.batches(ex, batch_size=cfg.eval_batch_size, shuffle=False, **kw)

    info = {"kind": task.kind, "num_labels": task.num_labels, "label_names": list(task.label_names),
            "train_examples": len(task.train), "eval_examples": len(task.eval or [])}  # fmt: skip
    return _Data(task.kind, train_epoch, warm_epoch, eval_batches if task.eval else None, task.primary_metric,
                 task.higher_is_better, info)  # fmt: skip


def _is_batch_list(x) -> bool:
    return (
        isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) > 0 and isinstance(x[0], dict)
    )


def evaluate(model: nn.Module, data: _Data, limit: int | None = None) -> dict[str, float]:
    """Metrics of the task on the eval data (``limit`` examples at most)."""
    from .metrics import compute_metrics, perplexity_from_loss

    if data.eval_batches is None:
        return {}
    device = next(model.parameters()).device
    preds, labels, loss = predict(model, data.eval_batches(limit), device, data.kind)
    if data.kind == "causal_lm":
        return {"perplexity": perplexity_from_loss(loss), "loss": loss}
    return compute_metrics(data.kind, preds.numpy(), labels.numpy(), num_labels=data.info.get("num_labels"))


# ---------------------------------------------------------------------------- budget
def default_budget(handle_or_space) -> int:
    """Parameters of peft LoRA r=8 on the attention query and value projections of every layer."""
    space = getattr(handle_or_space, "space", handle_or_space)
    sites = [s for s in space.sites if s.role in ("q", "v")]
    if not sites:
        raise ValueError(
            f"{space.model_type} has no separate q/v projections: give SearchConfig(budget=...) explicitly"
        )
    return sum(8 * (s.in_dim + s.out_dim) for s in sites)


def base_param_count(model: nn.Module) -> int:
    n = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n += int(qs.shape.numel()) if qs is not None and hasattr(qs, "shape") else p.numel()
    return n


# ---------------------------------------------------------------------------- search
def search(
    model: nn.Module,
    train_data,
    eval_data=None,
    config: SearchConfig | None = None,
    *,
    tokenizer=None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = print,
    progress: bool = False,
) -> SearchResult:
    """Search a PEFT configuration for ``model`` on ``train_data`` under ``config.budget``, then train it.

    Args:
        model: a transformers model (dense or 4-bit) with its task head.
        train_data: a path (TSV/CSV/JSONL/saved ``datasets``), a :class:`prunepeft.data.Task`, or a
            list of ready batches (dicts of tensors with ``labels``), used in order, cyclically.
        eval_data: like ``train_data`` (a path when ``train_data`` is a path); optional.
        config: :class:`SearchConfig`.
        tokenizer: for text data; default: loaded from the model's ``name_or_path``.
        output_dir: where ``result.json``, weights, ``report.md``/``report.png`` and the resumable
            state go; None keeps everything in memory.
        resume: continue the search whose state is in ``output_dir``.

    Returns:
        A :class:`SearchResult`; ``result.handle`` is the attached supernet, compacted to the found
        configuration (export it with :func:`prunepeft.export.export_peft` / ``save``).
    """
    cfg = config or SearchConfig()
    say = log or (lambda s: None)
    out = Path(output_dir) if output_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs output_dir (the directory of the interrupted search)")
    if out is not None:
        _check_writable(out)
        if not resume and (out / RESULT_FILE).exists():
            raise ValueError(f"{out} already holds a search result; choose another output_dir or delete it")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data = _prepare_data(model, train_data, eval_data, cfg, tokenizer)
    base_params = base_param_count(model)

    state_dir = out / STATE_DIR if out is not None else None
    resumed = None
    space = SearchSpace.from_model(model, cfg.space)
    budget = resolve_budget(cfg.budget, base_params) if cfg.budget is not None else default_budget(space)
    if budget > space.supernet_params():
        raise ValueError(
            f"budget {budget:,} is above the supernet's {space.supernet_params():,} trainable parameters; "
            "enlarge the space or lower the budget"
        )
    if resume:
        if state_dir is None or not (state_dir / "progress.json").exists():
            raise ValueError(f"nothing to resume in {out}: no {STATE_DIR}/progress.json")
        from .export import load as load_weights

        resumed = _read_json(state_dir / "progress.json")
        if resumed.get("config") != json.loads(json.dumps(cfg.to_dict(), default=_json_default)):
            raise ValueError(
                "the SearchConfig differs from the interrupted search's; resume with the same config"
            )
        handle = load_weights(model, state_dir / "weights")
    else:
        handle = attach(model, space)
    supernet_params = resumed["supernet_params"] if resumed else handle.num_trainable()
    head_init = [p.detach().clone() for p in handle.head_parameters()]
    say(f"prunepeft search: {handle.space.describe()}")
    say(f"budget {budget:,} trainable parameters ({100 * budget / base_params:.3f}% of {base_params:,})")

    try:
        pruner = (
            Pruner.restore(handle, cfg, budget, resumed["pruner"]) if resumed else Pruner(handle, cfg, budget)
        )
    except ValueError:
        handle.detach()
        raise
    opt = torch.optim.AdamW(list(handle.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    phase = TrainState()
    warm_consumed, main_consumed, search_seconds = 0, 0, 0.0
    if resumed:
        _load_optimizer(opt, handle, state_dir)
        phase = TrainState(**resumed["phase"])
        warm_consumed, main_consumed = resumed["warm_consumed"], resumed["main_consumed"]
        search_seconds = resumed["search_seconds"]
        torch.set_rng_state(_load_tensor(state_dir / "rng.safetensors", "torch"))
        head_init = _load_head_init(state_dir, len(head_init)) or head_init
        say(f"resumed at step {pruner.step} (round {len(pruner.history)} of {cfg.rounds} finished)")
    main = BatchStream(data.train_epoch, main_consumed)
    # without a low-fidelity subset the warm-up is simply the first steps of the training stream
    warm = BatchStream(data.warmup_epoch, warm_consumed) if cfg.warmup_subset else main
    total = cfg.search_steps
    lr_warm = int(cfg.lr_warmup_ratio * total)
    bar = _progress_bar(total, progress)
    if bar is not None:
        bar.update(pruner.step)

    def save_state():
        if state_dir is not None:
            _save_state(
                state_dir,
                handle,
                opt,
                pruner,
                cfg,
                phase,
                warm,
                main,
                search_seconds,
                supernet_params,
                head_init,
            )

    t_phase = time.perf_counter()
    while not pruner.done:
        stream = warm if pruner.step < cfg.warmup_steps else main
        n_before = len(phase.losses)
        t0 = time.perf_counter()
        try:
            train_steps(model, lambda: list(handle.parameters()), opt, stream, 1, phase, lr=cfg.lr, total_steps=total,
                        warmup_steps=lr_warm, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                        precision=cfg.precision, max_bad_steps=cfg.max_bad_steps, on_grads=pruner.on_grads)  # fmt: skip
        except NonFiniteError as e:
            raise SearchError(f"search stopped: {e}") from e
        loss = phase.losses[-1] if len(phase.losses) > n_before else None
        was_warm = pruner.step < cfg.warmup_steps
        rec = pruner.after_step(opt, loss, time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "skip", params=f"{handle.num_trainable():,}",
                            budget=f"{budget:,}", round=f"{pruner.round}/{cfg.rounds}")  # fmt: skip
        if was_warm and pruner.step == cfg.warmup_steps:
            search_seconds += time.perf_counter() - t_phase
            say(f"warm-up: {cfg.warmup_steps} steps, loss {_mean(phase.losses[-cfg.warmup_steps :]):.4f}")
            if pruner.assignment is not None:
                say(
                    "criteria by region: "
                    + "; ".join(f"{r}: {', '.join(c)}" for r, c in sorted(pruner.assignment.regions.items()))
                )
            save_state()
            t_phase = time.perf_counter()
        if rec is not None:
            rec.eval = evaluate(model, data, cfg.eval_max_examples)
            search_seconds += time.perf_counter() - t_phase
            ev = ", ".join(f"{k} {v:.4f}" for k, v in rec.eval.items())
            say(f"round {rec.round}/{cfg.rounds}: {rec.params:,} params (target {rec.target:,}), pruned {len(rec.pruned)} "
                f"{rec.granularity}s, loss {rec.loss:.4f}, {rec.step_seconds * 1e3:.0f} ms/step" + (f", {ev}" if ev else ""))  # fmt: skip
            save_state()
            t_phase = time.perf_counter()
    if bar is not None:
        bar.close()

    # ------------------------------------------------------------------ final training
    final: dict[str, Any] = {"steps": cfg.final_steps, "init": cfg.final_init, "seconds": 0.0, "skipped": 0}
    if cfg.final_steps:
        if cfg.final_init == "reinit":
            alive = [c for c, w in enumerate(handle.bank.widths()) if w]
            handle.bank.reset_parameters(alive, seed=cfg.seed + 1)
            with torch.no_grad():
                for p, p0 in zip(handle.head_parameters(), head_init, strict=True):
                    p.copy_(p0)
            opt = torch.optim.AdamW(
                list(handle.parameters()), lr=cfg.final_lr or cfg.lr, weight_decay=cfg.weight_decay
            )
        fstate = TrainState()
        t0 = time.perf_counter()
        fbar = _progress_bar(cfg.final_steps, progress, "final")
        try:
            train_steps(model, lambda: list(handle.parameters()), opt, main, cfg.final_steps, fstate,
                        lr=cfg.final_lr or cfg.lr, total_steps=cfg.final_steps,
                        warmup_steps=int(cfg.lr_warmup_ratio * cfg.final_steps), grad_accum=cfg.grad_accum,
                        max_grad_norm=cfg.max_grad_norm, precision=cfg.precision, max_bad_steps=cfg.max_bad_steps,
                        progress=(lambda s: fbar.update(1)) if fbar is not None else None)  # fmt: skip
        except NonFiniteError as e:
            raise SearchError(f"final training stopped: {e}") from e
        if fbar is not None:
            fbar.close()
        final.update(
            seconds=time.perf_counter() - t0, loss=_mean(fstate.losses[-20:]), skipped=fstate.skipped
        )
    final["metrics"] = evaluate(model, data, None)
    if final["metrics"]:
        say("final: " + ", ".join(f"{k} {v:.4f}" for k, v in final["metrics"].items()))

    result = SearchResult(
        model_type=handle.space.model_type,
        budget=budget,
        params=handle.num_trainable(),
        base_params=base_params,
        supernet_params=supernet_params,
        kept=_kept(handle),
        assignment=None if pruner.assignment is None else pruner.assignment.to_dict(),
        history=[h.to_dict() for h in pruner.history],
        warmup={"steps": cfg.warmup_steps, "subset": cfg.warmup_subset},
        final=final,
        search_seconds=search_seconds,
        config=cfg.to_dict(),
        task={**data.info, "primary_metric": data.primary, "higher_is_better": data.higher_is_better},
        handle=handle,
    )
    if out is not None:
        result.save(out)
        from .report import write_report

        write_report(result, out)
        if state_dir is not None and state_dir.exists():
            shutil.rmtree(state_dir)
    return result


def _kept(handle: Supernet) -> list[dict]:
    out = []
    for spec, w in zip(handle.bank.specs, handle.bank.effective_widths(), strict=True):
        if w:
            out.append({"name": spec.name, "kind": spec.kind, "layer": spec.layer, "role": spec.role,
                        "site": spec.site, "width": w, "max_width": spec.width})  # fmt: skip
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _progress_bar(total: int, enabled: bool, desc: str = "search"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".prunepeft_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output directory {out} is not writable: {e}") from None


# ---------------------------------------------------------------------------- state (resume)
def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _save_state(
    state_dir, handle, opt, pruner, cfg, phase, warm, main, search_seconds, supernet_params, head_init
):
    """Write the whole search state into a fresh directory, then swap it in (atomic on POSIX)."""
    from safetensors.torch import save_file

    from .export import save as save_weights

    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(handle, tmp / "weights")
    params = list(handle.parameters())
    tensors = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
    bank = handle.bank
    if bank.sens is not None:
        tensors["bank.sens"], tensors["bank.unc"] = bank.sens.cpu().contiguous(), bank.unc.cpu().contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    save_file(
        {f"{i}": t.cpu().contiguous() for i, t in enumerate(head_init)} or {"_": torch.zeros(1)},
        str(tmp / "head_init.safetensors"),
    )
    progress = {
        "config": cfg.to_dict(),
        "pruner": pruner.state_dict(),
        "phase": {
            "step": phase.step,
            "skipped": phase.skipped,
            "bad_in_row": phase.bad_in_row,
            "losses": phase.losses,
            "seconds": phase.seconds,
        },  # fmt: skip
        "warm_consumed": warm.consumed,
        "main_consumed": main.consumed,
        "search_seconds": search_seconds,
        "supernet_params": supernet_params,
    }
    _atomic_write_json(tmp / "progress.json", progress)
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    if old.exists():
        shutil.rmtree(old)


def _load_tensor(path: Path, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))[key]


def _load_head_init(state_dir: Path, n: int) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(str(state_dir / "head_init.safetensors"))
    return [t[str(i)] for i in range(n)] if n else []


def _load_optimizer(opt, handle, state_dir: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(state_dir / "optimizer.safetensors"))
    params = list(handle.parameters())
    for i, p in enumerate(params):
        st = {k.split(".", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if st:
            opt.state[p] = st
    if "bank.sens" in tensors:
        handle.bank.sens, handle.bank.unc = tensors["bank.sens"], tensors["bank.unc"]


def finetune(
    model: nn.Module,
    train_data,
    eval_data=None,
    config: SearchConfig | None = None,
    *,
    space: SpaceConfig | None = None,
    handle: Supernet | None = None,
    tokenizer=None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train a fixed configuration for ``config.final_steps`` steps and evaluate it (no pruning).

    The configuration is ``handle`` (e.g. ``prunepeft.load(model, path)`` of a found one) or, if
    None, ``space`` attached in full (e.g. a uniform LoRA baseline:
    ``SpaceConfig(lora_targets=("q", "v"), lora_rank=8, serial_adapter_targets=())``). Same loop,
    data order, schedule and evaluation as a search's final training, so the two compare fairly.
    Returns ``{"metrics", "seconds", "steps", "params", "loss", "handle"}``.
    """
    cfg = config or SearchConfig()
    say = log or (lambda s: None)
    torch.manual_seed(cfg.seed)
    data = _prepare_data(model, train_data, eval_data, cfg, tokenizer)
    if handle is None:
        handle = attach(model, space or cfg.space)
    opt = torch.optim.AdamW(
        list(handle.parameters()), lr=cfg.final_lr or cfg.lr, weight_decay=cfg.weight_decay
    )
    state = TrainState()
    stream = BatchStream(data.train_epoch)
    t0 = time.perf_counter()
    try:
        train_steps(model, lambda: list(handle.parameters()), opt, stream, cfg.final_steps, state,
                    lr=cfg.final_lr or cfg.lr, total_steps=cfg.final_steps,
                    warmup_steps=int(cfg.lr_warmup_ratio * cfg.final_steps), grad_accum=cfg.grad_accum,
                    max_grad_norm=cfg.max_grad_norm, precision=cfg.precision, max_bad_steps=cfg.max_bad_steps)  # fmt: skip
    except NonFiniteError as e:
        raise SearchError(f"training stopped: {e}") from e
    seconds = time.perf_counter() - t0
    metrics = evaluate(model, data, None)
    say(f"trained {handle.num_trainable():,} parameters for {cfg.final_steps} steps in {seconds:.0f}s"
        + (": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) if metrics else ""))  # fmt: skip
    return {"metrics": metrics, "seconds": seconds, "steps": cfg.final_steps, "params": handle.num_trainable(),
            "loss": _mean(state.losses[-20:]), "handle": handle}  # fmt: skip
