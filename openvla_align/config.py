"""AlignConfig: every knob of Visual Representation Alignment, with the paper's defaults.

One draccus-compatible dataclass. It is validated once, in ``__post_init__``, and every error names the field,
the bad value and the fix. Checks that need the model (layer depth, teacher width) happen in ``Aligner.attach``.
"""

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from . import dtypes

logger = logging.getLogger(__name__)

TEACHER_DTYPES = ("auto", *dtypes.NAMES)
TARGETS = ("backbone", "encoder")
IMAGES = ("all", "primary")


def help_field(text: str) -> Dict[str, Any]:
    # draccus reads `custom_args`; `help` is the conventional key other tools (and readers) look for.
    return {"help": text, "custom_args": {"help": text}}


def option(default: Any, text: str) -> Any:
    """A config field with its ``--help`` text."""
    return field(default=default, metadata=help_field(text))


# Spatial Forcing's published alignment (arXiv 2510.12276, its train.sh) as AlignConfig fields: the one definition the
# bench and the tests use (recipes/oft/libero-spatial-forcing.yaml spells the same values out for users).
SPATIAL_FORCING: Dict[str, Any] = dict(
    teacher="vggt-1b",
    layers=(24,),
    coeff=0.5,
    loss="one-minus-cosine",
    projector="spatial-forcing",
    freeze_projector=False,
    teacher_input="spatial-forcing",
    pooling="bilinear-corners",
    pooling_pos_embed=0.1,
)


@dataclass
class AlignConfig:
    enabled: bool = option(False, "Add the alignment loss to the action loss.")
    teacher: str = option(
        "c-radio-v3-l",
        "Registered teacher name; `openvla-align teachers` lists them (C-RADIOv3-L is the paper's best).",
    )
    teacher_path: Optional[str] = option(
        None,
        "Local teacher weights: a checkpoint file, an HF snapshot directory or a torch.hub checkout. "
        "None looks in the HF cache and the torch.hub directory, offline.",
    )
    layers: Tuple[int, ...] = option(
        (16,),
        "LLM layers to align; layer L is output_hidden_states[L], the output of decoder block L-1.",
    )
    coeff: float = option(0.2, "Weight of the alignment loss: L = L_action + coeff * L_align.")
    loss: str = option(
        "cosine",
        "Alignment loss, a name in losses.LOSSES: cosine (the paper's -cos), one-minus-cosine (Spatial Forcing's "
        "1 - cos per sample), l2, ntxent.",
    )
    ntxent_temperature: float = option(0.1, "Temperature of the NT-Xent loss.")
    projector: str = option(
        "mlp",
        "Projector type: mlp (paper's Ln&D), linear, cosine, orthogonal, spectral, film, whitening, or "
        "spatial-forcing / spatial-forcing-nonorm (Spatial Forcing's [LayerNorm] Linear-GELU-Linear, xavier init).",
    )
    projector_dim: int = option(2048, "Hidden width of the MLP projector.")
    freeze_projector: bool = option(True, "Keep the randomly initialised projector frozen (the paper's choice).")
    projector_seed: int = option(0, "Seed of the projector's initialisation; identical on every process.")
    target: str = option(
        "backbone",
        "backbone: align an LLM layer (Backbone2Enc); encoder: align the vision encoder's output (Enc2Enc).",
    )
    images: str = option(
        "all",
        "With several camera images per sample (OpenVLA-OFT's num_images_in_input): all = align every image's "
        "256 visual tokens to the teacher's features of that image; primary = only the first (third-person) one.",
    )
    teacher_input: str = option(
        "reference",
        "How the teacher's images are made from pixel_values: reference (BlindVLA: the DINOv2 half un-normalised "
        "with bf16-rounded ImageNet constants, bilinear resize) or spatial-forcing (exact constants, bicubic resize "
        "to the teacher's width, centre crop).",
    )
    pooling: str = option(
        "resample",
        "How the teacher's patch grid is brought onto the student's token grid (pooling.POOLINGS): resample "
        "(bilinear, antialiased) or bilinear-corners (Spatial Forcing's, align_corners=True).",
    )
    pooling_pos_embed: float = option(
        0.0,
        "Scale of a (u, v) sin/cos position embedding added to the teacher's features before pooling (Spatial "
        "Forcing: 0.1; 0 adds none).",
    )
    teacher_resolution: Optional[int] = option(
        None,
        "Square input size for the teacher. None picks grid x patch so the teacher's grid equals the student's "
        "16x16 (256 px for patch-16 teachers, 224 px for patch-14).",
    )
    allow_random_teacher: bool = option(
        False,
        "Build the teacher with random weights (smoke tests only; never a silent fallback).",
    )
    trust_remote_code: bool = option(False, "Allow teachers that need remote code (e.g. Theia's HF implementation).")
    freeze_vision: bool = option(
        False,
        "Old spelling of --freeze.vision (the Freeze baseline is its own plugin); still honoured.",
    )
    teacher_dtype: str = option(
        "auto",
        "dtype of the teacher's weights and inference: auto = bfloat16 on CUDA (as the reference), float32 "
        "elsewhere (CPUs without native bf16 run it ~4x slower); or bfloat16, float16, float32.",
    )
    teacher_cache: Optional[str] = option(
        None,
        "Directory written by `openvla-align cache build`: read teacher targets from it instead of running the "
        "teacher (needs image_aug false).",
    )
    verify_cache: bool = option(
        True,
        "Check every shard's SHA-256 of teacher_cache before training (false: sizes only).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = (self.layers,)
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers:
            raise ValueError("AlignConfig.layers is empty; give at least one LLM layer, e.g. layers=(16,).")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"AlignConfig.layers={self.layers} repeats a layer; list each layer once.")
        if any(layer < 1 for layer in self.layers):
            raise ValueError(
                f"AlignConfig.layers={self.layers}: layers start at 1 (layer 0 is the embedding output, not a "
                "decoder block); use e.g. layers=(16,)."
            )
        if self.target not in TARGETS:
            raise ValueError(f"AlignConfig.target={self.target!r} is not one of {TARGETS}.")
        if self.images not in IMAGES:
            raise ValueError(f"AlignConfig.images={self.images!r} is not one of {IMAGES}.")
        if self.target == "encoder" and len(self.layers) > 1:
            raise ValueError(
                f"AlignConfig.target='encoder' aligns the vision encoder's single output, but layers={self.layers}; "
                "use target='backbone' for several LLM layers."
            )
        if not self.coeff > 0:
            raise ValueError(f"AlignConfig.coeff={self.coeff} must be > 0; disable alignment with enabled=False.")
        if self.projector_dim < 1:
            raise ValueError(f"AlignConfig.projector_dim={self.projector_dim} must be a positive width.")
        if not self.ntxent_temperature > 0:
            raise ValueError(f"AlignConfig.ntxent_temperature={self.ntxent_temperature} must be > 0.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"AlignConfig.teacher_dtype={self.teacher_dtype!r} is not one of {TEACHER_DTYPES}.")
        if self.pooling_pos_embed < 0:
            raise ValueError(f"AlignConfig.pooling_pos_embed={self.pooling_pos_embed} must be >= 0 (0 adds none).")
        if self.teacher_resolution is not None and self.teacher_resolution < 1:
            raise ValueError(f"AlignConfig.teacher_resolution={self.teacher_resolution} must be a positive size.")

    def resolved_teacher_dtype(self, device_type: str) -> str:
        """``teacher_dtype`` for a teacher running on ``device_type`` ("cuda", "cpu", ...); explicit values stay."""
        return dtypes.resolve(self.teacher_dtype, device_type)

    # --- serialisation: sorted JSON; newer keys are tolerated with a warning ---
    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["layers"] = list(self.layers)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "AlignConfig":  # noqa: D102
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Ignoring AlignConfig keys this version does not know: {unknown} (written by a newer openvla-align?)",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})
