"""The C-RADIOv3 variants as data (torch-free): what ``catalog`` registers and ``radio`` builds.

The RADIO family owns this table; ``catalog`` imports it to register the variants, ``radio`` and ``radio_vit`` to
build them, so no family module reads data back from the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from .spec import CLIP_MEAN, CLIP_STD, TeacherSpec, WeightSource

RADIO_PATCH_SIZE = 16
RADIO_PREFIX_TOKENS = 8  # summary + register tokens of C-RADIOv3
RADIO_HF_FILES = ("model.safetensors", "model.safetensors.index.json")  # an HF snapshot (single file or sharded)


@dataclass(frozen=True)
class RadioVariant:
    name: str
    width: int
    depth: int
    num_heads: int
    layer_scale: bool
    hf_repos: Tuple[str, ...]  # spellings of its HF repo id (the cache keeps the one used to download)
    hub_files: Tuple[str, ...]  # release file names as torch.hub stores them (first is the real one)
    mlp_ratio: float = 4.0

    @property
    def hf_files(self) -> Tuple[str, ...]:
        """What an HF snapshot of the variant may hold: safetensors (single or sharded), the release file, a .bin."""
        return RADIO_HF_FILES + self.hub_files + ("pytorch_model.bin",)

    @property
    def spec(self) -> TeacherSpec:
        return TeacherSpec(
            name=self.name,
            family="radio",
            width=self.width,
            patch_size=RADIO_PATCH_SIZE,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            num_prefix_tokens=RADIO_PREFIX_TOKENS,
            normalized_inside=True,
            # HF repo ids are case-insensitive online, but the cache keeps the spelling used: every one is searched.
            sources=tuple(WeightSource(self.hf_files, r) for r in self.hf_repos) + (WeightSource(self.hub_files),),
        )


# Heads and layer scale follow RADIO's timm model definitions (vit_{base,large}_patch16_v2_224 with
# init_values=1e-5, vit_huge_patch16_224 / vit_giant_patch16_224 without). Depth, width, MLP width and layer scale
# are read from the checkpoint when one is loaded. The v3-L release file really is named "c-radio-v3_l_half".
RADIO_VARIANTS: Dict[str, RadioVariant] = {
    v.name: v
    for v in (
        RadioVariant("c-radio-v3-b", 768, 12, 12, True, ("nvidia/C-RADIOv3-B",), ("c-radio_v3-b_half.pth.tar",)),
        RadioVariant(
            "c-radio-v3-l",
            1024,
            24,
            16,
            True,
            ("nvidia/C-RADIOv3-L",),
            ("c-radio-v3_l_half.pth.tar", "c-radio_v3-l_half.pth.tar"),
        ),
        RadioVariant("c-radio-v3-h", 1280, 32, 16, False, ("nvidia/C-RADIOv3-H",), ("c-radio_v3-h_half.pth.tar",)),
        RadioVariant(
            "c-radio-v3-g",
            1536,
            40,
            24,
            False,
            ("nvidia/C-RADIOv3-g", "nvidia/C-RADIOv3-G"),
            ("c-radio_v3-g_half.pth.tar",),
        ),
    )
}
