"""`openvla-align <command>`: thin wrappers around the package's modules."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _cmd_teachers(args) -> int:
    from .teachers import list_teachers, teacher_spec

    names = list_teachers(args.pattern)
    print(f"{'teacher':<31}{'width':>6}{'patch':>6}{'input':>7}{'grid':>7}  weights")
    for name in names:
        spec = teacher_spec(name)
        if spec is None:
            print(f"{name:<31}{'?':>6}{'?':>6}{'?':>7}{'?':>7}  (plugin gave no spec)")
            continue
        res = spec.default_resolution()
        side = res // spec.patch_size
        grid = f"{side}x{side}"
        print(f"{name:<31}{spec.width:>6}{spec.patch_size:>6}{res:>7}{grid:>7}  {spec.weights_hint}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(out_dir=args.out, steps=args.steps, seed=args.seed, lr=args.lr))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="openvla-align", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("teachers", help="List registered teachers: width, patch, native grid, where weights go.")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch filter, e.g. 'dinov2*'")
    p.set_defaults(func=_cmd_teachers)

    p = sub.add_parser("demo", help="SFT vs SFT+Align on tiny random-weight models and generated data (CPU).")
    p.add_argument("--out", default="openvla_align_demo", help="output directory")
    p.add_argument("--steps", type=int, default=60, help="LoRA steps per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=DemoConfig.lr, help="LoRA learning rate")
    p.set_defaults(func=_cmd_demo)

    probe = sub.add_parser("probe", help="Diagnostics: linear probe, attention maps, t-SNE, VL-Think questions.")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True)
    from .probe import attention, linear, tsne, vlthink

    for module in (linear, attention, tsne, vlthink):
        module.add_parser(probe_sub)

    from . import bench
    from .cache import build as cache_build
    from .openvla import merge, patch

    cache_build.add_parser(sub)
    bench.add_parser(sub)
    from .data import build as data_build

    data_build.add_parser(sub)
    from .eval import report as eval_report
    from .eval import run as eval_run

    evaluation = sub.add_parser("eval", help="Evaluation in the paper's Simpler environments and its tables.")
    eval_sub = evaluation.add_subparsers(dest="eval_command", required=True)
    eval_run.add_parser(eval_sub)
    eval_report.add_parser(eval_sub)

    merge.add_parser(sub)
    patch.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
