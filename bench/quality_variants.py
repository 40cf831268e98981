"""The table of every search variant tried (``bench/results/quality_variants.md``).

Variants run with ``bench_quality.py --csv quality_dev --variant NAME --search JSON`` on a cheaper
screening setup (SST-2 and AG News, 3 seeds, learning rate 2e-3, budget r8, 200 final steps). Each variant's search methods
are paired with the reference uniform LoRA q,v runs (variant ``ref``) of the same task and seed.
Decisions read the **validation split** (carved from the training data); the eval-set column is
shown for completeness and decides nothing.

    python bench/quality_variants.py [--csv quality_dev]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import bootstrap_ci  # noqa: E402
from common import RESULTS, read_rows  # noqa: E402

NOTES_FILE = "quality_variants_notes.json"  # variant -> what it changes, in words


def table(rows: list[dict], ref_variant: str = "ref", ref_method: str = "lora_qv") -> list[str]:
    ref = {
        (r["task"], int(r["seed"])): r
        for r in rows
        if r["variant"] == ref_variant and r["method"] == ref_method
    }
    tasks = sorted({t for t, _ in ref})
    notes_path = RESULTS / NOTES_FILE
    notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    for r in rows:
        key = (r["variant"], r["method"])
        if key[0] == ref_variant:
            continue
        if key not in groups:
            order.append(key)
        groups[key].append(r)
    out = ["| variant | method | what changes | " + " | ".join(f"{t} (val)" for t in tasks)
           + " | val mean | val 95 % CI | W/L | eval mean |",
           "|---|---|---|" + "---:|" * (len(tasks) + 4)]  # fmt: skip
    for key in order:
        rs = groups[key]
        per_task, dv, de = defaultdict(list), [], []
        for r in rs:
            b = ref.get((r["task"], int(r["seed"])))
            if b is None:
                continue
            d = 100 * (float(r["val"]) - float(b["val"]))
            per_task[r["task"]].append(d)
            dv.append(d)
            de.append(100 * (float(r["value"]) - float(b["value"])))
        if not dv:
            continue
        lo, hi = bootstrap_ci(dv)
        cells = [f"{statistics.fmean(per_task[t]):+.1f}" if per_task[t] else "–" for t in tasks]
        w, loss = sum(d > 0 for d in dv), sum(d < 0 for d in dv)
        out.append(f"| {key[0]} | {key[1]} | {notes.get(key[0], '')} | " + " | ".join(cells)
                   + f" | {statistics.fmean(dv):+.2f} | [{lo:+.2f}, {hi:+.2f}] | {w}/{loss} | "
                   f"{statistics.fmean(de):+.2f} |")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default="quality_dev")
    args = ap.parse_args()
    rows = read_rows(args.csv)
    n_ref = sum(r["variant"] == "ref" for r in rows)
    lines = ["# Every search variant tried", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"{len(rows)} runs ({n_ref} reference). Differences are in points (accuracy or Pearson r x 100) of "
             "the variant's method minus uniform LoRA q,v r=8 on the same task and seed; W/L counts the pairs. "
             "No cost column: these runs shared the machine with other work at varying load.", "",
             *table(rows), "",
             "Variants run through the whole protocol (six tasks, five seeds, each with its own learning-rate "
             "choice) are in the section \"Search variants through the whole protocol\" of "
             "[quality.md](quality.md), against the same uniform LoRA q,v runs, on the eval set and the validation "
             "split.", ""]  # fmt: skip
    path = RESULTS / "quality_variants.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
