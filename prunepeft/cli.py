"""The ``prunepeft`` command.

prunepeft demo                          a real search offline (all-MiniLM-L6-v2 on BBC News), ~5 min on 2 cores
prunepeft search --model M --train F --out DIR [--eval F] [--budget 0.3%]
prunepeft search --resume DIR           continue an interrupted search (killed or Ctrl-C)
prunepeft train  --model M --result DIR --train F --out DIR2   train a found configuration
prunepeft eval   --model M --result DIR --eval F               evaluate it
prunepeft export --model M --result DIR --out DIR2             peft LoRA directory (or prunepeft format)
prunepeft report DIR                    re-draw report.md / report.png from result.json
prunepeft info                          versions, backends, architectures
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """examples:
  prunepeft demo
  prunepeft search --model minilm --train ../shared/data/glue/RTE/train.tsv \\
      --eval ../shared/data/glue/RTE/dev.tsv --budget 73728 --out runs/rte
  prunepeft export --model minilm --result runs/rte --out runs/rte-peft
--model takes a local transformers model directory, or "minilm" for the bundled all-MiniLM-L6-v2.
Nothing is downloaded: models and data must be on disk."""


def _model_path(name: str) -> str:
    if name.lower() in ("minilm", "all-minilm-l6-v2"):
        from .demo import _minilm

        return _minilm()
    if not Path(name).exists():
        raise SystemExit(f"prunepeft: model {name!r} is not a local directory (nothing is downloaded); "
                         "pass a saved transformers model directory or 'minilm'")  # fmt: skip
    return name


def _load_model(name: str, task, load_in_4bit: bool = False, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .finetune import seed_everything

    path = _model_path(name)
    seed_everything(seed)  # a new task head is drawn at load: the same seed gives the same head
    kw = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier", "score", "lm_head"],
        )  # fmt: skip
    if task.kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels, **kw)
    tok = AutoTokenizer.from_pretrained(path)
    if (
        getattr(model.config, "pad_token_id", None) is None
        and tok.pad_token_id is None
        and tok.eos_token_id is not None
    ):
        model.config.pad_token_id = tok.eos_token_id
    return model, tok


def _add_data_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    if train:
        p.add_argument(
            "--train", required=True, help="training data: .tsv (GLUE), .csv, .jsonl, or a saved datasets dir"
        )
    p.add_argument("--eval", help="evaluation data, same formats")
    p.add_argument(
        "--task-kind", choices=["classification", "regression", "causal_lm"], help="default: inferred"
    )
    p.add_argument(
        "--text-columns", nargs="+", help="one or two text columns (default: GLUE names, text, sentence)"
    )
    p.add_argument("--label-column", help="default: label / score")
    p.add_argument("--max-examples", type=int, help="use the first N training rows")
    p.add_argument(
        "--no-header", action="store_true", help="TSV/CSV files without a header (columns named 0, 1, ...)"
    )


def _task(args, need_train: bool = True):
    from .data import load_task

    train = getattr(args, "train", None)
    return load_task(train=train if need_train else args.eval, eval=args.eval, kind=args.task_kind,
                     text_columns=tuple(args.text_columns) if args.text_columns else None, label_column=args.label_column,
                     header=not args.no_header, max_examples=args.max_examples)  # fmt: skip


def _search_config(args):
    from .api import SearchConfig
    from .space import SpaceConfig

    space = SpaceConfig(lora_targets=tuple(args.lora_targets), lora_rank=args.lora_rank,
                        serial_adapter_targets=tuple(args.serial_adapters), parallel_adapter_targets=tuple(args.parallel_adapters),
                        adapter_width=args.adapter_width, block_size=args.block_size, seed=args.seed)  # fmt: skip
    budget = args.budget
    if budget is not None and not budget.endswith("%"):
        budget = int(budget.replace(",", "").replace("_", ""))
    return SearchConfig(space=space, budget=budget, strategy=args.strategy, granularity=args.granularity,
                        rounds=args.rounds, steps_per_round=args.steps_per_round, warmup_steps=args.warmup_steps,
                        warmup_subset=args.warmup_subset, final_steps=args.final_steps, final_init=args.final_init,
                        lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                        precision=args.precision)  # fmt: skip


def _cmd_search(args) -> int:
    from .api import search

    if args.resume:
        out = Path(args.resume)
        saved = out / "cli_args.json"
        if not saved.exists():
            raise SystemExit(f"prunepeft: nothing to resume in {out} (no cli_args.json from a search)")
        args = argparse.Namespace(**{**json.loads(saved.read_text()), "resume": str(out)})
    else:
        if not args.model or not args.train or not args.out:
            raise SystemExit("prunepeft search: --model, --train and --out are required (or --resume DIR)")
        out = Path(args.out)
        _model_path(args.model)
        cfg = _search_config(args)  # validate before writing anything
        from .searcher import check_writable

        try:
            check_writable(out)
        except ValueError as e:
            raise SystemExit(f"prunepeft: {e}") from None
        if (out / "result.json").exists():
            raise SystemExit(f"prunepeft: {out} already holds a search result; choose another --out")
        (out / "cli_args.json").write_text(
            json.dumps({k: v for k, v in vars(args).items() if k != "func"}, indent=2)
        )
    cfg = _search_config(args)
    task = _task(args)
    model, tok = _load_model(args.model, task, args.load_in_4bit, args.seed)
    try:
        result = search(model, task, config=cfg, tokenizer=tok, output_dir=out, resume=bool(args.resume),
                        progress=not args.quiet, log=None if args.quiet else print)  # fmt: skip
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished rounds are saved; continue with `prunepeft search --resume {out}`",
            file=sys.stderr,
        )
        return 130
    print(result.summary())
    print(f"wrote {out}/result.json, weights/, report.md, report.png")
    return 0


def _load_found(args, task):
    from .export import load

    model, tok = _load_model(args.model, task, getattr(args, "load_in_4bit", False), getattr(args, "seed", 0))
    weights = Path(args.result) / "weights"
    return model, tok, load(model, weights if weights.exists() else args.result)


def _cmd_train(args) -> int:
    from .api import SearchConfig, finetune
    from .export import save

    task = _task(args)
    model, tok, handle = _load_found(args, task)
    if args.init == "reinit":
        alive = [c for c, w in enumerate(handle.bank.widths()) if w]
        handle.bank.reset_parameters(alive, seed=args.seed + 1)
    cfg = SearchConfig(final_steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                       seed=args.seed)  # fmt: skip
    res = finetune(model, task, config=cfg, handle=handle, tokenizer=tok)
    out = Path(args.out)
    save(handle, out / "weights")
    (out / "train.json").write_text(json.dumps({k: v for k, v in res.items() if k != "handle"}, indent=2))
    print(f"wrote {out}")
    return 0


def _cmd_eval(args) -> int:
    from .api import SearchConfig, evaluate, prepare_data

    if not args.eval:
        raise SystemExit("prunepeft eval: --eval is required")
    task = _task(args, need_train=False)
    model, tok, handle = _load_found(args, task)
    data = prepare_data(model, task, None, SearchConfig(max_length=args.max_length, val_examples=0), tok)
    print(json.dumps(evaluate(model, data, "eval"), indent=2))
    return 0


def _cmd_export(args) -> int:
    from .data import Task
    from .export import export_peft, is_lora_only, save

    result = json.loads((Path(args.result) / "result.json").read_text())
    kind = result["task"]["kind"]
    task = Task(kind, [], label_names=result["task"].get("label_names") or [])
    if kind == "regression":
        task = Task(kind, [])
    model, _, handle = _load_found(args, task)
    fmt = args.format
    if fmt == "auto":
        fmt = "peft" if is_lora_only(handle) else "prunepeft"
    path = (
        export_peft(handle, args.out, base_model_name_or_path=_model_path(args.model))
        if fmt == "peft"
        else save(handle, args.out)
    )
    print(f"wrote {fmt} format to {path}")
    return 0


def _cmd_report(args) -> int:
    from .api import SearchResult
    from .report import write_report

    md, png = write_report(SearchResult.load(args.dir), args.dir)
    print(f"wrote {md} and {png}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run

    cfg = DemoConfig(seed=args.seed)
    if args.quick:
        cfg = DemoConfig(seed=args.seed, train_docs=96, test_docs=48, max_length=64, batch_size=8, final_steps=4,
                         search={"warmup_steps": 2, "rounds": 2, "steps_per_round": 2, "round_eval_examples": 16})  # fmt: skip
    run(cfg, output_dir=args.out, progress=not args.quiet)
    return 0


def _cmd_info(args) -> int:
    import torch

    import prunepeft

    print(f"prunepeft {prunepeft.__version__}, torch {torch.__version__}")
    print(
        f"backends: {', '.join(prunepeft.available_backends())} (in use: {prunepeft.get_backend().__name__})"
    )
    print(f"architectures: {', '.join(sorted(prunepeft.ARCHITECTURES))}")
    print(f"criteria: {', '.join(prunepeft.CRITERIA)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunepeft",
        description="Find which PEFT modules to train, where and how wide, by hybrid pruning of a supernet "
        "(PrunePEFT), then train the found configuration.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo", help="run a real search offline on all-MiniLM-L6-v2 + BBC News (~5 min on 2 cores)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny run (smoke test, about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write result.json, weights and the report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("search", help="search a PEFT configuration under a budget and train it")
    p.add_argument("--model", help='local model directory, or "minilm"')
    p.add_argument("--out", help="output directory (result.json, weights/, report.md, report.png)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted search in DIR")
    _add_data_args(p, train=False)
    p.add_argument("--train", help="training data: .tsv (GLUE), .csv, .jsonl, or a saved datasets dir")
    g = p.add_argument_group("budget and strategy")
    g.add_argument("--budget", help="trainable parameters: an integer or a percentage of the base model ('0.3%%'); "
                   "default: the size of LoRA r=8 on query,value")  # fmt: skip
    g.add_argument("--strategy", default="hybrid", help="hybrid (default), random, or one criterion: weight, zeros, "
                   "threshold, activation, gradient, taylor, fisher, adalora")  # fmt: skip
    g.add_argument("--granularity", default="module", choices=["module", "block", "both"],
                   help="prune whole modules (paper), width-blocks, or modules then blocks")  # fmt: skip
    g.add_argument("--rounds", type=int, default=4)
    g.add_argument("--steps-per-round", type=int, default=8)
    g.add_argument("--warmup-steps", type=int, default=16)
    g.add_argument("--warmup-subset", type=int, help="low-fidelity warm-up on N class-balanced examples")
    g = p.add_argument_group("search space")
    g.add_argument(
        "--lora-targets", nargs="*", default=["q", "v"], help="roles or module names (default: q v)"
    )
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--serial-adapters", nargs="*", default=["ffn"], help="attn and/or ffn (default: ffn)")
    g.add_argument("--parallel-adapters", nargs="*", default=[], help="sites for parallel adapters (e.g. up)")
    g.add_argument("--adapter-width", type=int, default=16)
    g.add_argument("--block-size", type=int, default=4)
    g = p.add_argument_group("training")
    g.add_argument(
        "--final-steps", type=int, default=500, help="steps to train the found configuration (0: none)"
    )
    g.add_argument("--final-init", default="reinit", choices=["reinit", "continue"])
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-length", type=int, default=128)
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument(
        "--load-in-4bit", action="store_true", help="load the base model in 4-bit NF4 (bitsandbytes)"
    )
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or round lines")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("train", help="train a found configuration (from a search's output directory)")
    p.add_argument("--model", required=True)
    p.add_argument("--result", required=True, help="a search output directory")
    p.add_argument("--out", required=True)
    _add_data_args(p)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument(
        "--init",
        default="reinit",
        choices=["reinit", "continue"],
        help="from scratch (paper) or the search's weights",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a found (and trained) configuration")
    p.add_argument("--model", required=True)
    p.add_argument("--result", required=True, help="a search or train output directory")
    _add_data_args(p, train=False)
    p.add_argument("--max-length", type=int, default=128)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "export", help="export a found configuration: a peft LoRA directory, or prunepeft's format"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--result", required=True, help="a search output directory")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="auto", choices=["auto", "peft", "prunepeft"],
                   help="auto: peft when only LoRA modules survived")  # fmt: skip
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="re-draw report.md and report.png from DIR/result.json")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("info", help="versions, backends, supported architectures and criteria")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"prunepeft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
