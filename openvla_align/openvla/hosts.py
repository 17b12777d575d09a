"""What the plugins need to know of each finetune script they run in (the host): which one a config comes from, the
images per sample it feeds the model, and where a resumed run's checkpoint is before the model loads.

Each host's patch lives in ``patches/<name>/``; this is the rest of its knowledge, one entry per script:

    openvla      openvla/openvla vla-scripts/finetune.py: one image; resumes with --resume_from DIR
    openvla-oft  moojink/openvla-oft vla-scripts/finetune.py: --num_images_in_input images; resumes with
                 --resume true --resume_step N, ``vla_path`` being the checkpoint of step N

Recognised by the fields of the script's ``FinetuneConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple


@dataclass(frozen=True)
class Host:
    name: str  # its folder under patches/
    title: str
    marker: str  # a FinetuneConfig field only this host's script has
    images: Callable[[Any], int]
    resume_dir: Callable[[Any], Optional[Path]]

    def matches(self, cfg: Any) -> bool:
        return hasattr(cfg, self.marker)


def _oft_resume_dir(cfg: Any) -> Optional[Path]:
    return Path(str(cfg.vla_path).rstrip("/")) if getattr(cfg, "resume", False) else None


def _openvla_resume_dir(cfg: Any) -> Optional[Path]:
    resume_from = getattr(cfg, "resume_from", None)
    return Path(resume_from) if resume_from else None


HOSTS: Tuple[Host, ...] = (
    Host(
        "openvla-oft", "OpenVLA-OFT", "num_images_in_input", lambda cfg: int(cfg.num_images_in_input), _oft_resume_dir
    ),
    Host("openvla", "OpenVLA", "adapter_tmp_dir", lambda cfg: 1, _openvla_resume_dir),
)


def host_of(cfg: Any) -> Host:
    """The host whose ``FinetuneConfig`` ``cfg`` is (OpenVLA's when no other matches: its config is the smallest)."""
    return next((host for host in HOSTS if host.matches(cfg)), HOSTS[-1])
