"""bench/bench_gpu.py end to end on CPU.

``--cpu-smoke`` runs every part of the GPU benchmark it can through the Triton interpreter at tiny
shapes (the code a GPU run executes at the real shapes), writes rows that append cleanly to the
committed ``bench/results/gpu.csv`` and the figure, writes the GPU-only parts as ``skipped`` rows with
the reason, and exits 0; a spent ``--budget-s`` skips what is left cleanly.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_gpu.py"


def _run(csv_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PRUNEPEFT_BACKEND", None)
    env.pop("BENCH_COMMIT", None)
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--csv", str(csv_path), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    rows = []
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    return r, rows


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def test_cpu_smoke_runs_every_part_end_to_end(tmp_path):
    out = tmp_path / "gpu.csv"
    r, rows = _run(out)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert re.search(r"^\[\d\d:\d\d:\d\d \+\s*[\d.]+s\] ", r.stdout, re.M), "progress lines carry timestamps"
    # the rows append to the committed results without a second layout
    assert _header(out) == _header(ROOT / "bench" / "results" / "gpu.csv")
    assert {row["status"] for row in rows} <= {"ok", "skipped"}, [row for row in rows if row["status"] not in ("ok", "skipped")]  # fmt: skip
    assert all(row["note"] for row in rows if row["status"] == "skipped")

    def ok(
        section: str, name: str, dtype: str | None = None, pruned: str | None = None
    ) -> list[dict[str, str]]:
        return [
            row for row in rows
            if row["section"] == section and row["name"].startswith(name) and row["status"] == "ok"
            and (dtype is None or row["dtype"] == dtype) and (pruned is None or row["pruned"] == pruned)
        ]  # fmt: skip

    for dt in ("float32", "float16"):
        for name in ("bottleneck fwd+bwd+|h|", "q,k,v group fwd+bwd+|h|", "bank scoring"):
            assert ok("check", name, dt), (name, dt)
    assert ok("check", "block_stats + AdaLoRA + EMA", "float32")
    assert ok("ceiling", "copy bandwidth") and ok("ceiling", "matmul")
    assert len(ok("scoring", "block_stats")) == 2
    for pruned in ("0%", "90%"):
        for variant in ("lora", "mixed"):
            assert ok("check", f"layer triton vs reference {variant}", "float32", pruned), (variant, pruned)
            for path in ("triton", "reference"):
                (t,) = ok("layer", f"{path} {variant} over fp32 base", "float32", pruned)
                assert t["unit"] == "ms" and float(t["value"]) > 0
        assert ok("layer", "peft LoRA (surviving ranks) over fp32 base", "float32", pruned)
    launches = [row["note"] for row in ok("layer", "triton lora over fp32 base", pruned="0%")]
    assert "4 fwd launches/step" in launches[0], launches  # q,k,v and gate,up grouped: 4 launches for 7 sites
    skipped = {(row["section"], row["name"]): row["note"] for row in rows if row["status"] == "skipped"}
    assert "CUDA" in skipped[("memory", "peak memory")]
    assert "no CUDA" in skipped[("layer", "NF4 base")]
    assert "interpreter" in skipped[("check", "bf16 checks")]
    assert ok("figure", "layer time vs pruned") and (tmp_path / "gpu_layer.png").stat().st_size > 1000


def test_spent_budget_skips_cleanly_and_never_mixes_layouts(tmp_path):
    out = tmp_path / "gpu.csv"
    out.write_text("a,b\n1,2\n")  # an older layout: the script must not append to it
    r, _ = _run(out, "--budget-s", "1")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert out.read_text() == "a,b\n1,2\n"
    with open(tmp_path / "gpu.new.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(row["status"] == "skipped" for row in rows)
    budget = [row for row in rows if "time budget" in row["note"]]
    assert {row["section"] for row in budget} >= {"check", "ceiling", "scoring", "layer", "figure"}
    assert any(row["name"] == "lora cases" for row in rows), "the layer cases are listed as skipped too"
    assert "skipped for the time budget" in r.stdout


def test_gpu_run_script_parses_and_fits_one_device_call():
    """bench/gpu_run.sh is valid bash, and the documented one-command form fits a 2,000-character line."""
    script = ROOT / "bench" / "gpu_run.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    readme = (ROOT / "bench" / "README.md").read_text()
    (command,) = re.findall(r"^\s+command:\s+(.+)$", readme, re.M)
    assert "bash bench/gpu_run.sh" in command and len(command) <= 2000
    assert re.search(r'^\s+carry:\s+\["wheels"\]$', readme, re.M)
    assert "/wheels/" in (ROOT / ".gitignore").read_text().splitlines()


def test_a_failed_check_or_a_raising_item_exits_non_zero_and_the_rest_still_runs(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_gpu as bg
    finally:
        sys.path.remove(str(ROOT / "bench"))
    monkeypatch.setattr(bg, "SMOKE", True)  # as if --cpu-smoke had been on the command line
    monkeypatch.setattr(bg, "RUN", None)

    def fail(sh, dt, k):
        bg.record(
            bg.Result(
                "check", "bottleneck fwd+bwd+|h| (rel err)", bg.dname(dt), status="FAIL", note="planted"
            )
        )

    def boom(*a):
        raise RuntimeError("planted")

    done = []
    monkeypatch.setattr(bg, "check_bottleneck", fail)
    monkeypatch.setattr(bg, "check_group", boom)
    for name in ("check_bank_scoring", "check_scoring", "ceilings", "matmul_rate", "time_scoring"):
        monkeypatch.setattr(bg, name, lambda *a, name=name: done.append(name))
    monkeypatch.setattr(bg, "build_layer", lambda sh: "layer")
    monkeypatch.setattr(bg, "layer_case", lambda layer, mixed, frac: done.append((mixed, frac)))
    monkeypatch.setattr(bg, "figure", lambda rows, path, title: done.append("figure"))
    out = tmp_path / "gpu.csv"
    assert bg.main(["--cpu-smoke", "--csv", str(out), "--budget-s", "0"]) == 1
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows if r["name"].startswith("bottleneck")] == ["FAIL", "FAIL"]
    assert [r["note"] for r in rows if r["status"] == "error"] == ["RuntimeError: planted"] * 2
    assert done.count("check_bank_scoring") == 2 and "figure" in done and (True, 0.9) in done
