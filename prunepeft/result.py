"""``SearchResult``: what a search found, saved as ``result.json`` plus safetensors weights."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .supernet import Supernet

RESULT_FILE = "result.json"


@dataclass
class SearchResult:
    """What a search found (JSON-serialisable; weights are saved beside it in safetensors).

    Attributes:
        model_type, budget, params, base_params, supernet_params: sizes, in parameters.
        kept: the surviving candidates (name, kind, layer, role, site, width, max_width).
        assignment: the hybrid strategy's criteria per region and the warm-up counts (None otherwise).
        history: one record per round (target, params, pruned units, loss, validation metrics,
            seconds, and for the hybrid strategy Eq. 1's probability of every scored unit).
        warmup: warm-up steps and subset. final: the final training (steps, seconds, loss) and the
            metrics on the validation split (``val_metrics``) and on the eval set (``metrics``).
        search_seconds: wall time of warm-up + rounds (+ their validation evaluations).
        costs: seconds by part: ``warmup`` and ``rounds`` (training steps of the supernet),
            ``scoring`` (criteria, assignment, selection, compaction), ``evaluation`` (the rounds'
            validation checks), ``state`` (checkpoints), ``final`` (the final training).
        config: the :class:`~prunepeft.config.SearchConfig` as a dict. task: what the data was.
        handle: the attached supernet (in memory only).
    """

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
    costs: dict = field(default_factory=dict)
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
        for key, what in (("val_metrics", "validation split"), ("metrics", "eval set")):
            if self.final.get(key):
                m = ", ".join(f"{n} {v:.4f}" for n, v in self.final[key].items())
                lines.append(f"final ({self.final['steps']} steps), {what}: {m}")
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
        atomic_write_json(out / RESULT_FILE, self.to_dict())
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """Read ``result.json`` (a directory or the file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / RESULT_FILE
        if not p.exists():
            raise FileNotFoundError(f"no search result at {p}")
        d = read_json(p)
        missing = {f.name for f in fields(cls) if f.name not in ("handle", "costs")} - set(d)
        if missing:
            raise ValueError(f"{p} is not a complete search result (missing {sorted(missing)})")
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


def kept_modules(handle: Supernet) -> list[dict]:
    """The live candidates of ``handle`` with their effective widths."""
    out = []
    for spec, w in zip(handle.bank.specs, handle.bank.effective_widths(), strict=True):
        if w:
            out.append({"name": spec.name, "kind": spec.kind, "layer": spec.layer, "role": spec.role,
                        "site": spec.site, "width": w, "max_width": spec.width})  # fmt: skip
    return out


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
