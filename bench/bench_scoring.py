"""Figure 1 of the foundation issue: one-pass block scoring (``block_stats``) at memory speed.

Streams a bank larger than the last-level cache (LLC), so that the figure is the DRAM bandwidth
the kernel reaches, not the cache's: a Llama-7B-shaped bank (``bench_scale.llama_spec``, the
segment structure of the 7B supernet) with as many layers as make param + grad at least
``--llc-multiple`` (default 4) times the LLC; the LLC size is read from sysfs (``lscpu`` as a
fallback) and summed over its instances. With random parameters and gradients it times the native
C++ ``block_stats`` (every criterion's statistics; then with the AdaLoRA sensitivity/uncertainty
update) at 1 and 2 threads, and in the same run a copy of the same bytes (param and grad, read +
written) at the same thread counts: the ceiling. The timed calls are interleaved (copy, kernel at
each thread count, again ...), so that load changes on a shared machine hit all of them alike;
each figure is the median of ``--repeat`` runs after a warm-up.

GB/s counts the bytes the pass must touch: params + grads read (8 B/element), plus sens/unc read
and written (16 B/element) with AdaLoRA. The goal (issue 12) is scoring >= 0.6x the copy's
read+write GB/s. The pure-torch reference is timed on the same bank (``--reference-repeat`` runs,
it takes seconds per call) for the speed-up column. ``--bank minilm`` times the earlier, smaller
bank instead (all-MiniLM-L6-v2 supernet, 1.9M elements: fits in a 32 MiB LLC).

Rows go to ``bench/results/scoring.csv`` with the bank, its size, the LLC size, whether the bank
exceeds it and the load average (a noise indicator on shared machines).

    python bench/bench_scoring.py [--repeat 21] [--threads 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_scale import ScaleConfig, interleaved_medians, llama_spec  # noqa: E402
from common import RESULTS, append_rows, stamp, versions  # noqa: E402

from prunepeft import get_backend  # noqa: E402

MiB = 2**20


@dataclass
class ScoringConfig:
    """What to time; see the module docstring."""

    bank: str = "llama"  # llama (sized to llc_multiple x LLC) or minilm (the earlier in-cache bank)
    llc_multiple: float = 4.0  # param + grad bytes >= this x the LLC
    threads: tuple[int, ...] = (1, 2)  # native n_threads, and torch threads for the copy
    repeat: int = 21  # interleaved timed runs (median)
    warmup: int = 2
    reference_repeat: int = 3  # runs of the reference backend (0: skip it)


@dataclass
class Bank:
    name: str
    param: torch.Tensor
    grad: torch.Tensor
    seg: torch.Tensor
    n_owners: int
    llc_bytes: int | None
    note: str = ""

    @property
    def n(self) -> int:
        return self.param.numel()


@dataclass
class Row:
    op: str
    backend: str
    adalora: bool
    n_threads: int
    params: int
    seconds: float
    gb_per_s: float
    ratio_to_memcpy: float | str = ""
    ratio_to_reference: float | str = ""


# ----------------------------------------------------------------------------- machine


def llc_bytes() -> int | None:
    """Size of the last-level cache summed over its instances (sysfs; lscpu as a fallback)."""
    best_level, sizes = -1, {}
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/type") as f:
                kind = f.read().strip()
            with open(f"{index}/size") as f:
                size = _parse_size(f.read())
            with open(f"{index}/shared_cpu_list") as f:
                shared = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size is None:
            continue
        if level > best_level:
            best_level, sizes = level, {}
        if level == best_level:
            sizes[shared] = size  # one entry per instance
    if sizes:
        return sum(sizes.values())
    try:  # lscpu: "L3 cache: 32 MiB (1 instance)"
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.findall(r"^L(\d) cache:\s*([\d.]+\s*[KMG]i?B?)", out, flags=re.M)
    return _parse_size(max(found)[1]) if found else None


def _parse_size(text: str) -> int | None:
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)", text)
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


# ----------------------------------------------------------------------------- banks


def llama_bank(llc: int | None, multiple: float) -> Bank:
    """Llama-7B-shaped layers, as many as make param + grad >= multiple x LLC (32 MiB if unknown)."""
    ref = get_backend("reference")
    per_layer = ref.plan(*llama_spec(ScaleConfig(n_layers=1)))["total"] * 8
    target = multiple * (llc or 32 * MiB)
    n_layers = max(1, math.ceil(target / per_layer))
    spec = llama_spec(ScaleConfig(n_layers=n_layers))
    p = get_backend("native").plan(*spec)
    n = p["total"]
    g = torch.Generator().manual_seed(0)
    return Bank(f"llama7b-{n_layers}L", torch.randn(n, generator=g), torch.randn(n, generator=g), p["seg"],
                p["block"].shape[0] + spec[0].numel(), llc, "" if llc else "LLC unknown: assumed 32 MiB")  # fmt: skip


def minilm_bank(llc: int | None) -> Bank:
    from common import load_minilm, minilm_supernet_config

    from prunepeft import attach

    model, _ = load_minilm()
    bank = attach(model, minilm_supernet_config()).bank
    n = bank.num_params(effective=False)
    g = torch.Generator().manual_seed(0)
    return Bank("minilm", torch.randn(n, generator=g), torch.randn(n, generator=g), bank.plan["seg"],
                bank.num_blocks + bank.num_candidates, llc)  # fmt: skip


# ----------------------------------------------------------------------------- timing


def measure(bank: Bank, cfg: ScoringConfig) -> list[Row]:
    native, ref = get_backend("native"), get_backend("reference")
    n = bank.n
    src = torch.cat([bank.param, bank.grad])
    dst = torch.empty_like(src)
    torch_threads = torch.get_num_threads()

    def copy(t: int) -> Callable[[], object]:
        def run() -> None:
            torch.set_num_threads(t)
            dst.copy_(src)

        return run

    rows: list[Row] = []
    try:
        for adalora in (False, True):
            sens = torch.zeros(n) if adalora else None
            unc = torch.zeros(n) if adalora else None

            def stats(be, t: int = 0, sens=sens, unc=unc) -> Callable[[], object]:
                return lambda: be.block_stats(bank.param, bank.grad, bank.seg, bank.n_owners, 1e-3, sens, unc,
                                              0.85, 0.85, None, -1.0, *((t,) if be is native else ()))  # fmt: skip

            fns: dict[str, Callable[[], object]] = {}
            for t in cfg.threads:
                fns[f"copy{t}"] = copy(t)
                fns[f"native{t}"] = stats(native, t)
            med = interleaved_medians(fns, cfg.repeat, cfg.warmup)
            t_ref = None
            if cfg.reference_repeat > 0:
                t_ref = interleaved_medians({"ref": stats(ref)}, cfg.reference_repeat, 0)["ref"]
            nbytes = n * (24 if adalora else 8)
            for t in cfg.threads:
                copy_gbs = 2 * src.numel() * 4 / med[f"copy{t}"] / 1e9  # read + write
                if not adalora:
                    rows.append(Row("memcpy", "torch", False, t, n, med[f"copy{t}"], copy_gbs))
                gbs = nbytes / med[f"native{t}"] / 1e9
                rows.append(Row("block_stats", "native", adalora, t, n, med[f"native{t}"], gbs, gbs / copy_gbs,
                                t_ref / med[f"native{t}"] if t_ref else ""))  # fmt: skip
            if t_ref:
                rows.append(Row("block_stats", "reference", adalora, torch_threads, n, t_ref, nbytes / t_ref / 1e9,
                                "", 1.0))  # fmt: skip
    finally:
        torch.set_num_threads(torch_threads)
    return rows


# ----------------------------------------------------------------------------- output


def _fmt(x: float | str, spec: str) -> str:
    return format(x, spec) if isinstance(x, float) else "-"


def write_rows(rows: list[Row], bank: Bank) -> None:
    llc = bank.llc_bytes
    bank_bytes = bank.n * 8
    common = {"bank": bank.name, "bank_mib": round(bank_bytes / MiB, 1), "llc_mib": round(llc / MiB, 1) if llc else "",
              "exceeds_llc": bool(llc and bank_bytes > llc), "loadavg": round(os.getloadavg()[0], 2),
              "versions": versions(), "note": bank.note}  # fmt: skip
    out = [{"op": r.op, "backend": r.backend, "adalora": r.adalora, "params": r.params, "seconds": r.seconds,
            "gb_per_s": r.gb_per_s, "ratio_to_reference": r.ratio_to_reference, "n_threads": r.n_threads,
            "ratio_to_memcpy": r.ratio_to_memcpy, **common} for r in rows]  # fmt: skip
    _migrate_header("scoring", list(out[0]) + list(stamp()))
    print("wrote", append_rows("scoring", out))


def _migrate_header(name: str, fields: list[str]) -> None:
    """Rewrite ``bench/results/<name>.csv`` under ``fields`` if its header differs (older rows keep
    their values, new columns stay empty), so that appended rows line up with the header."""
    path = RESULTS / f"{name}.csv"
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames == fields:
            return
        old = list(reader)
    extra = [k for k in (reader.fieldnames or []) if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + extra)
        w.writeheader()
        w.writerows(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ScoringConfig()
    ap.add_argument("--bank", choices=("llama", "minilm"), default=d.bank)
    ap.add_argument("--llc-multiple", type=float, default=d.llc_multiple)
    ap.add_argument("--threads", type=int, nargs="+", default=list(d.threads))
    ap.add_argument("--repeat", type=int, default=d.repeat)
    ap.add_argument("--reference-repeat", type=int, default=d.reference_repeat, help="0: skip the reference")
    ap.add_argument("--quick", action="store_true", help="5 runs, no reference: a smoke test")
    args = ap.parse_args()
    cfg = ScoringConfig(
        args.bank, args.llc_multiple, tuple(args.threads), args.repeat, d.warmup, args.reference_repeat
    )
    if args.quick:
        cfg.repeat, cfg.warmup, cfg.reference_repeat = 5, 1, 0

    llc = llc_bytes()
    bank = llama_bank(llc, cfg.llc_multiple) if cfg.bank == "llama" else minilm_bank(llc)
    llc_txt = f"{llc / MiB:.0f} MiB" if llc else "unknown"
    print(f"bank {bank.name}: {bank.n:,} elements, {bank.seg.shape[0]:,} segments, param+grad "
          f"{bank.n * 8 / MiB:.0f} MiB; LLC {llc_txt}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    rows = measure(bank, cfg)
    for r in rows:
        print(f"{r.op:11} {r.backend:9} adalora={r.adalora!s:5} threads={r.n_threads}: {r.seconds * 1e3:9.2f} ms "
              f"{r.gb_per_s:7.2f} GB/s  {_fmt(r.ratio_to_memcpy, '.2f')}x memcpy  "
              f"{_fmt(r.ratio_to_reference, '.1f')}x reference")  # fmt: skip
    write_rows(rows, bank)


if __name__ == "__main__":
    main()
