"""Which code and which library versions produced a demo run, so a README copy of its figures can be checked.

The fingerprint covers every module of the package the run imported, as tokens (comments and layout do not count,
so reformatting keeps it; any change of code or docstrings changes it). ``scripts/demo_readme.py`` refuses a run
whose fingerprint is not the checkout's, and a test checks that the README's copy is the current code's.
"""

from __future__ import annotations

import hashlib
import io
import platform
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Dict, Iterable, List, Optional

PACKAGE = Path(__file__).resolve().parents[1]
SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING}
# what the demo imports that computes or stores its figures (each version must be the lock's: constraints/demo.txt)
LIBRARIES = ("torch", "torchvision", "transformers", "timm", "peft", "tokenizers", "numpy", "safetensors", "pillow")


def _tokens(source: str) -> str:
    kept = (
        f"{t.type}:{t.string}" for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in SKIP
    )
    return "\n".join(kept)


def source_fingerprint(files: Iterable[str], root: Path = PACKAGE) -> str:
    """BLAKE2 over (path, tokens) of each file, paths relative to the package directory."""
    h = hashlib.blake2b(digest_size=16)
    for rel in sorted(files):
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"{rel} is not in {root}: the demo run used a module this checkout does not have.")
        h.update(rel.encode() + b"\0" + _tokens(path.read_text(encoding="utf-8")).encode() + b"\0")
    return h.hexdigest()


def loaded_files() -> List[str]:
    """The package's source files imported so far, relative to the package directory."""
    out = []
    for name, module in list(sys.modules.items()):
        if name != "openvla_align" and not name.startswith("openvla_align."):
            continue
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(PACKAGE):
            out.append(Path(file).resolve().relative_to(PACKAGE).as_posix())
    return sorted(set(out))


def git_commit(root: Path = PACKAGE.parent) -> Optional[Dict[str, object]]:
    """{"commit": HEAD, "dirty": uncommitted changes under the package} when the package is a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "openvla_align"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def versions() -> Dict[str, str]:
    from .._plugins import installed_version

    return {"python": platform.python_version(), **{name: installed_version(name) or "missing" for name in LIBRARIES}}


def code_identity() -> Dict[str, object]:
    files = loaded_files()
    return {"files": files, "fingerprint": source_fingerprint(files), "git": git_commit(), "versions": versions()}
