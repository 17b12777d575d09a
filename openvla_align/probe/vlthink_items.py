"""VL-Think ground truth: the question, the domains, and the JSONL items (validated, with clear errors)."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

from PIL import Image

from ..vla.checkpoint import vqa_prompt

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
