"""``report.md`` and ``report.png`` for a search result.

The figure: a layers x (kind, role) heatmap of the widths that survived, trainable parameters and
loss per round against the budget, and step time per round (it falls as the bank is compacted).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def write_report(result, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` for ``result`` (a SearchResult) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "report.png"
    _plot(result, png)
    md = out / "report.md"
    md.write_text(_markdown(result), encoding="utf-8")
    return md, png


def _columns(result) -> list[tuple[str, str]]:
    cols = sorted({(k["kind"], k["role"]) for k in result.kept})
    return cols or [("lora", "q")]


def _markdown(result) -> str:
    cfg = result.config
    lines = [
        "# prunepeft search report",
        "",
        f"- model type: `{result.model_type}`; task: {result.task.get('kind')}",
        f"- strategy `{cfg['strategy']}`, granularity `{cfg['granularity']}`, {cfg['rounds']} rounds x "
        f"{cfg['steps_per_round']} steps after a {cfg['warmup_steps']}-step warm-up",
        f"- trainable parameters: **{result.params:,}** (budget {result.budget:,}; supernet "
        f"{result.supernet_params:,}; base model {result.base_params:,})",
        f"- search wall time {result.search_seconds:.1f} s; final training {result.final.get('seconds', 0):.1f} s "
        f"({result.final.get('steps', 0)} steps, init `{result.final.get('init')}`)",
    ]
    if result.final.get("metrics"):
        lines.append(
            "- final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in result.final["metrics"].items())
        )
    costs = getattr(result, "costs", None) or {}
    if costs:
        total = sum(costs.values())
        lines += ["", "## Cost", "", "| part | seconds | share |", "|---|---:|---:|"]
        what = {"warmup": "warm-up steps", "rounds": "round steps", "scoring": "scoring, selection, compaction",
                "evaluation": "validation checks", "state": "checkpoints", "final": "final training"}  # fmt: skip
        for k, v in costs.items():
            lines.append(
                f"| {what.get(k, k)} | {v:.1f} | {100 * v / total:.0f}% |" if total else f"| {k} | {v} | |"
            )
    lines += ["", "## Kept modules", "", "| layer | role | kind | width | of |", "|---|---|---|---|---|"]
    lines += [
        f"| {k['layer']} | {k['role']} | {k['kind']} | {k['width']} | {k['max_width']} |" for k in result.kept
    ]
    if result.assignment:
        lines += ["", "## Criteria by region (hybrid warm-up)", "", "| region | criteria |", "|---|---|"]
        lines += [f"| {r} | {', '.join(c)} |" for r, c in sorted(result.assignment["regions"].items())]
    lines += ["", "## Rounds", "", "| round | target | params | pruned | loss | eval | ms/step | s |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for h in result.history:
        ev = ", ".join(f"{k} {v:.4f}" for k, v in (h.get("eval") or {}).items())
        lines.append(
            f"| {h['round']} | {h['target']:,} | {h['params']:,} | {len(h['pruned'])} {h['granularity']}s | "
            f"{_fmt(h.get('loss'))} | {ev} | {_fmt((h.get('step_seconds') or math.nan) * 1e3, 0)} | {_fmt(h.get('seconds'), 1)} |"
        )
    lines += ["", "![report](report.png)", ""]
    return "\n".join(lines)


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def _plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = _columns(result)
    n_layers = max([k["layer"] for k in result.kept], default=0) + 1
    grid = np.zeros((n_layers, len(cols)))
    for k in result.kept:
        grid[k["layer"], cols.index((k["kind"], k["role"]))] = k["width"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(
        range(len(cols)), [f"{kind.replace('_adapter', '')}\n{role}" for kind, role in cols], fontsize=8
    )
    ax.set_ylabel("layer")
    ax.set_title("surviving width")
    fig.colorbar(im, ax=ax)
    rounds = [0] + [h["round"] for h in result.history]
    params = [result.supernet_params] + [h["params"] for h in result.history]
    ax = axes[1]
    ax.plot(rounds, params, "o-", label="trainable params")
    ax.axhline(result.budget, color="r", ls="--", label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.legend(loc="upper right")
    losses = [h.get("loss") for h in result.history]
    if any(v is not None and math.isfinite(v) for v in losses):
        ax2 = ax.twinx()
        ax2.plot(
            rounds[1:],
            [v if v is not None else math.nan for v in losses],
            "s-",
            color="tab:orange",
            label="loss",
        )
        ax2.set_ylabel("loss")
    ax.set_title("parameters and loss per round")
    ax = axes[2]
    ax.plot(rounds[1:], [(h.get("step_seconds") or math.nan) * 1e3 for h in result.history], "o-")
    ax.set_xlabel("round")
    ax.set_ylabel("ms / step")
    ax.set_title("step time per round")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
