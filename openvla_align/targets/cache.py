"""A sharded, memory-mapped store of teacher patch features, keyed by frame.

Layout of a cache directory::

    manifest.json            teacher, weights hash, resolution, grid, width, dtype, views, teacher input, pooling,
                             source, shards (+ SHA-256 each)
    shard-00000.keys         count x 16-byte keys (``frame_keys``)
    shard-00000.feats        count x tokens x width 2-byte floats (bfloat16 or float16), little-endian, C order

A row is one frame's targets (T tokens) for a single-view teacher, keyed by the frame. A multi-view teacher (VGGT)
sees a sample's cameras together, so its rows are samples: ``views`` x T tokens (camera 0's T, then camera 1's ...),
keyed by ``frame_keys.sample_key`` of the sample's frame keys in camera order; the manifest says ``multi_view`` and
``views``, and such a cache serves exactly that many cameras per sample.

Shards are immutable: each is written under a temporary name and renamed into place, then the manifest (rewritten
atomically) lists it with its checksums. An interrupted build therefore leaves whole shards and a manifest that
names exactly those; ``CacheWriter`` picks up from there. A reader checks the manifest, every shard's size and (by
default) its SHA-256 before handing out a single target.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._io import atomic_write_bytes, sha256_file
from ..dtypes import canonical, torch_dtype
from .frame_keys import KEY_BYTES, keys_from_pixel_values, sample_keys

FORMAT = "openvla-align-teacher-cache/1"
MANIFEST = "manifest.json"
STORAGE_DTYPES = ("bfloat16", "float16")  # 16-bit: the shards are int16 memmaps viewed as this dtype
NON_FINITE_EXPONENT = {"bfloat16": 0x7F80, "float16": 0x7C00}  # exponent bits all set: inf or nan


class CacheError(RuntimeError):
    """A teacher cache that cannot be used as it is (corrupt, stale, incomplete or made for something else)."""


@dataclass
class CacheSpec:
    """What a cache holds: the same for every shard, compared field by field when a cache is reused."""

    teacher: str
    weights_sha256: str  # of the weights file the teacher was built from ("" when unknown, e.g. random weights)
    resolution: int
    grid: Tuple[int, int]
    width: int
    dtype: str
    source: Dict[str, object] = field(default_factory=dict)  # where the frames came from (dataset, version, ...)
    multi_view: bool = False  # rows are samples of `views` cameras seen together (a multi-view teacher), not frames
    views: int = 1  # cameras per row: 1 for a single-view teacher
    # how pixel_values became the teacher's images and its patch grid the student's (AlignConfig's fields of the name)
    teacher_input: str = "reference"
    pooling: str = "resample"
    pooling_pos_embed: float = 0.0

    def __post_init__(self):
        self.views, self.pooling_pos_embed = int(self.views), float(self.pooling_pos_embed)
        if self.views < 1 or (self.views != 1 and not self.multi_view):
            raise ValueError(
                f"CacheSpec views={self.views}: a single-view teacher's rows are frames (views=1); a multi-view "
                "teacher's rows are samples of views >= 1 cameras."
            )

    @property
    def tokens(self) -> int:
        """Tokens per image (the student's grid)."""
        return int(self.grid[0] * self.grid[1])

    @property
    def row_tokens(self) -> int:
        """Tokens per stored row: one image's, or a multi-view sample's ``views`` images'."""
        return self.tokens * self.views

    @property
    def row_kind(self) -> str:
        return f"sample of {self.views} camera(s)" if self.multi_view else "frame"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["grid"] = list(self.grid)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CacheSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CacheError(
                f"The cache's manifest has fields this openvla-align does not know ({', '.join(unknown)}): it was "
                "written by a newer version; upgrade openvla-align or rebuild the cache."
            )
        return cls(**{**data, "grid": tuple(data["grid"])})


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{directory} is not a teacher cache ({MANIFEST} is missing); build one with `openvla-align cache build`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is unreadable ({exc}); rebuild the cache.") from exc
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild the cache.")
    return manifest


class CacheWriter:
    """Append (key, features) rows; full shards are committed as they fill. Re-opening a partial cache resumes it:
    keys already stored are reported by ``has`` and skipped by ``add``."""

    def __init__(self, directory, spec: CacheSpec, shard_rows: int = 4096):
        canonical(spec.dtype, "cache dtype", STORAGE_DTYPES)
        self.dir = Path(directory)
        self.spec, self.shard_rows = spec, int(shard_rows)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shards: List[dict] = []
        self.known: set = set()
        if (self.dir / MANIFEST).exists():
            manifest = read_manifest(self.dir)
            theirs = CacheSpec.from_dict(manifest["spec"])
            diff = [
                f"{k}: cache has {v!r}, now {getattr(spec, k)!r}"
                for k, v in vars(theirs).items()
                if v != getattr(spec, k)
            ]
            if diff:
                raise CacheError(
                    f"{self.dir} already holds a cache made differently ({'; '.join(diff)}); choose "
                    "another output directory or delete this one."
                )
            self.shards = list(manifest["shards"])
            for shard in self.shards:  # resume: trust only shards whose bytes still match
                _verify_shard(self.dir, shard, spec, full=True)
                self.known.update(_read_keys(self.dir / shard["keys"]))
        for stale in self.dir.glob(".*.tmp"):  # temporaries of an interrupted run
            stale.unlink()
        self._buffer: Dict[bytes, torch.Tensor] = {}  # rows of the shard being filled, in order
        self._write_manifest(complete=False)

    def __len__(self) -> int:
        return len(self.known) + len(self._buffer)

    def has(self, key: bytes) -> bool:
        return key in self.known or key in self._buffer

    def add(self, keys: Sequence[bytes], feats: torch.Tensor) -> int:
        """Add rows (features (B, row_tokens, width): a frame's, or a multi-view sample's cameras' one after the
        other); rows whose key is stored already are skipped. Returns rows added."""
        want = (self.spec.row_tokens, self.spec.width)
        if feats.ndim != 3 or tuple(feats.shape[1:]) != want:
            raise ValueError(f"features must be (B, {want[0]}, {want[1]}); got {tuple(feats.shape)}.")
        feats = feats.detach().to("cpu", torch_dtype(self.spec.dtype))
        added = 0
        for key, row in zip(keys, feats):
            if len(key) != KEY_BYTES:
                raise ValueError(f"keys are {KEY_BYTES} bytes; got {len(key)}.")
            if self.has(key):
                continue
            self._buffer[key] = row.clone()  # not a view into the caller's batch
            added += 1
            if len(self._buffer) >= self.shard_rows:
                self.flush()
        return added

    def flush(self) -> None:
        """Commit the buffered rows as one shard (then list it in the manifest)."""
        if not self._buffer:
            return
        name = _shard_name(len(self.shards))
        feats = torch.stack(list(self._buffer.values())).view(torch.int16).numpy()
        if sys.byteorder != "little":
            feats = feats.byteswap()
        data, keys = feats.tobytes(), b"".join(self._buffer)  # one copy of the shard, written and hashed
        atomic_write_bytes(self.dir / f"{name}.feats", data)
        atomic_write_bytes(self.dir / f"{name}.keys", keys)
        self.shards.append(
            {
                "feats": f"{name}.feats",
                "keys": f"{name}.keys",
                "rows": len(self._buffer),
                "feats_sha256": hashlib.sha256(data).hexdigest(),
                "keys_sha256": hashlib.sha256(keys).hexdigest(),
            }
        )
        self.known.update(self._buffer)
        self._buffer = {}
        self._write_manifest(complete=False)

    def close(self, complete: bool = True) -> Path:
        """Flush and mark the cache complete (only a complete cache is accepted for training)."""
        self.flush()
        self._write_manifest(complete=complete)
        return self.dir

    def _write_manifest(self, complete: bool) -> None:
        manifest = {
            "format": FORMAT,
            "spec": self.spec.to_dict(),
            "rows": len(self.known),
            "complete": complete,
            "shards": self.shards,
        }
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        atomic_write_bytes(self.dir / MANIFEST, data)


def _read_keys(path: Path) -> List[bytes]:
    raw = path.read_bytes()
    return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]


def _verify_shard(directory: Path, shard: dict, spec: CacheSpec, full: bool) -> None:
    row_bytes = spec.row_tokens * spec.width * 2
    for kind, size in (("keys", shard["rows"] * KEY_BYTES), ("feats", shard["rows"] * row_bytes)):
        path = directory / shard[kind]
        if not path.is_file():
            raise CacheError(
                f"{path} is missing: the cache is incomplete; rebuild it (`openvla-align cache build` resumes)."
            )
        if path.stat().st_size != size:
            raise CacheError(
                f"{path} has {path.stat().st_size} bytes, expected {size}: the shard is truncated or "
                "stale; delete it and its manifest entry by rebuilding the cache."
            )
        if full and sha256_file(path) != shard[f"{kind}_sha256"]:
            raise CacheError(f"{path} is corrupt (its SHA-256 does not match the manifest); rebuild the cache.")


class TeacherCache:
    """Read side: validated at open, then ``lookup(keys)`` returns (B, tokens, width) targets from memory maps."""

    def __init__(self, directory, verify: bool = True):
        self.dir = Path(directory)
        manifest = read_manifest(self.dir)
        self.spec = CacheSpec.from_dict(manifest["spec"])
        if not manifest.get("complete"):
            raise CacheError(
                f"{self.dir} is an unfinished cache build ({manifest.get('rows', 0)} rows so far); "
                "run `openvla-align cache build` again to finish it."
            )
        self.dtype = torch_dtype(self.spec.dtype)
        self.index: Dict[bytes, Tuple[int, int]] = {}
        self.maps: List[np.memmap] = []
        for s, shard in enumerate(manifest["shards"]):
            _verify_shard(self.dir, shard, self.spec, full=verify)
            for row, key in enumerate(_read_keys(self.dir / shard["keys"])):
                if self.index.setdefault(key, (s, row)) != (s, row):
                    raise CacheError(f"{self.dir}: key {key.hex()} is stored twice; rebuild the cache.")
            shape = (shard["rows"], self.spec.row_tokens, self.spec.width)
            self.maps.append(np.memmap(self.dir / shard["feats"], dtype="<i2", mode="r", shape=shape))
        if len(self.index) != manifest.get("rows"):
            raise CacheError(
                f"{self.dir}: the manifest counts {manifest.get('rows')} rows but the shards hold "
                f"{len(self.index)}; rebuild the cache."
            )

    def __len__(self) -> int:
        return len(self.index)

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(self.spec.grid)

    @property
    def name(self) -> str:
        return f"teacher cache {self.dir} ({self.spec.teacher})"

    @property
    def multi_view(self) -> bool:
        """Rows are samples of ``views`` cameras seen together (a multi-view teacher's), not frames."""
        return self.spec.multi_view

    @property
    def views(self) -> int:
        return self.spec.views

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def check_views(self, views: int) -> None:
        """A multi-view cache serves samples of exactly its ``views`` cameras (a single-view one, any number)."""
        if self.spec.multi_view and views != self.spec.views:
            raise CacheError(
                f"Teacher cache {self.dir} holds {self.spec.teacher}'s targets per sample of {self.spec.views} "
                f"camera(s) seen together, but this run aligns {views} image(s) per sample: align every camera the "
                f"cache was built from (--align.images all, --num_images_in_input {self.spec.views}), or rebuild the "
                f"cache with `openvla-align cache build --num-images {views}`."
            )

    def targets(self, pixel_values: torch.Tensor, views: int = 1) -> torch.Tensor:
        """Targets for ``pixel_values`` holding one image per row, ``views`` consecutive rows a sample's cameras
        (frames recovered and keyed as in ``frame_keys``): (B * views, T, D) from a single-view cache, looked up
        frame by frame; (B, views * T, D) from a multi-view one, looked up sample by sample."""
        keys = keys_from_pixel_values(pixel_values)
        if not self.spec.multi_view:
            return self.lookup(keys)
        self.check_views(views)
        return self.lookup(sample_keys(keys, views))

    def lookup(self, keys: Iterable[bytes]) -> torch.Tensor:
        """Targets for ``keys`` in order, as a (B, row_tokens, width) CPU tensor of the cache's dtype: each row copied
        once, out of the page cache into the batch."""
        keys = list(keys)
        out = np.empty((len(keys), self.spec.row_tokens, self.spec.width), dtype="<i2")
        where = []
        for i, key in enumerate(keys):
            found = self.index.get(key)
            if found is None:
                raise CacheError(self._missing(key, i))
            where.append(found)
        for shard in sorted({s for s, _ in where}):  # before reading: a map of a file cut short would kill (SIGBUS)
            self._check_size(shard)
        for i, (shard, row) in enumerate(where):
            out[i] = self.maps[shard][row]
        # non-finite values (all exponent bits set): bytes that are not the teacher's, found on the int16 rows at
        # ~1.5 ms a batch of 16 x 256 x 1024 (torch.isfinite on the bf16 view takes ~17 ms)
        exponent = NON_FINITE_EXPONENT[self.spec.dtype]
        bad = (np.bitwise_and(out.view("<u2"), exponent, dtype="<u2") == exponent).reshape(len(where), -1).any(1)
        if bad.any():
            shard, row = where[int(np.argmax(bad))]
            raise CacheError(
                f"Teacher cache shard {self.maps[shard].filename} holds non-finite values in row {row}: it is corrupt. "
                f"Check the cache with `openvla-align cache verify {self.dir}`, rebuild it (`openvla-align cache "
                "build` recomputes what is missing), and resume from the last checkpoint."
            )
        return torch.from_numpy(out).view(self.dtype)

    def _check_size(self, shard: int) -> None:
        """The shard's file still has the size its map was opened with (verified against the manifest then)."""
        path, size = Path(self.maps[shard].filename), self.maps[shard].nbytes
        try:
            now = path.stat().st_size
        except OSError as exc:
            now = f"unreadable: {exc.strerror}"
        if now == size:
            return
        now = f"{now} bytes" if isinstance(now, int) else now
        raise CacheError(
            f"Teacher cache shard {path} changed since the run opened it ({now}; {size} bytes then): it was "
            f"truncated, removed or rewritten. Check the cache with `openvla-align cache verify {self.dir}`, "
            "rebuild it, and resume from the last checkpoint."
        )

    def _missing(self, key: bytes, index: int) -> str:
        if self.spec.multi_view:
            what = f"Sample {index} of the batch ({self.spec.views} camera frames together, key {key.hex()})"
        else:
            what = f"Frame {key.hex()}"
        return (
            f"{what} is not in the teacher cache {self.dir} (built from {self.spec.source or 'unknown frames'}): "
            "the training data differs from what the cache was built on. Rebuild the cache for this dataset, or "
            "drop --align.teacher_cache."
        )


def file_sha256(path: Optional[os.PathLike]) -> str:
    """SHA-256 of a weights file ('' for None or a directory), recorded so a cache is tied to its teacher weights."""
    if path is None or not Path(path).is_file():
        return ""
    return sha256_file(path)


def rlds_identity(data_root, dataset_name: str) -> Dict[str, object]:
    """Which build of ``dataset_name`` this is: its version directory and the SHA-256 of its dataset_info.json."""
    infos = sorted((Path(data_root) / dataset_name).glob("*/dataset_info.json"))
    if not infos:
        return {"dataset": dataset_name}
    info = infos[-1]
    return {"dataset": dataset_name, "version": info.parent.name, "dataset_info_sha256": file_sha256(info)}


def source_cameras(spec: CacheSpec) -> Optional[List[str]]:
    """The cameras whose frames a cache holds, in the order a sample feeds them (None when its source does not say;
    an RLDS cache built before camera lists holds the primary camera's alone)."""
    source = spec.source or {}
    if source.get("cameras"):
        return [str(c) for c in source["cameras"]]
    if source.get("kind") == "rlds":
        return ["image_primary"]
    return None


def _registered_multi_view(name: str) -> Optional[bool]:
    """Whether the registered teacher ``name`` is multi-view, when its spec says so (None: unknown)."""
    try:
        from ..teachers import teacher_spec

        value = getattr(teacher_spec(name), "multi_view", None)
    except Exception:  # an unknown or broken teacher is reported where it is built, not here
        return None
    return None if value is None else bool(value)


def open_for_training(
    config, dataset_name: Optional[str] = None, data_root=None, views: Optional[int] = None
) -> "TeacherCache":
    """Open ``config.teacher_cache`` and check it was built for this teacher, weights, teacher input, pooling and
    dataset, and (``views``: images per sample the run aligns, 1 with ``--align.images primary``) for as many
    cameras per sample; a cache built for anything else fails here, before the model loads."""
    cache = TeacherCache(config.teacher_cache, verify=config.verify_cache)
    spec, problems = cache.spec, []
    if spec.teacher != config.teacher:
        problem = f"it holds {spec.teacher!r} features but --align.teacher is {config.teacher!r}"
        if _registered_multi_view(config.teacher) and not spec.multi_view:
            problem += (
                f" (a single-view teacher's per-frame targets; {config.teacher} is multi-view, its targets are per "
                "sample, all cameras seen together)"
            )
        problems.append(problem)
    if config.teacher_resolution is not None and config.teacher_resolution != spec.resolution:
        problems.append(
            f"it was built at {spec.resolution} px, --align.teacher_resolution is {config.teacher_resolution}"
        )
    for name, default in (("teacher_input", "reference"), ("pooling", "resample"), ("pooling_pos_embed", 0.0)):
        ours = getattr(config, name, default)
        if ours != getattr(spec, name):
            problems.append(f"it was built with --align.{name} {getattr(spec, name)!r}, this run has {ours!r}")
    weights = file_sha256(config.teacher_path)
    if weights and spec.weights_sha256 and weights != spec.weights_sha256:
        problems.append(f"it was built from other teacher weights than {config.teacher_path}")
    if views is not None:
        cameras = source_cameras(spec)
        if spec.multi_view and views != spec.views:
            problems.append(
                f"it holds the multi-view teacher's targets per sample of {spec.views} camera(s) seen together, this "
                f"run aligns {views} image(s) per sample (--num_images_in_input, --align.images); rebuild it with "
                f"`cache build --num-images {views}`"
            )
        elif not spec.multi_view and cameras is not None and views > len(cameras):
            problems.append(
                f"it holds the frames of {len(cameras)} camera(s) per sample ({', '.join(cameras)}), this run aligns "
                f"{views} (add --align.images primary, or rebuild it with `cache build --num-images {views}`)"
            )
    source = spec.source or {}
    if source.get("kind") == "rlds" and dataset_name is not None:
        now = rlds_identity(data_root, dataset_name) if data_root is not None else {"dataset": dataset_name}
        if source.get("dataset") != dataset_name:
            problems.append(f"it was built on dataset {source.get('dataset')!r}, training uses {dataset_name!r}")
        elif now.get("dataset_info_sha256") and now.get("dataset_info_sha256") != source.get("dataset_info_sha256"):
            problems.append(f"dataset {dataset_name!r} under {data_root} changed since (its dataset_info.json differs)")
    if problems:
        raise CacheError(
            f"Teacher cache {cache.dir} does not fit this run: " + "; ".join(problems) + ". Rebuild it with "
            "`openvla-align cache build`, or drop --align.teacher_cache to run the teacher live."
        )
    return cache


__all__ = [
    "CacheError",
    "CacheSpec",
    "CacheWriter",
    "TeacherCache",
    "file_sha256",
    "open_for_training",
    "read_manifest",
    "rlds_identity",
    "source_cameras",
]
