"""The resumable state of a search: written atomically after the warm-up and after every round.

``<output_dir>/state/`` holds the supernet's weights (prunepeft format), the optimizer state and
AdaLoRA buffers, the RNG state, the head's initial values (for ``final_init="reinit"``) and
``progress.json`` (config, pruner state, step counters, losses). JSON and safetensors only. A new
state is written into ``state.tmp`` and swapped in with renames, so a kill never leaves a
half-written state behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .result import atomic_write_json, json_default, read_json
from .supernet import Supernet

STATE_DIR = "state"
PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    """Counters a resumed search continues from (besides the pruner's own state)."""

    step: int = 0
    skipped: int = 0
    bad_in_row: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    warm_consumed: int = 0
    main_consumed: int = 0
    search_seconds: float = 0.0
    supernet_params: int = 0
    costs: dict = field(default_factory=dict)  # seconds by part: warmup, rounds, scoring, evaluation, state


def has_state(out: Path) -> bool:
    return (out / STATE_DIR / PROGRESS_FILE).exists()


def save_state(
    out: Path,
    handle: Supernet,
    optimizer: torch.optim.Optimizer,
    config: dict,
    pruner: dict,
    progress: Progress,
    head_init: list[torch.Tensor],
) -> None:
    """Write the whole search state into a fresh directory, then swap it in (atomic on POSIX)."""
    from safetensors.torch import save_file

    from .export import save as save_weights

    state_dir = out / STATE_DIR
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(handle, tmp / "weights")
    tensors = {}
    for i, p in enumerate(handle.parameters()):
        for k, v in optimizer.state.get(p, {}).items():
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
    atomic_write_json(tmp / PROGRESS_FILE, {"config": config, "pruner": pruner, "progress": asdict(progress)})
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    if old.exists():
        shutil.rmtree(old)


def read_progress(out: Path, config: dict) -> tuple[dict, Progress]:
    """``(pruner state, progress)`` of the interrupted search in ``out``; its config must equal ``config``."""
    d = read_json(out / STATE_DIR / PROGRESS_FILE)
    if d.get("config") != json.loads(json.dumps(config, default=json_default)):
        raise ValueError(
            "the SearchConfig differs from the interrupted search's; resume with the same config"
        )
    return d["pruner"], Progress(**d["progress"])


def load_weights(out: Path, model) -> Supernet:
    from .export import load

    return load(model, out / STATE_DIR / "weights")


def restore(out: Path, handle: Supernet, optimizer: torch.optim.Optimizer, n_head: int) -> list[torch.Tensor]:
    """Put the optimizer state, AdaLoRA buffers and RNG back; returns the head's initial values."""
    from safetensors.torch import load_file

    state_dir = out / STATE_DIR
    tensors = load_file(str(state_dir / "optimizer.safetensors"))
    for i, p in enumerate(handle.parameters()):
        st = {k.split(".", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if st:
            optimizer.state[p] = st
    if "bank.sens" in tensors:
        handle.bank.sens, handle.bank.unc = tensors["bank.sens"], tensors["bank.unc"]
    torch.set_rng_state(load_file(str(state_dir / "rng.safetensors"))["torch"])
    head = load_file(str(state_dir / "head_init.safetensors"))
    return [head[str(i)] for i in range(n_head)]


def clear(out: Path) -> None:
    state_dir = out / STATE_DIR
    if state_dir.exists():
        shutil.rmtree(state_dir)
