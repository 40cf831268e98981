"""``prunepeft.search``: find a PEFT configuration under a budget, train it, return a :class:`SearchResult`.

The method (PrunePEFT), as the loop below runs it:

1. attach the supernet (every candidate at once; the model's output is unchanged);
2. warm-up: train it ``warmup_steps`` steps (optionally on a small class-balanced subset, the paper's
   low-fidelity mode); the hybrid strategy assigns criteria to regions from these statistics;
3. ``rounds`` x (train ``steps_per_round`` steps -> score every unit with all criteria from one
   fused pass -> prune to the round's target -> compact), each round checked on the validation split;
4. train the found configuration ``final_steps`` steps (from re-initialised weights, as the paper,
   or continuing), then read the eval set once for the final metric.

The :class:`~prunepeft.pruner.Pruner` owns the round logic (shared with the Trainer callback); this
module only feeds it steps. With ``output_dir`` the state is written atomically after the warm-up and
after every round, and ``search(..., resume=True)`` continues from the last finished phase.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import distributed
from . import state as S
from .config import SearchConfig
from .evaluation import evaluate, warn_if_constant
from .finetune import SearchError, loop_options, make_optimizer, seed_everything, train_configuration
from .pruner import Pruner
from .result import RESULT_FILE, SearchResult, kept_modules
from .scheduler import base_param_count, default_budget, resolve_budget
from .space import SearchSpace
from .supernet import Supernet, attach
from .taskdata import BatchStream, prepare_data
from .train import NonFiniteError, TrainState, train_steps


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
        model: a transformers model (dense or 4-bit) with its task head. For a reproducible run,
            seed its new head too: ``transformers.set_seed(config.seed)`` before ``from_pretrained``
            (the CLI does); everything ``search`` creates is seeded from ``config.seed``.
        train_data: a path (TSV/CSV/JSONL/saved ``datasets``), a :class:`prunepeft.data.Task`, or a
            list of ready batches (dicts of tensors with ``labels``), used in order, cyclically.
            ``config.val_examples`` of it are held out as the validation split every in-search
            evaluation reads.
        eval_data: like ``train_data`` (a path when ``train_data`` is a path; inside the Task when it
            is one); optional. Read once, after the final training.
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
    distributed.init_from_env()  # under torchrun: one process per rank, the default group
    distributed.reject_sharded(model)
    main = distributed.is_main()  # rank 0 alone writes files and prints
    say = (log or (lambda s: None)) if main else (lambda s: None)
    progress = progress and main
    out = _output_dir(output_dir, resume)
    seed_everything(cfg.seed)
    data = prepare_data(model, train_data, eval_data, cfg, tokenizer)
    run = _Run.start(model, cfg, out, resume, say)
    try:
        # 2. warm-up (its statistics assign the hybrid strategy's criteria), 3. prune rounds
        run.search(data, progress)
        # 4. the found configuration's final training
        final = run.final_training(data, progress)
    except BaseException:
        run.handle.detach()  # the model goes back to the caller as it came (a resumable state stays on disk)
        raise
    final["val_metrics"] = evaluate(model, data, "val")
    if main:
        warn_if_constant(final["val_metrics"], cfg.final_lr or cfg.lr, say)
    final["metrics"] = evaluate(model, data, "eval")  # the eval set: read once, here
    for key, what in (("val_metrics", "validation split"), ("metrics", "eval set")):
        if final[key]:
            say(f"final, {what}: " + ", ".join(f"{k} {v:.4f}" for k, v in final[key].items()))
    result = run.result(final, data)
    if out is not None and main:
        from .report import write_report

        result.save(out)
        write_report(result, out)
        S.clear(out)
    return result


def _output_dir(output_dir, resume: bool) -> Path | None:
    out = Path(output_dir) if output_dir is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs output_dir (the directory of the interrupted search)")
    if out is not None:
        check_writable(out)
        if not resume and (out / RESULT_FILE).exists():
            raise ValueError(f"{out} already holds a search result; choose another output_dir or delete it")
        if resume and not S.has_state(out):
            raise ValueError(f"nothing to resume in {out}: no {S.STATE_DIR}/{S.PROGRESS_FILE}")
    return out


class _Run:
    """One search in progress: the supernet, its pruner and optimizer, and the counters to resume."""

    def __init__(self, model, cfg, out, say, handle: Supernet, pruner: Pruner, budget: int, base_params: int,
                 progress: S.Progress, head_init: list[torch.Tensor]) -> None:  # fmt: skip
        self.model, self.cfg, self.out, self.say = model, cfg, out, say
        self.handle, self.pruner, self.budget, self.base_params = handle, pruner, budget, base_params
        self.progress, self.head_init = progress, head_init
        self.opt = make_optimizer(handle, cfg, cfg.lr)

    @classmethod
    def start(cls, model, cfg: SearchConfig, out: Path | None, resume: bool, say) -> _Run:
        """1. attach the supernet (or load the interrupted search's) and size the budget."""
        base_params = base_param_count(model)
        space = SearchSpace.from_model(model, cfg.space)
        budget = resolve_budget(cfg.budget, base_params) if cfg.budget is not None else default_budget(space)
        if budget > space.supernet_params():
            raise ValueError(
                f"budget {budget:,} is above the supernet's {space.supernet_params():,} trainable parameters; "
                "enlarge the space or lower the budget"
            )
        if resume:
            pruner_state, progress = S.read_progress(out, cfg.to_dict())
            handle = S.load_weights(out, model)
        else:
            handle, progress, pruner_state = attach(model, space), None, None
        try:
            pruner = (
                Pruner.restore(handle, cfg, budget, pruner_state) if resume else Pruner(handle, cfg, budget)
            )
        except ValueError:
            handle.detach()
            raise
        head_init = [p.detach().clone() for p in handle.head_parameters()]
        progress = progress or S.Progress(supernet_params=handle.num_trainable())
        self = cls(model, cfg, out, say, handle, pruner, budget, base_params, progress, head_init)
        say(f"prunepeft search: {handle.space.describe()}")
        say(f"budget {budget:,} trainable parameters ({100 * budget / base_params:.3f}% of {base_params:,})")
        if resume:
            self.head_init = S.restore(out, handle, self.opt, len(head_init)) or head_init
            say(f"resumed at step {pruner.step} (round {len(pruner.history)} of {cfg.rounds} finished)")
        return self

    # ------------------------------------------------------------------ warm-up and rounds
    def search(self, data, progress: bool) -> None:
        cfg, pruner, p = self.cfg, self.pruner, self.progress
        main = BatchStream(data.train_epoch, p.main_consumed)
        # without a low-fidelity subset the warm-up is simply the first steps of the training stream
        warm = BatchStream(data.warmup_epoch, p.warm_consumed) if cfg.warmup_subset else main
        phase = TrainState(p.step, p.skipped, p.bad_in_row, list(p.losses), p.seconds)
        bar = _progress_bar(cfg.search_steps, progress, initial=pruner.step)
        t_phase = time.perf_counter()
        while not pruner.done:
            was_warm = pruner.step < cfg.warmup_steps
            loss, rec = self._step(warm if was_warm else main, phase, "warmup" if was_warm else "rounds")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "skip",
                                params=f"{self.handle.num_trainable():,}", budget=f"{self.budget:,}",
                                round=f"{pruner.round}/{cfg.rounds}")  # fmt: skip
            if was_warm and pruner.step == cfg.warmup_steps:
                self._say_warmup(phase)
            elif rec is not None:
                seconds = 0.0  # off by default: no call, and its cost stays 0.0
                if cfg.round_eval_examples:
                    t0 = time.perf_counter()
                    rec.eval = evaluate(self.model, data, "val", cfg.round_eval_examples)
                    seconds = time.perf_counter() - t0
                self._cost("evaluation", seconds)
                self._say_round(rec)
            else:
                continue
            p.search_seconds += time.perf_counter() - t_phase
            p.step, p.skipped, p.bad_in_row = phase.step, phase.skipped, phase.bad_in_row
            p.losses, p.seconds = list(phase.losses), phase.seconds
            p.warm_consumed, p.main_consumed = warm.consumed, main.consumed
            t0 = time.perf_counter()
            self._save()
            self._cost("state", time.perf_counter() - t0)
            t_phase = time.perf_counter()
        if bar is not None:
            bar.close()
        self.main = main

    def _step(self, stream, phase: TrainState, part: str):
        """One optimizer step of the supernet; the pruner sees its gradients and its end."""
        cfg = self.cfg
        n_before = len(phase.losses)
        t0 = time.perf_counter()
        try:
            train_steps(self.model, lambda: list(self.handle.parameters()), self.opt, stream, 1, phase, lr=cfg.lr,
                        total_steps=cfg.search_steps, warmup_steps=int(cfg.lr_warmup_ratio * cfg.search_steps),
                        on_grads=self.pruner.on_grads, **loop_options(cfg))  # fmt: skip
        except NonFiniteError as e:
            raise SearchError(f"search stopped: {e}") from e
        t1 = time.perf_counter()
        self._cost(part, t1 - t0)  # training steps (the fused statistics pass included)
        loss = phase.losses[-1] if len(phase.losses) > n_before else None
        rec = self.pruner.after_step(self.opt, loss, t1 - t0)
        self._cost("scoring", time.perf_counter() - t1)  # criteria, assignment, selection, compaction
        return loss, rec

    def _cost(self, part: str, seconds: float) -> None:
        c = self.progress.costs
        c[part] = c.get(part, 0.0) + seconds

    def _say_warmup(self, phase: TrainState) -> None:
        n = self.cfg.warmup_steps
        tail = phase.losses[-n:]
        self.say(f"warm-up: {n} steps, loss {sum(tail) / max(1, len(tail)):.4f}")
        a = self.pruner.assignment
        if a is not None:
            self.say(
                "criteria by region: "
                + "; ".join(f"{r}: {', '.join(c)}" for r, c in sorted(a.regions.items()))
            )

    def _say_round(self, rec) -> None:
        ev = ", ".join(f"{k} {v:.4f}" for k, v in rec.eval.items())
        self.say(f"round {rec.round}/{self.cfg.rounds}: {rec.params:,} params (target {rec.target:,}), pruned "
                 f"{len(rec.pruned)} {rec.granularity}s, loss {rec.loss:.4f}, {rec.step_seconds * 1e3:.0f} ms/step"
                 + (f", validation {ev}" if ev else ""))  # fmt: skip

    def _save(self) -> None:
        if self.out is not None and distributed.is_main():
            S.save_state(self.out, self.handle, self.opt, self.cfg.to_dict(), self.pruner.state_dict(),
                         self.progress, self.head_init)  # fmt: skip

    # ------------------------------------------------------------------ final training
    def final_training(self, data, progress: bool) -> dict:
        cfg, handle = self.cfg, self.handle
        final = {"steps": cfg.final_steps, "init": cfg.final_init, "seconds": 0.0, "skipped": 0}
        if not cfg.final_steps:
            return final
        opt = self.opt
        if cfg.final_init == "reinit":
            alive = [c for c, w in enumerate(handle.bank.widths()) if w]
            handle.bank.reset_parameters(alive, seed=cfg.seed + 1)
            with torch.no_grad():
                for p, p0 in zip(handle.head_parameters(), self.head_init, strict=True):
                    p.copy_(p0)
            opt = make_optimizer(handle, cfg, cfg.final_lr or cfg.lr)
        bar = _progress_bar(cfg.final_steps, progress, "final")
        final.update(train_configuration(self.model, handle, opt, self.main, cfg, what="final training",
                                         progress=(lambda s: bar.update(1)) if bar is not None else None))  # fmt: skip
        if bar is not None:
            bar.close()
        return final

    def result(self, final: dict, data) -> SearchResult:
        h, pruner = self.handle, self.pruner
        return SearchResult(
            model_type=h.space.model_type,
            budget=self.budget,
            params=h.num_trainable(),
            base_params=self.base_params,
            supernet_params=self.progress.supernet_params,
            kept=kept_modules(h),
            assignment=None if pruner.assignment is None else pruner.assignment.to_dict(),
            history=[r.to_dict() for r in pruner.history],
            warmup={"steps": self.cfg.warmup_steps, "subset": self.cfg.warmup_subset},
            final=final,
            search_seconds=self.progress.search_seconds,
            costs={
                **{k: round(v, 4) for k, v in self.progress.costs.items()},
                "final": round(final.get("seconds", 0.0), 4),
            },  # fmt: skip
            config=self.cfg.to_dict(),
            task={**data.info, "primary_metric": data.primary, "higher_is_better": data.higher_is_better},
            handle=h,
        )


def _progress_bar(total: int, enabled: bool, desc: str = "search", initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, initial=initial)


def check_writable(out: Path) -> None:
    """Raise a clear ``ValueError`` when ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".prunepeft_write_test.{distributed.world()[0]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output directory {out} is not writable: {e}") from None
