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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .._io import atomic_write_bytes
from ..vla.checkpoint import (
    DTYPES,
    LoadedVLA,
    apply_adapter,
    load_image,
    load_vla,
    parse_model,
    release_memory,
    resolve_device_dtype,
    vqa_prompt,
)
from ..vla.decoding import next_token_logits

logger = logging.getLogger(__name__)

QUESTION_TEMPLATE = "Do you see {board}? Answer yes or no. If yes, specify where: left, center, or right."
POSITIONS = ("left", "center", "right")
# Paper order (and board counts), used to order report rows; any other domain name is accepted too.
DOMAINS = {
    "shape": 13,
    "color": 8,
    "traffic": 24,
    "laundry": 17,
    "weather": 9,
    "arrow": 4,
    "public_info": 14,
    "parity": 8,
}
DEFAULT_DOMAIN = "all"
REQUIRED_KEYS = ("image", "board", "present")
KNOWN_KEYS = frozenset(REQUIRED_KEYS + ("position", "domain", "question", "id"))
JSON_NAME, MARKDOWN_NAME = "vlthink.json", "vlthink.md"


class VLThinkDataError(ValueError):
    """The ground-truth file is unreadable or one of its items is invalid (the message says which and why)."""


# --- ground truth ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLThinkItem:
    image: Path
    board: str
    present: bool
    position: Optional[str]
    domain: str = DEFAULT_DOMAIN
    question: Optional[str] = None
    id: Optional[Any] = None
    where: str = ""  # "file:line" for messages

    def prompt(self, template: str = QUESTION_TEMPLATE) -> str:
        return vqa_prompt(self.question if self.question else template.format(board=self.board))


def _read_records(path: Path) -> List[Tuple[str, Any]]:
    """(location, record) pairs from a JSON list, a {"items": [...]} object, or JSON Lines."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise VLThinkDataError(f"{path} is empty: it needs at least one item (JSON Lines or a JSON list).")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VLThinkDataError(f"{path} starts with '[' but is not a valid JSON list: {exc}") from exc
        return [(f"{path} item {i}", r) for i, r in enumerate(data)]
    if stripped.startswith("{"):
        try:  # a single JSON object holding the list ({"items": [...]})
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON Lines
        if isinstance(data, dict) and isinstance(data.get("items"), list):
            return [(f"{path} item {i}", r) for i, r in enumerate(data["items"])]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise VLThinkDataError(f"{path}:{lineno} is not valid JSON ({exc}); expected one item per line.") from exc
    return records


def _position(value: Any, where: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in POSITIONS:
        return value.strip().lower()
    raise VLThinkDataError(f"{where}: position {value!r} is not one of {list(POSITIONS)} (or null when absent).")


def _validate(record: Any, where: str, root: Path, check_images: bool) -> VLThinkItem:
    if not isinstance(record, dict):
        raise VLThinkDataError(f"{where}: an item must be a JSON object, got {type(record).__name__}.")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise VLThinkDataError(f"{where}: missing required key(s) {missing}; every item needs {list(REQUIRED_KEYS)}.")
    unknown = sorted(set(record) - KNOWN_KEYS)
    if unknown:
        msg = f"{where}: ignoring unknown key(s) {unknown} (known: {sorted(KNOWN_KEYS)})."
        warnings.warn(msg, stacklevel=4)
        logger.warning(msg)
    board = record["board"]
    if not isinstance(board, str) or not board.strip():
        raise VLThinkDataError(f"{where}: board must be a non-empty string, got {board!r}.")
    present = record["present"]
    if not isinstance(present, bool):
        raise VLThinkDataError(f"{where}: present must be true or false (a JSON boolean), got {present!r}.")
    position = _position(record.get("position"), where)
    if present and position is None:
        raise VLThinkDataError(f"{where}: board {board!r} is present, so position must be one of {list(POSITIONS)}.")
    if not present and position is not None:
        raise VLThinkDataError(
            f"{where}: board {board!r} is absent (present=false) but has position {position!r}; use null."
        )
    domain = record.get("domain", DEFAULT_DOMAIN)
    if not isinstance(domain, str) or not domain.strip():
        raise VLThinkDataError(f"{where}: domain must be a non-empty string, got {domain!r}.")
    question = record.get("question")
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise VLThinkDataError(f"{where}: question must be a non-empty string when given, got {question!r}.")
    image = record["image"]
    if not isinstance(image, str) or not image.strip():
        raise VLThinkDataError(f"{where}: image must be a path string, got {image!r}.")
    image_path = Path(image)
    if not image_path.is_absolute():
        image_path = root / image_path
    if check_images:
        if not image_path.is_file():
            raise VLThinkDataError(f"{where}: image {image_path} does not exist (paths are relative to the data file).")
        try:
            with Image.open(image_path) as im:  # reads the header only
                im.size
        except Exception as exc:
            raise VLThinkDataError(f"{where}: cannot read image {image_path}: {exc}") from exc
    return VLThinkItem(image_path, board.strip(), present, position, domain.strip(), question, record.get("id"), where)


def load_items(path: Union[str, Path], *, check_images: bool = True) -> List[VLThinkItem]:
    """Read and validate a VL-Think ground-truth file (JSON Lines, a JSON list, or ``{"items": [...]}``).

    Raises :class:`VLThinkDataError` naming the offending item (file and line) for a missing image, a bad
    ``position``/``present`` value, a missing key or an empty file; unknown keys only warn."""
    path = Path(path)
    if not path.is_file():
        raise VLThinkDataError(f"Data file {path} does not exist.")
    records = _read_records(path)
    if not records:
        raise VLThinkDataError(f"{path} holds no items (only blank or comment lines).")
    root = path.resolve().parent
    return [_validate(r, where, root, check_images) for where, r in records]


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


# --- greedy decoding ------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_decode(
    loaded: LoadedVLA,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    max_new_tokens: int = 12,
) -> List[List[int]]:
    """Greedy continuation token ids for each (prompt, image), batched; see :func:`greedy_answer`.

    A row stops after emitting EOS (kept as its last id) or a token whose text completes a newline (kept too),
    or after ``max_new_tokens`` ids."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    tok = loaded.tokenizer
    batch = loaded.batch(prompts, images)
    pixel_values = batch["pixel_values"]
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = [batch["input_ids"][i, : int(n)].tolist() for i, n in enumerate(lengths)]
    eos = tok.eos_token_id
    generated: List[List[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        for _ in range(max_new_tokens):
            if not active:
                break
            index = torch.as_tensor(active, device=pixel_values.device)
            logits = next_token_logits(loaded, [rows[i] + generated[i] for i in active], pixel_values[index])
            next_ids = logits.argmax(-1).tolist()
            still = []
            for i, t in zip(active, next_ids):
                generated[i].append(int(t))
                done = (eos is not None and t == eos) or "\n" in tok.decode(generated[i], skip_special_tokens=True)
                if not done:
                    still.append(i)
            active = still
    finally:
        loaded.model.train(was_training)
    return generated


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids: special tokens dropped, cut at the first newline, stripped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).split("\n", 1)[0].strip()


def greedy_answer(
    loaded: LoadedVLA,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    max_new_tokens: int = 12,
) -> List[str]:
    """Greedy answers to a batch of (prompt, image) pairs, WITHOUT ``.generate`` or a KV cache.

    Each step runs the ordinary multimodal forward on the whole right-padded batch of growing sequences, reads
    each row's logits at its last real token (shifted by the visual tokens the model inserts after BOS), appends
    the argmax, and drops rows that emitted EOS or a newline. This works for any model with OpenVLA's forward
    (real OpenVLA, whose ``generate`` only supports batch size 1; PEFT-wrapped models; the tiny test model, which
    has no ``generate``) and gives the same tokens as decoding one sequence at a time.

    Cost trade-off: without a cache every step recomputes the vision backbone and the full prompt (~256 visual +
    ~30 text tokens for OpenVLA-7B), so an answer of ``T`` tokens costs about ``T`` full forwards instead of one
    forward plus ``T`` single-token steps. VL-Think answers are a few tokens ("yes, left" + EOS) and finished
    rows leave the batch, so in practice this is a few forwards per batch -- and the batching (which cached
    OpenVLA generation cannot do) more than pays for it. Keep ``max_new_tokens`` small."""
    ids = greedy_decode(loaded, prompts, images, max_new_tokens=max_new_tokens)
    return [decode_answer(loaded.tokenizer, g) for g in ids]


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


# --- synthetic data -------------------------------------------------------------------------------------------

SYNTH_COLORS = {
    "black": (20, 20, 20),
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 230),
    "orange": (245, 140, 20),
    "purple": (140, 50, 170),
    "yellow": (240, 215, 30),
    "brown": (120, 70, 30),
}
SYNTH_SHAPES = ("square", "circle", "triangle", "cross")


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    c, h = (size - 1) / 2.0, size * 0.32
    dx, dy = xx - c, yy - c
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "circle":
        return dx**2 + dy**2 <= h**2
    if shape == "triangle":
        return (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    if shape == "cross":
        return ((np.abs(dx) <= h / 3) & (np.abs(dy) <= h)) | ((np.abs(dy) <= h / 3) & (np.abs(dx) <= h))
    raise ValueError(f"Unknown shape {shape!r}; choose from {SYNTH_SHAPES}.")


def make_synthetic_vlthink(directory: Union[str, Path], n_scenes: int = 12, seed: int = 0, size: int = 224) -> Path:
    """Write a small VL-Think-style set for tests and smoke runs: ``directory/images/*.png`` and
    ``directory/vlthink.jsonl``.

    Each scene is a table with 2-3 boards in left/center/right slots; even scenes are *color* scenes (plain
    boards of different colours, board = "the red board"), odd scenes *shape* scenes (white boards with a black
    shape, board = "the circle board"). Every scene gets one question about a present board and one about an
    absent one. Synthetic: it exercises the pipeline, it is not the paper's benchmark."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    board_px = size // 4
    slot_x = {"left": size // 6, "center": size // 2, "right": 5 * size // 6}
    items = []
    for s in range(n_scenes):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rng.integers(120, 170, 3)  # table
        domain = "color" if s % 2 == 0 else "shape"
        names = list(SYNTH_COLORS) if domain == "color" else list(SYNTH_SHAPES)
        k = int(rng.integers(2, 4))
        chosen = [names[i] for i in rng.permutation(len(names))[: k + 1]]
        shown, absent = chosen[:k], chosen[k]
        slots = [POSITIONS[i] for i in sorted(rng.permutation(3)[:k])]
        top = size // 2 - board_px // 2 + int(rng.integers(-size // 10, size // 10))
        for name, slot in zip(shown, slots):
            left = slot_x[slot] - board_px // 2
            region = img[top : top + board_px, left : left + board_px]
            if domain == "color":
                region[:] = SYNTH_COLORS[name]
            else:
                region[:] = (235, 235, 235)
                region[_shape_mask(name, board_px)] = (15, 15, 15)
        noise = rng.normal(0, 4, img.shape)
        img = np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)
        rel = f"images/scene_{s:03d}.png"
        Image.fromarray(img).save(directory / rel)
        target = int(rng.integers(k))
        items.append(
            {
                "image": rel,
                "board": f"the {shown[target]} board",
                "present": True,
                "position": slots[target],
                "domain": domain,
            }
        )
        items.append(
            {"image": rel, "board": f"the {absent} board", "present": False, "position": None, "domain": domain}
        )
    path = directory / "vlthink.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


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
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH[::ADAPTER]",
        help="checkpoint directory, optionally with a PEFT LoRA adapter; repeat to compare models",
    )
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter on the single --model (same as DIR::ADAPTER)")
    p.add_argument(
        "--data",
        metavar="FILE",
        help="ground truth: JSON Lines or a JSON list of {image, board, present, position, domain} items",
    )
    p.add_argument("--out", default="vlthink_out", help="output directory (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="answer length cap (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="bfloat16 on cuda, else float32")
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
    models = apply_adapter(args.model, args.adapter)
    if not models:
        raise ValueError("give at least one --model DIR[::ADAPTER].")
    if not data:
        raise ValueError("give --data FILE (or --make-synthetic DIR).")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1.")
    if "{board}" not in args.template:
        raise ValueError(f"--template must contain '{{board}}', got {args.template!r}.")
    for spec in models:
        parse_model(spec)
    report = run(
        models,
        data,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
        template=args.template,
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
