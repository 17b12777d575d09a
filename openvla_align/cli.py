"""`openvla-align <command>`: the commands (one table, COMMANDS) and the one way they all behave.

Each command's module is imported only when that command runs, so `openvla-align --help` and `openvla-align
teachers` start without torch. Every option shows its default and every command an example; an error is one line
on stderr with exit status 1 (see ``main``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional


def _add_teachers(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch filter, e.g. 'dinov2*'")
    p.set_defaults(func=_cmd_teachers)


def _cmd_teachers(args) -> int:
    from .teachers import broken_plugins, list_teachers, teacher_spec

    names = list_teachers(args.pattern)
    if not names:
        known = ", ".join(list_teachers())
        raise LookupError(f"no registered teacher matches {args.pattern!r}; known teachers: {known}")
    print(f"{'teacher':<31}{'width':>6}{'patch':>6}{'input':>7}{'grid':>7}  weights")
    for name in names:
        spec = teacher_spec(name)
        if spec is None:
            print(f"{name:<31}{'?':>6}{'?':>6}{'?':>7}{'?':>7}  (plugin gave no spec)")
            continue
        res = spec.default_resolution()
        side = res // spec.patch_size
        grid = f"{side}x{side}"
        print(f"{name:<31}{spec.width:>6}{spec.patch_size:>6}{res:>7}{grid:>7}  {spec.where}")
    for message in broken_plugins().values():
        print(f"not loaded: {message}")
    return 0


# command -> (one-line help, what adds it): a module whose `add_parser(subparsers)` adds the command with its
# arguments (imported only when that command runs), a nested table, or a function given the command's parser.
COMMANDS = {
    "teachers": ("List registered teachers: width, patch, native grid, where weights go.", _add_teachers),
    "demo": ("The paper's experiment in miniature on the CPU: SFT vs SFT+Align.", "openvla_align.demo"),
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
        "Evaluation in Simpler (the paper's environments) or LIBERO (OpenVLA-OFT's), and the tables.",
        {
            "run": ("Roll the model out in Simpler or LIBERO (needs the simulator).", "openvla_align.eval.run"),
            "report": ("Tables (Markdown + CSV) and charts from evaluation results.", "openvla_align.eval.report"),
            "throughput": (
                "Episodes/s of eval run's batched loop vs OpenVLA-OFT's one-at-a-time LIBERO loop.",
                "openvla_align.eval.throughput",
            ),
        },
    ),
    "merge": ("Merge a LoRA adapter into its base model once, offline, on one process.", "openvla_align.openvla.merge"),
    "patch": (
        "Add the finetune-plugin mechanism to an OpenVLA checkout's vla-scripts/finetune.py (once).",
        "openvla_align.openvla.patch",
    ),
}


# One example per command, shown at the end of its --help.
EXAMPLES = {
    "teachers": "openvla-align teachers 'c-radio*'",
    "demo": "openvla-align demo --out demo_out --seeds 0 1 2",
    "probe linear": "openvla-align probe linear --data imagenet100/ --layer 16 --model openvla-7b/ "
    "--model openvla-7b/::runs/align/adapter --model teacher:c-radio-v3-l --out tables/table3.json",
    "probe attention": "openvla-align probe attention --model openvla-7b/ --adapter runs/align/adapter "
    "--image scene.png --prompt 'Do you see the carrot?' --out attention.png",
    "probe tsne": "openvla-align probe tsne --model openvla-7b/ --data coco_crops/ --classes cup,bottle,knife "
    "--layers 1,10,20 --out tsne.png",
    "probe vlthink": "openvla-align probe vlthink --data vlthink/items.jsonl --model openvla-7b/ "
    "--model openvla-7b/::runs/align/adapter --out vlthink/",
    "cache build": "openvla-align cache build /data/cache/sft-cradio-l --dataset sft --data-root /data/rlds "
    "--teacher c-radio-v3-l --teacher-path /models/C-RADIOv3-L",
    "cache verify": "openvla-align cache verify /data/cache/sft-cradio-l",
    "bench": "openvla-align bench --rounds 5 --out bench.json",
    "data build": "openvla-align data build mp_collect/PutOnPlateInScene25Main-v3/1400/data /data/rlds --name sft",
    "data synth": "openvla-align data synth /tmp/tiny-data --episodes 8",
    "eval run": "openvla-align eval run recipes/eval/ood.yaml --vla-path runs/warmup "
    "--adapter runs/<align-exp>--60000_chkpt --out eval/align",
    "eval throughput": "openvla-align eval throughput recipes/eval/libero-spatial.yaml --vla-path runs/oft-merged "
    "--oft-loop --out throughput.json",
    "eval report": "openvla-align eval report eval/sft eval/freeze eval/align --baseline eval/sft --out tables/table1",
    "merge": "openvla-align merge runs/<exp>--4000_chkpt --out runs/<exp>-merged",
    "patch": "openvla-align patch /path/to/openvla",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; every option's help ends with its default unless it says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        silent = action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
        if silent or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


def walk_parsers(parser: argparse.ArgumentParser):
    """``parser`` and every (nested) subcommand parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from walk_parsers(sub)


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
            parser = subparsers.add_parser(name, help=help_text, description=help_text)
            target(parser)
        if name == chosen and not isinstance(target, dict):
            _finish(parser, help_text)


def _finish(parser: argparse.ArgumentParser, help_text: str) -> None:
    """Defaults shown, a description (the one-line help if none) and the example, down every nested command."""
    parser.formatter_class = HelpFormatter
    parser.description = parser.description or help_text
    example = EXAMPLES.get(parser.prog.removeprefix("openvla-align "))
    if example and not parser.epilog:
        parser.epilog = f"example:\n  {example}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                _finish(sub, helps.get(name) or "")


DEBUG_ENV = "OPENVLA_ALIGN_DEBUG"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit status 2) that names the command and its --help.
    Subcommand parsers inherit the class (``add_subparsers`` makes its parsers of the parent's type)."""

    def error(self, message: str):
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: {text} (usage: {self.prog} --help)\n")


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The CLI's parser, built in full for the command ``argv`` names (all of them listed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser(
        prog="openvla-align",
        description="Visual Representation Alignment for OpenVLA fine-tuning: teachers, the finetune.py patch, "
        "merging, teacher caches, data, evaluation, diagnostics and a CPU demo.",
        epilog=f"An error is one line on stderr with exit status 1 (usage errors: 2); --debug or {DEBUG_ENV}=1 shows "
        "its traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    _add_commands(parser.add_subparsers(dest="command", required=True), COMMANDS, argv, "command")
    return parser


def _command_path(args: argparse.Namespace) -> str:
    names = [args.command] + [v for k, v in sorted(vars(args).items()) if k.endswith("_command") and v]
    return " ".join(["openvla-align", *names])


# What other libraries print that the user can do nothing about (the exact messages, nothing broader): torch >= 2.10
# deprecates torch.jit.script/interface, which timm's and transformers' own modules call at import; PEFT reads
# transformers 5's deprecated `is_gradient_checkpointing` when it loads an adapter; transformers 5 renamed
# `past_key_values` to `cache` and warns when OpenVLA's remote code (or ours, written to run on 4.40 too) passes the
# old name.
FOREIGN_WARNINGS = (
    r"`torch\.jit\.(script|interface)` is deprecated",
    r"`is_gradient_checkpointing` is deprecated and will be removed",
)
FOREIGN_LOG_LINES = {"transformers.utils.generic": "`past_key_values`/`cache_params` are deprecated"}


def quiet_foreign_warnings() -> None:
    """Hide :data:`FOREIGN_WARNINGS` and :data:`FOREIGN_LOG_LINES`, and keep transformers from importing TensorFlow
    where OpenVLA's data stack installed it (``USE_TF=0`` unless set: transformers would import it with every image
    processor, 7 s and a screen of CUDA-not-found logs; the RLDS pipeline imports TensorFlow itself)."""
    import warnings

    for message in FOREIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name, text in FOREIGN_LOG_LINES.items():
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())
    os.environ.setdefault("USE_TF", "0")


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Its errors become one line on stderr and exit status 1 (argparse's usage errors: 2);
    ``--debug`` (or ``OPENVLA_ALIGN_DEBUG=1``) lets the traceback through."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_foreign_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, debug = _take_debug(argv)
    if argv[:1] == ["demo"]:  # before its module imports torch: the demo's figures are the same on any x86-64 CPU
        from . import numerics

        numerics.pin()
    args = build_parser(argv).parse_args(argv)
    args.debug = debug
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{_command_path(args)}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"{_command_path(args)}: {error_line(exc)}", file=sys.stderr)
        return 1


def _take_debug(argv: List[str]):
    """``--debug`` wherever it is on the line (before a ``--``): the other arguments, and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return rest, len(rest) != len(argv)


def error_line(exc: BaseException) -> str:
    """One line saying what went wrong: the message of an error about the input (file, value, missing package),
    the exception type too for anything else (then likely a bug: --debug shows where)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (OSError, ValueError, LookupError, ImportError, RuntimeError)):
        return text
    return f"{type(exc).__name__}: {text} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
