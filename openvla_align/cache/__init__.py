"""Precomputed teacher features: frame keys, a sharded memory-mapped store, and its builder."""

from .keys import frame_key, frames_from_pixel_values, keys_from_pixel_values, pixel_values_from_frames
from .store import CacheError, CacheSpec, CacheWriter, TeacherCache, read_manifest

__all__ = [
    "CacheError",
    "CacheSpec",
    "CacheWriter",
    "TeacherCache",
    "frame_key",
    "frames_from_pixel_values",
    "keys_from_pixel_values",
    "pixel_values_from_frames",
    "read_manifest",
]
