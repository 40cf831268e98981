"""What a search keeps, written to disk: a ``peft`` LoRA adapter, or prunepeft's own format (ARCHITECTURE.md §6).

- :func:`export_peft` writes the kept LoRA candidates as a ``peft`` adapter directory
  (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads and that computes what the supernet
  computes. ``target_modules``, ``rank_pattern`` and ``alpha_pattern`` name the exact qualified
  module names (every target is listed in both patterns; no ``^`` anchors, no rank 0), and the
  trained head goes into ``modules_to_save``. It refuses a kept set with adapters in it.
- :func:`save` / :func:`load` handle any mix of kinds: ``prunepeft_config.json`` (the
  :class:`~prunepeft.space.SpaceConfig`, the kept original blocks of every candidate, a sha256 of
  the weights) and ``prunepeft_weights.safetensors``. Only JSON and safetensors, never pickle.

Nothing here mutates the handle: only live units are read (rows of ``D`` / ``Ut`` / ``bd`` whose
block is unmasked), so a masked bank exports exactly like its compacted twin. Both writers fill a
temporary directory next to ``out_dir`` and move the files in (weights first, config last), so an
interrupted write never leaves a config without its weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .bank import ModuleBank
from .models import file_sha256
from .space import SearchSpace, SpaceConfig
from .supernet import Supernet, attach

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "export_peft",
    "is_lora_only",
    "load",
    "save",
]

#: Version of the on-disk format written by :func:`save`; :func:`load` refuses newer ones.
FORMAT_VERSION = 1
CONFIG_NAME = "prunepeft_config.json"
WEIGHTS_NAME = "prunepeft_weights.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # what peft's state-dict keys start with (PeftModel -> LoraModel -> model)
# model class suffix -> peft task type (only where the class says it unambiguously)
_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"))


# ---------------------------------------------------------------------- live units
def _live_blocks(bank: ModuleBank, cand: int) -> list[int]:
    """Current block ids of ``cand`` that are unmasked, in layout order."""
    mask = bank.block_mask.cpu()
    return [b for b in bank.candidate_blocks(cand) if bool(mask[b])]


def _live_tensors(bank: ModuleBank, cand: int, blocks: list[int]) -> dict[str, torch.Tensor]:
    """Detached copies of ``cand``'s parameters restricted to the rows of ``blocks``."""
    block_table = bank.plan["block"]
    rows = [
        r
        for b in blocks
        for r in range(int(block_table[b, 1]), int(block_table[b, 1]) + int(block_table[b, 2]))
    ]
    t = bank.candidate_tensors(cand)
    idx = torch.tensor(rows, dtype=torch.int64, device=bank.flat.device)
    out = {
        "D": t["D"].detach().index_select(0, idx),
        "Ut": t["Ut"].detach().index_select(0, idx),
    }
    if "bd" in t:
        out["bd"] = t["bd"].detach().index_select(0, idx)
        out["bu"] = t["bu"].detach().clone()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _live(handle: Supernet) -> list[tuple[int, int]]:
    """``(candidate id, live width)`` of every candidate with at least one unmasked block."""
    return [(c, w) for c, w in enumerate(handle.bank.effective_widths()) if w > 0]


def is_lora_only(handle: Supernet) -> bool:
    """Whether every live candidate (width > 0 counting only unmasked blocks) is a LoRA.

    False when nothing is live at all: ``peft`` cannot express an empty adapter, :func:`save` can.
    """
    live = _live(handle)
    return bool(live) and all(handle.bank.specs[c].kind == "lora" for c, _ in live)


# ---------------------------------------------------------------------- head
def _head(handle: Supernet) -> tuple[dict[str, nn.Parameter], list[str]]:
    """The head parameters by qualified name, and the head modules that own them (for ``modules_to_save``).

    A head module is the top-most module below the root all of whose parameters are head parameters
    (``classifier`` for BERT's linear head and RoBERTa's two-layer one alike).
    """
    model = handle.model
    head_ids = {id(p) for p in handle.head_parameters()}
    if not head_ids:
        return {}, []
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in head_ids and all(q is not p for q in params.values()):
            params[name] = p
    modules = dict(model.named_modules(remove_duplicate=False))

    def all_head(mod_name: str) -> bool:
        return all(id(p) in head_ids for p in modules[mod_name].parameters())

    owners: list[str] = []
    for name in params:
        owner = name.rpartition(".")[0]
        while owner and "." in owner and all_head(owner.rpartition(".")[0]):
            owner = owner.rpartition(".")[0]
        if owner and owner not in owners:
            owners.append(owner)
    return params, owners


# ---------------------------------------------------------------------- files
def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_dir(out_dir: Path, writers: list[tuple[str, Callable[[Path], None]]]) -> Path:
    """Write ``writers`` (file name, writer) into a temp dir next to ``out_dir``, then move them in.

    A new (or empty) ``out_dir`` appears in one rename; into an existing one the files are moved in
    the order given (put the config last). An exception while writing leaves ``out_dir`` untouched.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for name, write in writers:
            write(tmp / name)
            _fsync(tmp / name)
        try:
            os.replace(tmp, out_dir)  # atomic when out_dir is missing or an empty directory
            return out_dir
        except OSError:
            pass
        out_dir.mkdir(exist_ok=True)
        for name, _ in writers:
            os.replace(tmp / name, out_dir / name)
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(obj: dict) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")

    return write


def _write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)

    return write


# ---------------------------------------------------------------------- peft export
def _lora_alpha(scaling: float, r: int) -> float | int:
    """An ``alpha`` with ``alpha / r == scaling`` exactly in floating point (peft's LoRA scaling)."""
    alpha = scaling * r
    if alpha / r != scaling:  # scaling * r rounded: step to a neighbour that divides back exactly
        lo = hi = alpha
        for _ in range(4):
            lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
            if lo / r == scaling:
                alpha = lo
                break
            if hi / r == scaling:
                alpha = hi
                break
    return int(alpha) if float(alpha).is_integer() else alpha


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    if name.endswith("ForConditionalGeneration") and getattr(
        getattr(model, "config", None), "is_encoder_decoder", False
    ):
        return "SEQ_2_SEQ_LM"
    return None


def _check_pattern_keys(pattern: dict[str, int | float], default: int | float, what: str) -> None:
    """Make sure peft resolves every key of ``pattern`` to its own value (no key catches another module)."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # pragma: no cover - older/newer peft without it: exact names are looked up as is
        return
    keys = list(pattern)
    for name, value in pattern.items():
        got = pattern.get(get_pattern_key(keys, name), default)
        if got != value:
            raise RuntimeError(
                f"export_peft: peft would resolve {what} of {name!r} to {got}, not {value} "
                "(a module name that matches another as a pattern); please report this"
            )


def export_peft(
    handle: Supernet, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write the live LoRA candidates (and the trained head) as a ``peft`` LoRA adapter directory.

    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` on the same base model then computes
    what the attached model computes. The handle is not modified (masked blocks are left out, not
    compacted away). Every target gets its live rank in ``rank_pattern`` and ``alpha = scaling ·
    rank`` in ``alpha_pattern``, keyed by its exact qualified module name; ``r`` / ``lora_alpha``
    are the most common rank and its alpha. GPT-2 ``Conv1D`` sites set ``fan_in_fan_out`` (peft
    corrects it per module where a model mixes ``Conv1D`` and ``Linear`` sites). The head parameters
    of the handle go into ``modules_to_save``; ``task_type`` is set from the model class where it is
    unambiguous (``…ForSequenceClassification``, ``…ForCausalLM``, encoder-decoder
    ``…ForConditionalGeneration``).

    Args:
        handle: the supernet handle (attached).
        out_dir: directory to write; created if needed, existing adapter files are replaced.
        base_model_name_or_path: recorded in ``adapter_config.json``; default: the model config's
            ``_name_or_path`` when set.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: a live candidate is not a LoRA (use :func:`save`), or nothing is live.
    """
    from peft import LoraConfig

    bank = handle.bank
    live = _live(handle)
    if not live:
        raise ValueError("export_peft: nothing to export, every candidate is pruned away")
    kinds = Counter(bank.specs[c].kind for c, _ in live)
    if set(kinds) != {"lora"}:
        desc = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        raise ValueError(
            f"export_peft: peft's LoraConfig can only express LoRA, but the live candidates are {desc}; "
            "use prunepeft.export.save(handle, out_dir) and prunepeft.export.load(model, out_dir) instead"
        )
    params, head_modules = _head(handle)
    loose = [n for n in params if not any(n.startswith(h + ".") for h in head_modules)]
    if loose:
        raise ValueError(
            f"export_peft: head parameters {loose} belong to no submodule; peft cannot save them"
        )

    ranks: dict[str, int] = {}
    alphas: dict[str, float | int] = {}
    tensors: dict[str, torch.Tensor] = {}
    conv1d = []
    for c, width in live:
        spec = bank.specs[c]
        if spec.site in ranks:  # pragma: no cover - one LoRA per site by construction
            raise RuntimeError(f"export_peft: two LoRA candidates at {spec.site}")
        for h in head_modules:
            if spec.site == h or spec.site.startswith(h + "."):
                raise ValueError(
                    f"export_peft: LoRA site {spec.site} lies inside the trained head module {h}; "
                    "peft cannot target a module in modules_to_save"
                )
        t = _live_tensors(bank, c, _live_blocks(bank, c))
        ranks[spec.site] = width
        alphas[spec.site] = _lora_alpha(spec.scaling, width)
        prefix = f"{_PEFT_PREFIX}{spec.site}"
        tensors[f"{prefix}.lora_A.weight"] = t["D"]
        tensors[f"{prefix}.lora_B.weight"] = t["Ut"].t().contiguous()
        base = getattr(handle.model.get_submodule(spec.site), "base", None)
        conv1d.append(type(base).__name__ == "Conv1D")
    for name, p in params.items():
        tensors[f"{_PEFT_PREFIX}{name}"] = p.detach().contiguous().cpu().clone()

    count = Counter(ranks.values())
    r = max(count, key=lambda k: (count[k], k))
    default_alpha = next(alphas[s] for s in ranks if ranks[s] == r)
    rank_pattern = {s: ranks[s] for s in sorted(ranks)}  # every target, in both patterns
    alpha_pattern = {s: alphas[s] for s in sorted(ranks)}

    if base_model_name_or_path is None:
        base_model_name_or_path = (
            getattr(getattr(handle.model, "config", None), "_name_or_path", None) or None
        )
    config = LoraConfig(
        r=r,
        lora_alpha=default_alpha,
        target_modules=sorted(ranks),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        fan_in_fan_out=any(conv1d),
        modules_to_save=head_modules or None,
        task_type=_task_type(handle.model),
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )

    def write_config(path: Path) -> None:
        config.save_pretrained(str(path.parent))  # peft's own serialisation (adapter_config.json)
        obj = json.loads(path.read_text(encoding="utf-8"))
        obj["target_modules"] = sorted(obj["target_modules"])  # a set in peft: make the file deterministic
        path.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
        # check the patterns as peft will read them back (key order of the file: peft takes the first match)
        obj = json.loads(path.read_text(encoding="utf-8"))
        _check_pattern_keys(obj["rank_pattern"], obj["r"], "the rank")
        _check_pattern_keys(obj["alpha_pattern"], obj["lora_alpha"], "alpha")

    return _write_dir(
        Path(out_dir),
        [
            (PEFT_WEIGHTS_NAME, _write_safetensors(tensors, {"format": "pt"})),
            (PEFT_CONFIG_NAME, write_config),
        ],
    )


# ---------------------------------------------------------------------- own format
def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def save(handle: Supernet, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save the live candidates of any kind and the head in prunepeft's own format.

    Writes ``prunepeft_config.json`` (format version, the :class:`SpaceConfig`, the model type, per
    candidate its live width and the ORIGINAL block ids it keeps, the head parameter names, a
    sha256 of the weights file and ``extra`` verbatim) and ``prunepeft_weights.safetensors``
    (``"<candidate>.D"``, ``.Ut``, ``.bd``, ``.bu`` of every live candidate, rows of unmasked blocks
    only, in original block order; ``"head.<parameter>"``). The handle is not modified.
    :func:`load` re-attaches the result to a fresh copy of the base model.

    Args:
        handle: the supernet handle (attached).
        out_dir: directory to write; created if needed, existing files of this format are replaced.
        extra: JSON-serialisable data stored verbatim (e.g. the search's history).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    bank = handle.bank
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"save: extra must be a dict or None, got {type(extra).__name__}")
    orig = bank.orig_block.cpu()
    widths = bank.effective_widths()
    tensors: dict[str, torch.Tensor] = {}
    cands = []
    for c, spec in enumerate(bank.specs):
        blocks = sorted(_live_blocks(bank, c), key=lambda b: int(orig[b]))
        cands.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "width": widths[c],
                "blocks": [int(orig[b]) for b in blocks],
            }
        )
        if blocks:
            for key, t in _live_tensors(bank, c, blocks).items():
                tensors[f"{spec.name}.{key}"] = t
    params, _ = _head(handle)
    for name, p in params.items():
        tensors[f"head.{name}"] = p.detach().contiguous().cpu().clone()
    meta = {
        "format": "prunepeft",
        "format_version": FORMAT_VERSION,
        "model_type": handle.space.model_type,
        "model_class": type(handle.model).__name__,
        "space_config": dataclasses.asdict(handle.space.config),
        "num_params": handle.num_trainable(),
        "candidates": cands,
        "head": list(params),
        "extra": extra,
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: extra must be JSON-serialisable: {e}") from None

    def write_config(path: Path) -> None:  # after the weights: it records their hash
        meta["weights_sha256"] = file_sha256(path.parent / WEIGHTS_NAME)
        _write_json(meta)(path)

    version = {"format": "prunepeft", "format_version": str(FORMAT_VERSION)}
    return _write_dir(
        Path(out_dir), [(WEIGHTS_NAME, _write_safetensors(tensors, version)), (CONFIG_NAME, write_config)]
    )


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check the config and weights written by :func:`save`."""
    from safetensors.torch import load_file

    if not path.is_dir():
        raise FileNotFoundError(f"prunepeft.load: {path} is not a directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"prunepeft.load: {path / name} is missing (not a prunepeft save?)")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"prunepeft.load: {path / CONFIG_NAME} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "prunepeft":
        raise ValueError(f"prunepeft.load: {path / CONFIG_NAME} is not a prunepeft config")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"prunepeft.load: unknown format version {version!r} in {path / CONFIG_NAME} "
            f"(this prunepeft reads versions 1 to {FORMAT_VERSION}; a newer prunepeft wrote it?)"
        )
    missing = {"model_type", "space_config", "candidates", "head", "weights_sha256"} - set(meta)
    if missing:
        raise ValueError(f"prunepeft.load: {path / CONFIG_NAME} is corrupt: no {', '.join(sorted(missing))}")
    if file_sha256(path / WEIGHTS_NAME) != meta["weights_sha256"]:
        raise ValueError(
            f"prunepeft.load: {path / WEIGHTS_NAME} is corrupt or truncated (its sha256 does not match "
            f"the one recorded in {CONFIG_NAME}), or the two files come from different saves"
        )
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"prunepeft.load: cannot read {path / WEIGHTS_NAME}: {e}") from None
    return meta, tensors


def load(model: nn.Module, path: str | os.PathLike) -> Supernet:
    """Re-attach what :func:`save` wrote to a fresh copy of the base model.

    Builds the space from the saved :class:`SpaceConfig`, attaches it, reduces every candidate to
    its saved blocks (masks the others and compacts the bank), then copies the candidates' and the
    head's weights in. The model then computes what the saved one did.

    Args:
        model: the base model the save was made on (same architecture, weights and head), without a
            supernet attached.
        path: the directory :func:`save` wrote.

    Returns:
        The :class:`Supernet` handle, ready to evaluate or to keep training.

    Raises:
        FileNotFoundError: ``path`` or one of its files is missing.
        ValueError: a corrupt or truncated file, an unknown format version, another model type, or
            candidates / head parameters that do not match the model's.
    """
    path = Path(path)
    meta, tensors = _read(path)
    model_type = _model_type(model)
    if meta["model_type"] != model_type:
        raise ValueError(
            f"prunepeft.load: {path} was saved from a {meta['model_type']!r} model, "
            f"not {model_type!r} ({type(model).__name__})"
        )
    try:
        config = SpaceConfig(**meta["space_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"prunepeft.load: the saved space config is not valid here: {e}") from None
    space = SearchSpace.from_model(model, config)
    names = [s.name for s in space.candidates]
    saved_names = [c["name"] for c in meta["candidates"]]
    if names != saved_names:
        extra_saved = [n for n in saved_names if n not in set(names)]
        extra_model = [n for n in names if n not in set(saved_names)]
        detail = (
            f"saved but not in the model: {extra_saved[:5]}; in the model but not saved: {extra_model[:5]}"
            if extra_saved or extra_model
            else "same candidates in another order"
        )
        raise ValueError(f"prunepeft.load: the model's candidates do not match the saved ones ({detail})")

    handle = attach(model, space)
    try:
        _restore(handle, meta, tensors)
    except BaseException:
        handle.detach()
        raise
    return handle


@torch.no_grad()
def _restore(handle: Supernet, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    bank = handle.bank
    keep = torch.zeros(bank.num_blocks, dtype=torch.bool)
    for c, entry in enumerate(meta["candidates"]):
        own = bank.candidate_blocks(c)
        for b in entry["blocks"]:
            if b not in own:
                raise ValueError(
                    f"prunepeft.load: block {b} of {entry['name']} is not one of its blocks ({own.start}..{own.stop - 1})"
                )
            keep[b] = True
    bank.set_block_mask(keep)
    bank.compact()
    widths = bank.widths()
    for c, entry in enumerate(meta["candidates"]):
        if widths[c] != entry["width"]:
            raise ValueError(
                f"prunepeft.load: {entry['name']} has width {widths[c]} after restoring its blocks, saved {entry['width']}"
            )
        if not widths[c]:
            continue
        for key, dst in bank.candidate_tensors(c).items():
            name = f"{entry['name']}.{key}"
            src = tensors.get(name)
            if src is None or tuple(src.shape) != tuple(dst.shape):
                got = "missing" if src is None else f"shape {tuple(src.shape)}"
                raise ValueError(f"prunepeft.load: weights {name}: {got}, expected shape {tuple(dst.shape)}")
            dst.copy_(src)
    params, _ = _head(handle)
    if set(params) != set(meta["head"]):
        raise ValueError(
            f"prunepeft.load: head parameters differ: saved {sorted(meta['head'])}, model {sorted(params)}"
        )
    for name, p in params.items():
        src = tensors.get(f"head.{name}")
        if src is None or src.shape != p.shape:
            raise ValueError(f"prunepeft.load: head weight {name} is missing or has another shape")
        p.copy_(src)
