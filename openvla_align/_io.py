"""Atomic file writes (a temporary sibling, then ``os.replace``; a crash never leaves ``path`` half-written), figures
saved the same way, and file hashing."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union


def _default_mode() -> int:
    # mkstemp creates 0600 files; give results the permissions a plain open() would (shared caches stay shared).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Union[str, Path], write: Callable[[Path], None], mode: Optional[int] = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Union[str, Path], data: bytes, mode: Optional[int] = None) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write, mode)


def sha256_file(path: Union[str, Path], chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints, shards and caches are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_yaml(path: Union[str, Path], what: str = "YAML file"):
    """Parse a YAML file; a syntax error names the file, line and column (``recipe.yaml:3:7: ...``) instead of
    PyYAML's ``"<unicode string>"``, a missing file says so."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} " + ("is a directory" if path.is_dir() else "does not exist"))
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        context = getattr(exc, "context", None)
        raise ValueError(f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")) from None


def save_figure(fig, path: Union[str, Path], dpi: int = 100) -> Path:
    """A matplotlib figure saved atomically, laid out tight, its format from ``path``'s suffix; returns ``path``."""
    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    return path
