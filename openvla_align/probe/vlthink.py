"""VL-Think question probe: does the VLA (used as a VLM) still see and locate a named board?

The paper (arXiv 2510.25616, "Don't Blind Your VLA") shows a WidowX scene with several boards and asks

    "Do you see <board>? Answer yes or no. If yes, specify where: left, center, or right."

An answer is correct only if the presence AND (when the board is there) its position both match the ground truth.
Domains: shape (13 boards), color (8), traffic signs (24), laundry icons (17), weather icons (9), arrows (4),
public-information signs (14) and numeral parity. Their finding: SFT forgets most domains except color; Align
improves color and shape.

Ground truth is a JSON Lines file (or a JSON list) of items::

    {"image": "scenes/0001.png", "board": "stop sign", "present": true, "position": "left", "domain": "traffic"}

``image`` is relative to the data file (or absolute); ``position`` is ``left``/``center``/``right`` when the board
is present and ``null`` (or omitted) when it is not; ``domain`` defaults to ``"all"``; an optional ``question``
replaces the templated question for that item (e.g. for numeral parity) and an optional ``id`` is carried into
the per-answer report.

Answers are decoded greedily by :func:`greedy_answer`, which re-runs the plain multimodal forward on the growing
sequence (no ``.generate``, no KV cache; see its docstring for the cost), parsed by :func:`parse_answer` and
scored per domain by :func:`summarize`. :func:`run` evaluates several checkpoints (each ``PATH[::ADAPTER]``) on one
data file and writes ``vlthink.json`` and a side-by-side ``vlthink.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .._io import atomic_write_bytes
from ..argtypes import existing_file, positive_int
from ..vla.args import ModelArgs
from ..vla.checkpoint import LoadedVLA, load_image, load_vla, parse_model, release_memory, resolve_device_dtype
from ..vla.decoding import decode_answer, greedy_answer, greedy_decode, next_token_logits
from .vlthink_items import (
    DOMAINS,
    POSITIONS,
    QUESTION_TEMPLATE,
    VLThinkDataError,
    VLThinkItem,
    load_items,
)
from .vlthink_synth import make_synthetic_vlthink

logger = logging.getLogger(__name__)

JSON_NAME, MARKDOWN_NAME = "vlthink.json", "vlthink.md"
MODELS = ModelArgs(many=True, cameras=False)

# --- answers --------------------------------------------------------------------------------------------------

_YES = {"yes", "yeah", "yep", "yup", "true", "affirmative"}
_NO = {"no", "nope", "false", "negative"}
_POS_WORDS = {
    "left": "left",
    "leftmost": "left",
    "right": "right",
    "rightmost": "right",
    "center": "center",
    "centre": "center",
    "central": "center",
    "centered": "center",
    "centred": "center",
    "middle": "center",
}
_NEGATED_SEE = re.compile(r"\b(?:do\s*not|don'?t|does\s*not|doesn'?t|cannot|can'?t|not)\s+see\b")


def parse_answer(text: Optional[str]) -> Tuple[Optional[bool], Optional[str]]:
    """``(present, position)`` from a free-form answer; ``None`` where the answer does not say.

    Case and punctuation are ignored and only whole words count. Presence comes from the first yes/no word
    ("yes", "yeah", "no", "nope", ... or "I do not see ..."); a position word with no yes/no implies presence
    ("middle" -> ``(True, "center")``). Position is the first of left/right/center (also leftmost, centre,
    central, middle, ...). After a "no" any position is ignored: ``"No, not on the left"`` -> ``(False, None)``.
    Text with neither gives ``(None, None)``."""
    if not text:
        return None, None
    low = text.lower().replace("\u2019", "'")
    words = re.findall(r"[a-z]+", low)
    present: Optional[bool] = None
    first_yesno = next((w for w in words if w in _YES or w in _NO), None)
    negated = _NEGATED_SEE.search(low)
    if first_yesno is not None:
        present = first_yesno in _YES
        # "I do not see it, no" or "not see ... yes"? take whichever comes first in the text
        if negated and present:
            yes_at = re.search(rf"\b{first_yesno}\b", low).start()
            if negated.start() < yes_at:
                present = False
    elif negated:
        present = False
    if present is False:
        return False, None
    position = next((_POS_WORDS[w] for w in words if w in _POS_WORDS), None)
    if present is None and position is not None:
        present = True
    return present, position


def score(item: VLThinkItem, present: Optional[bool], position: Optional[str]) -> Dict[str, Optional[bool]]:
    """Per-item verdicts: ``correct`` (presence matches and, if the board is present, position matches),
    ``presence_correct`` and ``position_correct`` (``None`` when the board is absent)."""
    presence_ok = present is not None and present == item.present
    position_ok = (position == item.position) if item.present else None
    return {
        "correct": bool(presence_ok and (position_ok if item.present else True)),
        "presence_correct": presence_ok,
        "position_correct": position_ok,
    }


def _domain_order(domains) -> List[str]:
    known = [d for d in DOMAINS if d in domains]
    return known + sorted(d for d in domains if d not in DOMAINS)


def _stats(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    n = len(rows)
    with_board = [r for r in rows if r["present"]]
    return {
        "n": n,
        "n_present": len(with_board),
        "accuracy": sum(r["correct"] for r in rows) / n if n else None,
        "presence_accuracy": sum(r["presence_correct"] for r in rows) / n if n else None,
        "position_accuracy": (sum(r["position_correct"] for r in with_board) / len(with_board) if with_board else None),
        "unparsed": sum(r["pred_present"] is None for r in rows) / n if n else None,
    }


def summarize(answers: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-domain and overall metrics over scored answers (rows as made by :func:`score_answers`).

    ``accuracy``: fraction fully correct; ``presence_accuracy``: fraction whose yes/no matches;
    ``position_accuracy``: among items whose board IS present, fraction whose predicted position matches (a "no"
    counts as wrong); ``unparsed``: fraction with no yes/no/position at all. Overall is micro-averaged (over
    items); ``macro_accuracy`` averages the per-domain accuracies."""
    by_domain: Dict[str, List[Dict[str, Any]]] = {}
    for r in answers:
        by_domain.setdefault(r["domain"], []).append(r)
    domains = {d: _stats(by_domain[d]) for d in _domain_order(by_domain)}
    overall = _stats(list(answers))
    accs = [s["accuracy"] for s in domains.values() if s["accuracy"] is not None]
    overall["macro_accuracy"] = sum(accs) / len(accs) if accs else None
    return {"domains": domains, "overall": overall}


def score_answers(items: Sequence[VLThinkItem], texts: Sequence[str]) -> List[Dict[str, Any]]:
    """Parse and score one raw answer per item; one JSON-ready row per item."""
    if len(items) != len(texts):
        raise ValueError(f"{len(texts)} answers for {len(items)} items.")
    rows = []
    for i, (item, text) in enumerate(zip(items, texts)):
        present, position = parse_answer(text)
        row = {
            "index": i,
            "id": item.id,
            "image": str(item.image),
            "domain": item.domain,
            "board": item.board,
            "present": item.present,
            "position": item.position,
            "answer": text,
            "pred_present": present,
            "pred_position": position,
        }
        row.update(score(item, present, position))
        rows.append(row)
    return rows


# --- evaluation -----------------------------------------------------------------------------------------------


def evaluate(
    loaded: LoadedVLA,
    items: Sequence[VLThinkItem],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 12,
    template: str = QUESTION_TEMPLATE,
) -> Dict[str, Any]:
    """Ask every item's question of one model; returns ``{"summary": ..., "answers": [...]}``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    texts: List[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = []
        for item in chunk:
            try:
                images.append(load_image(item.image))
            except (FileNotFoundError, ValueError) as exc:
                raise VLThinkDataError(f"{item.where}: {exc}") from exc
        texts += greedy_answer(loaded, [it.prompt(template) for it in chunk], images, max_new_tokens=max_new_tokens)
        logger.info("VL-Think %s: %d/%d answered", loaded.name, len(texts), len(items))
    answers = score_answers(items, texts)
    return {"summary": summarize(answers), "answers": answers}


def parse_model_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``"PATH"`` -> (PATH, None); ``"PATH::ADAPTER"`` -> (PATH, ADAPTER) (the package's one model spelling)."""
    return parse_model(spec)


def _labels(specs: Sequence[Tuple[str, Optional[str]]]) -> List[str]:
    labels, seen = [], {}
    for path, adapter in specs:
        label = Path(path).name or path
        if adapter:
            a = Path(adapter)
            # `RUN/adapter` (as PEFT runs lay them out) is better told apart by its run name, and the demo's
            # `RUN/seedN/adapter` by both
            name = a.name or adapter
            if a.name == "adapter" and a.parent.name:
                name = a.parent.name
                if re.fullmatch(r"seed\d+", name) and a.parent.parent.name:
                    name = f"{a.parent.parent.name}/{name}"
            label += f"+{name}"
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return labels


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_markdown(report: Dict[str, Any]) -> str:
    """Side-by-side accuracy table (one column per model) followed by one detailed table per model."""
    models = report["models"]
    domains = _domain_order({d for m in models for d in m["summary"]["domains"]})
    lines = [
        "# VL-Think probe",
        "",
        f'Data: `{report["data"]}` ({report["n_items"]} questions). Question: "{report["template"]}"',
        "",
        "Accuracy (%): correct iff presence matches and, when the board is present, position matches.",
        "",
        "| Domain | n | " + " | ".join(m["label"] for m in models) + " |",
        "|---|---:|" + "---:|" * len(models),
    ]

    def n_of(d):
        return next(m["summary"]["domains"][d]["n"] for m in models if d in m["summary"]["domains"])

    for d in domains:
        cells = [_pct(m["summary"]["domains"].get(d, {}).get("accuracy")) for m in models]
        lines.append(f"| {d} | {n_of(d)} | " + " | ".join(cells) + " |")
    lines.append(
        f"| **overall** | {report['n_items']} | "
        + " | ".join(f"**{_pct(m['summary']['overall']['accuracy'])}**" for m in models)
        + " |"
    )
    if len(domains) > 1:
        lines.append(
            "| macro (mean of domains) | | "
            + " | ".join(_pct(m["summary"]["overall"]["macro_accuracy"]) for m in models)
            + " |"
        )
    for m in models:
        name = m["path"] + (f" + adapter {m['adapter']}" if m["adapter"] else "")
        lines += [
            "",
            f"## {m['label']}",
            "",
            f"`{name}`",
            "",
            "| Domain | n | Accuracy | Presence | Position | Unparsed |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        rows = list(m["summary"]["domains"].items()) + [("**overall**", m["summary"]["overall"])]
        for d, s in rows:
            lines.append(
                f"| {d} | {s['n']} | {_pct(s['accuracy'])} | {_pct(s['presence_accuracy'])} | "
                f"{_pct(s['position_accuracy'])} | {_pct(s['unparsed'])} |"
            )
    lines += [
        "",
        "Presence: yes/no matches. Position: among questions whose board is present, predicted position matches "
        '(a "no" counts as wrong). Unparsed: answers with neither yes/no nor a position.',
        "",
    ]
    return "\n".join(lines)


def run(
    models: Sequence[str],
    data: Union[str, Path],
    out: Union[str, Path],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 12,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    template: str = QUESTION_TEMPLATE,
) -> Dict[str, Any]:
    """Evaluate each ``PATH[::ADAPTER]`` on the data file, one model in memory at a time; writes
    ``out/vlthink.json`` (summaries + every answer) and ``out/vlthink.md``; returns the report."""
    if not models:
        raise ValueError("Give at least one --model PATH[::ADAPTER].")
    if "{board}" not in template:
        raise ValueError(f"The question template must contain '{{board}}', got {template!r}.")
    specs = [parse_model_spec(m) for m in models]
    items = load_items(data)
    device, dtype = resolve_device_dtype(device, dtype)
    report: Dict[str, Any] = {
        "data": str(data),
        "n_items": len(items),
        "template": template,
        "prompt_example": items[0].prompt(template),
        "max_new_tokens": max_new_tokens,
        "dtype": dtype,
        "models": [],
    }
    for (path, adapter), label in zip(specs, _labels(specs)):
        loaded = load_vla(path, adapter, device=device, dtype=dtype)
        result = evaluate(loaded, items, batch_size=batch_size, max_new_tokens=max_new_tokens, template=template)
        report["models"].append({"label": label, "path": path, "adapter": adapter, **result})
        del loaded
        release_memory()
    out = Path(out)
    atomic_write_bytes(out / JSON_NAME, json.dumps(report, indent=2).encode())
    atomic_write_bytes(out / MARKDOWN_NAME, format_markdown(report).encode())
    return report


# --- CLI ------------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``vlthink`` subcommand (wired under ``openvla-align probe``)."""
    p = subparsers.add_parser(
        "vlthink",
        description=(
            'Ask "Do you see <board>? Answer yes or no. If yes, specify where: left, center, or right." about '
            "each ground-truth item, decode greedily, and report per-domain accuracy (presence AND position "
            "must match), presence and position accuracy; several --model give a side-by-side table. Writes "
            f"OUT/{JSON_NAME} and OUT/{MARKDOWN_NAME}."
        ),
    )
    MODELS.add(p)
    p.add_argument(
        "--data",
        type=existing_file,
        metavar="FILE",
        help="ground truth: JSON Lines or a JSON list of {image, board, present, position, domain} items",
    )
    p.add_argument("--out", default="vlthink_out", help="output directory (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions per forward (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=12, help="answer length cap (default: %(default)s)")
    p.add_argument(
        "--template",
        default=QUESTION_TEMPLATE,
        help="question with a {board} placeholder (an item's own 'question' overrides it)",
    )
    p.add_argument(
        "--make-synthetic",
        metavar="DIR",
        help="write a small synthetic VL-Think-style set to DIR (and use it when --data is not given)",
    )
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    """Entry point of ``openvla-align probe vlthink``; bad input raises before anything is loaded or written (the
    CLI prints it as one line, exit status 1)."""
    data = args.data
    if args.make_synthetic:
        made = make_synthetic_vlthink(args.make_synthetic)
        print(f"Wrote synthetic VL-Think set: {made}")
        data = data or str(made)
        if not args.model:
            return 0
    models = MODELS.models(args)
    if not models:
        raise ValueError("give at least one --model DIR[::ADAPTER].")
    if not data:
        raise ValueError("give --data FILE (or --make-synthetic DIR).")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1.")
    if "{board}" not in args.template:
        raise ValueError(f"--template must contain '{{board}}', got {args.template!r}.")
    report = run(
        models,
        data,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        **MODELS.options(args),
    )
    print(format_markdown(report))
    print(f"Wrote {Path(args.out) / JSON_NAME} and {Path(args.out) / MARKDOWN_NAME}")
    return 0


__all__ = [
    "DOMAINS",
    "POSITIONS",
    "QUESTION_TEMPLATE",
    "VLThinkDataError",
    "VLThinkItem",
    "add_parser",
    "decode_answer",
    "evaluate",
    "format_markdown",
    "greedy_answer",
    "greedy_decode",
    "next_token_logits",
    "load_items",
    "make_synthetic_vlthink",
    "parse_answer",
    "parse_model_spec",
    "run",
    "run_cli",
    "score",
    "score_answers",
    "summarize",
]
