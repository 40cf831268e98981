"""The ``prunepeft`` command.

prunepeft demo     run the embedded walk-through offline (all-MiniLM-L6-v2 on BBC News)
prunepeft info     show versions, backends and supported architectures
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prunepeft",
        description="Find which PEFT modules to train, where and how wide, by hybrid pruning of a supernet.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded walk-through offline (a few minutes on 2 CPU cores)")
    demo.add_argument("--quick", action="store_true", help="a much smaller run (smoke test, under a minute)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sub.add_parser("info", help="show versions, backends and supported architectures")
    args = parser.parse_args(argv)

    if args.command == "info":
        import torch

        import prunepeft

        print(f"prunepeft {prunepeft.__version__}, torch {torch.__version__}")
        print(
            f"backends: {', '.join(prunepeft.available_backends())} (in use: {prunepeft.get_backend().__name__})"
        )
        print(f"architectures: {', '.join(sorted(prunepeft.ARCHITECTURES))}")
        return 0

    from .demo import DemoConfig, run

    cfg = DemoConfig(seed=args.seed)
    if args.quick:
        cfg = DemoConfig(seed=args.seed, train_docs=64, test_docs=32, max_length=64, batch_size=8,
                         warmup_steps=3, rounds=2, steps_per_round=2, final_steps=3)  # fmt: skip
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
