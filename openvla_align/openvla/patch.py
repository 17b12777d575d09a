"""`openvla-align patch PATH [--check | --revert]`: add the finetune-plugin mechanism to a host's finetune.py.

PATH is a checkout of a supported host (OpenVLA, OpenVLA-OFT: its ``vla-scripts/finetune.py`` is patched) or a
finetune.py file. Each supported script has one folder under ``patches/`` (``patches/<host>/``): its patch
(``finetune.patch``), written for one upstream revision of that file, and ``manifest.json``, which records the
SHA-256 of the file before and after patching. The script is recognised by those hashes, and only a file with one
of them is ever touched (supporting another script is one more folder, no code):

    unpatched  the upstream file: patching applies every hunk in Python (no ``patch``/``git`` binary), checks the
               result's hash, keeps the original as ``finetune.py.orig`` and replaces the file atomically;
    patched    nothing to do ("already patched");
    outdated   patched by an earlier openvla-align (``previous_patched_sha256`` in the manifest): patching re-applies
               the current patch to the kept ``finetune.py.orig``; refused when that original is missing or edited;
    unknown    a locally edited or different finetune.py (or not finetune.py at all): refused, nothing changes.

``--revert`` restores the original bytes (from ``finetune.py.orig`` when its hash is upstream's, otherwise by
reversing the hunks) and checks the hash again. Exit codes: 0 success / nothing to do; 1 refused or error.
``--check`` prints the state (first word: unpatched, patched, outdated or unknown) and exits 0 for unpatched or
patched, 1 for outdated or unknown (or a missing file), so ``openvla-align patch --check PATH`` tells whether PATH is
safe to patch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .._io import atomic_write_bytes

MANIFEST = "manifest.json"
BACKUP_SUFFIX = ".orig"
UNPATCHED, PATCHED, OUTDATED, UNKNOWN = "unpatched", "patched", "outdated", "unknown"

_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    """The patch does not fit the file (or the patch files are missing); nothing was changed."""


@dataclass
class Hunk:
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: List[Tuple[str, str]] = field(default_factory=list)  # (" ", "-" or "+", line text with its newline)

    @property
    def added(self) -> int:
        return sum(tag == "+" for tag, _ in self.lines)

    @property
    def removed(self) -> int:
        return sum(tag == "-" for tag, _ in self.lines)

    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_len} +{self.new_start},{self.new_len} @@"

    def summary(self, width: int = 64) -> str:
        """The hunk's first added comment (else its first added line), to say what it does."""
        added = [" ".join(s.split()) for t, s in self.lines if t == "+" and s.strip()]
        text = next((s for s in added if s.startswith("#")), added[0] if added else "(removes lines)")
        return text if len(text) <= width else text[: width - 3] + "..."

    def reversed(self) -> "Hunk":
        swap = {"+": "-", "-": "+", " ": " "}
        return Hunk(self.new_start, self.new_len, self.old_start, self.old_len, [(swap[t], s) for t, s in self.lines])


@dataclass
class Patch:
    name: str  # the host's folder name under patches/, e.g. openvla-oft
    title: str  # e.g. OpenVLA-OFT
    repository: str  # owner/name on GitHub, e.g. moojink/openvla-oft
    target: str  # path inside the host's checkout, e.g. vla-scripts/finetune.py
    upstream_sha256: str
    patched_sha256: str
    upstream_commit: str
    hunks: List[Hunk]
    source: Path
    previous_sha256: Tuple[str, ...] = ()  # the file as earlier openvla-align releases patched it (`patch` updates it)

    @property
    def revision(self) -> str:
        return f"{self.repository}@{self.upstream_commit[:12]}"


def split_lines(text: str) -> List[str]:
    """Lines with their ``\\n`` (only ``\\n`` separates lines, unlike ``str.splitlines``)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def parse_unified_diff(text: str) -> List[Hunk]:
    """Hunks of a single-file unified diff; text before the first hunk (description, ---/+++ lines) is skipped."""
    hunks: List[Hunk] = []
    lines = split_lines(text)
    i = 0
    while i < len(lines):
        m = _HUNK_HEADER.match(lines[i])
        i += 1
        if not m:
            continue
        old_start, old_len, new_start, new_len = (int(g) if g is not None else 1 for g in m.groups())
        hunk = Hunk(old_start, old_len, new_start, new_len)
        old_seen = new_seen = 0
        while old_seen < old_len or new_seen < new_len:
            if i >= len(lines):
                raise PatchError(f"patch ends inside hunk {hunk.header()}")
            line = lines[i]
            i += 1
            tag, body = (line[0], line[1:]) if line not in ("\n", "") else (" ", "\n")
            if tag == "\\":  # "\ No newline at end of file" refers to the previous line
                if hunk.lines:
                    t, s = hunk.lines[-1]
                    hunk.lines[-1] = (t, s[:-1] if s.endswith("\n") else s)
                continue
            if tag not in " -+":
                raise PatchError(f"unexpected line in hunk {hunk.header()}: {line!r}")
            hunk.lines.append((tag, body))
            old_seen += tag in " -"
            new_seen += tag in " +"
        if i < len(lines) and lines[i].startswith("\\"):
            t, s = hunk.lines[-1]
            hunk.lines[-1] = (t, s[:-1] if s.endswith("\n") else s)
            i += 1
        hunks.append(hunk)
    if not hunks:
        raise PatchError("no hunks in the patch")
    return hunks


def apply_hunks(text: str, hunks: Sequence[Hunk]) -> str:
    """Apply hunks at exactly their recorded line numbers; every context and removed line must match."""
    src = split_lines(text)
    out: List[str] = []
    pos = 0
    for n, hunk in enumerate(hunks, 1):
        start = hunk.old_start - 1 if hunk.old_len else hunk.old_start
        old = [s for t, s in hunk.lines if t in " -"]
        if start < pos or src[start : start + len(old)] != old:
            raise PatchError(f"hunk {n} ({hunk.header()}) does not match the file")
        out.extend(src[pos:start])
        out.extend(s for t, s in hunk.lines if t in " +")
        pos = start + len(old)
    out.extend(src[pos:])
    return "".join(out)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def patches_root() -> Path:
    """``patches/`` next to the package (installed) or at the repository root (source checkout)."""
    here = Path(__file__).resolve()
    for candidate in (here.parent / "patches", here.parents[2] / "patches"):
        if any(candidate.glob(f"*/{MANIFEST}")):
            return candidate
    raise PatchError(f"cannot find patches/<host>/{MANIFEST} beside the openvla_align package; reinstall openvla-align")


def patch_dir(host: str = "openvla") -> Path:
    """The folder of one host's patch (``patches/openvla``, ``patches/openvla-oft``)."""
    directory = patches_root() / host
    if not (directory / MANIFEST).is_file():
        known = ", ".join(p.name for p in load_patches())
        raise PatchError(f"no patch for host {host!r}; openvla-align patches: {known}")
    return directory


def load_patch(directory: Optional[Path] = None) -> Patch:
    directory = Path(directory) if directory is not None else patch_dir()
    meta = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    source = directory / meta["patch"]
    return Patch(
        name=meta["name"],
        title=meta["title"],
        repository=meta["repository"],
        target=meta["target"],
        upstream_sha256=meta["upstream"]["sha256"],
        patched_sha256=meta["patched_sha256"],
        upstream_commit=meta["upstream"]["commit"],
        hunks=parse_unified_diff(source.read_text(encoding="utf-8")),
        source=source,
        previous_sha256=tuple(meta.get("previous_patched_sha256", ())),
    )


def load_patches(root: Optional[Path] = None) -> List[Patch]:
    """Every supported script's patch (one folder each), by folder name."""
    root = Path(root) if root is not None else patches_root()
    return [load_patch(m.parent) for m in sorted(root.glob(f"*/{MANIFEST}"))]


def resolve_target(path, patches: Sequence[Patch]) -> Path:
    """PATH as given: a file is used as is; a directory is a host checkout (or its vla-scripts/ folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        targets = dict.fromkeys(p.target for p in patches)
        for target in targets:
            for candidate in (path / target, path / Path(target).name):
                if candidate.is_file():
                    return candidate
        hosts = " or ".join(p.title for p in patches)
        raise PatchError(f"{path} is not a checkout of {hosts}: it has no {' or '.join(targets)}")
    if not path.is_file():
        raise PatchError(f"{path} does not exist")
    return path


def status(data: bytes, patch: Patch) -> str:
    digest = sha256(data)
    if digest == patch.upstream_sha256:
        return UNPATCHED
    if digest == patch.patched_sha256:
        return PATCHED
    if digest in patch.previous_sha256:
        return OUTDATED
    return UNKNOWN


def _backup_path(target: Path) -> Path:
    return target.with_name(target.name + BACKUP_SUFFIX)


def _unknown_message(target: Path, data: bytes, patches: Sequence[Patch]) -> str:
    """One line: what PATH is not, and what to do about it."""
    digest = sha256(data)
    known = "; ".join(f"{p.title} {p.target} at {p.revision} (sha256 {p.upstream_sha256[:16]})" for p in patches)
    lines = [
        f"unknown: {target} (sha256 {digest[:16]}) is none of the scripts openvla-align patches ({known}), "
        "nor a patched one.",
    ]
    normalised = data.replace(b"\r\n", b"\n")
    if normalised != data and any(status(normalised, p) != UNKNOWN for p in patches):
        lines.append("It differs only in CRLF line endings; check the file out with LF endings.")
    else:
        restore = " or ".join(
            f"`git checkout {p.upstream_commit[:12]} -- {p.target}` in a {p.title} checkout" for p in patches
        )
        lines.append(
            f"Local edits or another revision: restore the upstream file ({restore}) or port the patch of "
            "patches/<host>/ by hand."
        )
    backup = _backup_path(target)
    if backup.is_file() and any(status(backup.read_bytes(), p) == UNPATCHED for p in patches):
        lines.append(f"The original upstream file is kept in {backup}.")
    return " ".join(lines)


def _describe(hunks: Sequence[Hunk], verb: str) -> List[str]:
    """One line per hunk of the patch (its header, lines added/removed, what it does) and a total."""
    lines = []
    for n, hunk in enumerate(hunks, 1):
        lines.append(f"  hunk {n:2d} {hunk.header():<26} {f'+{hunk.added} -{hunk.removed}':<9} {hunk.summary()}")
    added, removed = sum(h.added for h in hunks), sum(h.removed for h in hunks)
    lines.append(f"  {verb} {len(hunks)} hunks of the patch (+{added} -{removed} lines)")
    return lines


def _inspect(path, patch: Optional[Patch]) -> Tuple[List[Patch], Optional[Patch], Path, bytes, str]:
    """The candidate patches, the one whose script PATH is (None when unknown), the resolved finetune.py, its bytes
    and its state (unpatched / patched / unknown)."""
    patches = [patch] if patch is not None else load_patches()
    target = resolve_target(path, patches)
    data = target.read_bytes()
    for candidate in patches:
        state = status(data, candidate)
        if state != UNKNOWN:
            return patches, candidate, target, data, state
    return patches, None, target, data, UNKNOWN


def patch_file(path, patch: Optional[Patch] = None, out=None) -> int:
    """Patch PATH (see the module docstring); returns the exit code. A file it does not recognise, or a backup that
    is not the upstream file, raises PatchError (one line) and changes nothing."""
    out = out or sys.stdout
    patches, patch, target, data, state = _inspect(path, patch)
    if state == PATCHED:
        print(f"already patched: {target} ({patch.title})", file=out)
        return 0
    if state == UNKNOWN:
        raise PatchError(_unknown_message(target, data, patches) + " Nothing was changed.")
    backup = _backup_path(target)
    if state == OUTDATED:  # patched by an earlier openvla-align: patch the kept original again
        original = backup.read_bytes() if backup.is_file() else b""
        if status(original, patch) != UNPATCHED:
            raise PatchError(
                f"{target} was patched by an earlier openvla-align, and {backup} (the original it keeps) is missing "
                f"or edited: restore the upstream file, then patch again. Nothing was changed."
            )
        new = apply_hunks(original.decode("utf-8"), patch.hunks).encode("utf-8")
        if sha256(new) != patch.patched_sha256:
            raise PatchError("the patched file does not have the recorded hash; nothing was changed")
        atomic_write_bytes(target, new, target.stat().st_mode & 0o7777)
        print(f"updated: {target} ({patch.title}, {patch.revision}; it had an earlier openvla-align patch)", file=out)
        print(f"  original kept as {backup}; undo with `openvla-align patch --revert {path}`", file=out)
        return 0
    new = apply_hunks(data.decode("utf-8"), patch.hunks).encode("utf-8")
    if sha256(new) != patch.patched_sha256:
        raise PatchError("the patched file does not have the recorded hash; nothing was changed")
    if backup.exists() and backup.read_bytes() != data:
        raise PatchError(
            f"refused: {backup} exists and is not the upstream file; move it away and retry. Nothing was changed."
        )
    mode = target.stat().st_mode & 0o7777
    if not backup.exists():
        atomic_write_bytes(backup, data, mode)
    atomic_write_bytes(target, new, mode)
    print(f"patched: {target} ({patch.title}, {patch.revision})", file=out)
    print("\n".join(_describe(patch.hunks, "applied")), file=out)
    print(f"  original kept as {backup}; undo with `openvla-align patch --revert {path}`", file=out)
    return 0


def revert_file(path, patch: Optional[Patch] = None, out=None) -> int:
    """Restore the upstream file; returns the exit code (PatchError, one line, for a file it does not recognise)."""
    out = out or sys.stdout
    patches, patch, target, data, state = _inspect(path, patch)
    backup = _backup_path(target)
    if state == UNPATCHED:
        print(f"not patched, nothing to revert: {target} ({patch.title})", file=out)
        return 0
    if state == UNKNOWN:
        raise PatchError(_unknown_message(target, data, patches) + " Refusing to revert; nothing was changed.")
    source = "reversed hunks"
    original = None
    if backup.is_file():
        candidate = backup.read_bytes()
        if status(candidate, patch) == UNPATCHED:
            original, source = candidate, backup.name
        else:
            print(f"note: {backup} is not the upstream file; left alone, reversing the hunks instead", file=out)
    if original is None and state == OUTDATED:
        raise PatchError(
            f"{target} was patched by an earlier openvla-align and {backup} (the original) is missing or edited: "
            "restore the upstream file by hand. Nothing was changed."
        )
    if original is None:
        original = apply_hunks(data.decode("utf-8"), [h.reversed() for h in patch.hunks]).encode("utf-8")
        if status(original, patch) != UNPATCHED:
            raise PatchError("reversing the hunks did not give the upstream file; nothing was changed")
    atomic_write_bytes(target, original, target.stat().st_mode & 0o7777)
    if source == backup.name:
        backup.unlink()
    print(f"reverted: {target} ({patch.title}; from {source}; sha256 {patch.upstream_sha256[:16]} checked)", file=out)
    print("\n".join(_describe(patch.hunks, "reverted")), file=out)
    return 0


def check_file(path, patch: Optional[Patch] = None, out=None) -> int:
    """Print the state of PATH; returns 0 for unpatched/patched, 1 for unknown."""
    out = out or sys.stdout
    patches, patch, target, data, state = _inspect(path, patch)
    if state == UNPATCHED:
        print(f"unpatched: {target} is {patch.title}'s {patch.target} ({patch.revision})", file=out)
        print(f"  `openvla-align patch {path}` would apply {len(patch.hunks)} hunks", file=out)
    elif state == PATCHED:
        backup = _backup_path(target)
        note = f"; original kept as {backup}" if backup.is_file() else ""
        print(f"patched: {target} ({patch.title}, {patch.revision}){note}", file=out)
    elif state == OUTDATED:
        print(
            f"outdated: {target} has an earlier openvla-align patch ({patch.title}, {patch.revision}); "
            f"`openvla-align patch {path}` updates it",
            file=out,
        )
    else:
        print(_unknown_message(target, data, patches), file=out)
    return 0 if state in (UNPATCHED, PATCHED) else 1


def run(args: argparse.Namespace) -> int:
    if args.check:
        return check_file(args.path)
    if args.revert:
        return revert_file(args.path)
    return patch_file(args.path)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``patch`` subcommand (``openvla-align patch``) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "patch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH", help="OpenVLA or OpenVLA-OFT checkout, or its vla-scripts/finetune.py")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report unpatched / patched / unknown; change nothing")
    mode.add_argument("--revert", action="store_true", help="restore the original finetune.py")
    p.set_defaults(func=run)
    return p
