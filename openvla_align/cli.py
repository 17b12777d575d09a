"""`openvla-align <command>`: thin wrappers around the package's modules.

Each command's module is imported only when that command runs, so `openvla-align --help` and `openvla-align
teachers` start without torch (see COMMANDS).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional


def _add_teachers(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch filter, e.g. 'dinov2*'")
    p.set_defaults(func=_cmd_teachers)


def _cmd_teachers(args) -> int:
    from .teachers import broken_plugins, list_teachers, teacher_spec

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
    for message in broken_plugins().values():
        print(f"not loaded: {message}")
    return 0


# command -> (one-line help, what adds it): a module whose `add_parser(subparsers)` adds the command with its
# arguments (imported only when that command runs), a nested table, or a function given the command's parser.
COMMANDS = {
    "teachers": ("List registered teachers: width, patch, native grid, where weights go.", _add_teachers),
    "demo": ("SFT vs SFT+Align on tiny random-weight models and generated data (CPU).", "openvla_align.demo"),
    "probe": (
        "Diagnostics: linear probe, attention maps, t-SNE, VL-Think questions.",
        {
            "linear": (
                "Linear probe of frozen visual features on an ImageFolder dataset (paper: ImageNet-100 top-1).",
                "openvla_align.probe.linear",
            ),
            "attention": (
                "Attention of a prompt token over the 16x16 visual grid, per layer, as heat maps on the image.",
                "openvla_align.probe.attention",
            ),
            "tsne": (
                "t-SNE of per-class embeddings at chosen layers, with k-NN/silhouette separability per layer.",
                "openvla_align.probe.tsne",
            ),
            "vlthink": (
                "VL-Think questions: does the model see and locate named boards? Per-domain accuracy.",
                "openvla_align.probe.vlthink",
            ),
        },
    ),
    "cache": ("Precompute teacher features once (training then reads them).", "openvla_align.cache.build"),
    "bench": ("Step time and peak memory: SFT vs Align (live, cache) vs the reference.", "openvla_align.bench"),
    "data": ("The paper's RLDS data: build it from collected episodes, or synthesise.", "openvla_align.data.build"),
    "eval": (
        "Evaluation in the paper's Simpler environments and its tables.",
        {
            "run": ("Roll the model out in the paper's Simpler environments (needs them).", "openvla_align.eval.run"),
            "report": ("Tables (Markdown + CSV) and charts from evaluation results.", "openvla_align.eval.report"),
        },
    ),
    "merge": ("Merge a LoRA adapter into its base model once, offline, on one process.", "openvla_align.openvla.merge"),
    "patch": (
        "Add the finetune-plugin mechanism to an OpenVLA checkout's vla-scripts/finetune.py (once).",
        "openvla_align.openvla.patch",
    ),
}


def _add_commands(subparsers, table: dict, argv: List[str], dest: str) -> None:
    """Add ``table``'s commands; only the one ``argv`` names is built in full (its module imported)."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (help_text, target) in table.items():
        if name != chosen:
            subparsers.add_parser(name, help=help_text)  # listed by --help; never parsed (another command runs)
        elif isinstance(target, dict):
            group = subparsers.add_parser(name, help=help_text, description=help_text)
            sub = group.add_subparsers(dest=f"{name}_{dest}", required=True)
            _add_commands(sub, target, argv[argv.index(name) + 1 :], dest)
        elif isinstance(target, str):
            parser = importlib.import_module(target).add_parser(subparsers)
            parser.description = parser.description or help_text
        else:
            target(subparsers.add_parser(name, help=help_text, description=help_text))


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The CLI's parser, built in full for the command ``argv`` names (all of them listed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="openvla-align", description=__doc__.splitlines()[0])
    _add_commands(parser.add_subparsers(dest="command", required=True), COMMANDS, argv, "command")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
