"""Batched LIBERO policies: OpenVLA-OFT's and OpenVLA's query of one observation, for a whole batch per call.

OFT's evaluation (``experiments/robot/libero/run_libero_eval.py``) takes one observation at a time: it resizes the
256-px renders to 224 (``prepare_observation``), then ``get_vla_action`` centre-crops them, tokenises the prompt,
normalises the proprio state and calls the model's ``predict_action``, which handles one observation only. The
policies here do the same steps for B observations:

* images: :func:`prepare_image` and :func:`center_crop` run OFT's own TensorFlow ops (JPEG round trip, lanczos3
  antialiased resize; ``crop_and_resize`` of the central sqrt(0.9) box), on the batch; the proprio state is
  normalised and un-normalised with OFT's numpy formulas (:func:`normalize_proprio`, :func:`unnormalize_actions`);
* :class:`OFTPolicy`: one forward per group of rows whose prompts have the same token length (a LIBERO batch is one
  task: one group), through the model's own ``predict_action`` helpers (action placeholders and stop token, action
  masks, vision features with FiLM, proprio token, multimodal embedding) and then the LLM, the L1 head, the DDIM loop
  of the diffusion head (noise drawn as (B, chunk, dim)) or the discrete action tokens, as ``predict_action``;
* :class:`OpenVLALiberoPolicy`: the same image preparation, then ``run.BatchedPolicy``'s KV-cached action tokens.

Exactness: the image ops are OFT's (equal bytes); rows of one group see exactly the inputs ``predict_action`` builds
for each alone (same width, no padding), so they differ from OFT's one-at-a-time results only by the floating-point
order of batched matrix products (fp32 on the CPU: below 1e-6 on the tiny models of the tests). Two steps differ from
OFT's code in form, not in what they compute: the LLM's decoder runs without the LM head (the full model's
``hidden_states[-1]`` is the decoder's normed output; the discrete path applies the head to the action slots only,
sparing (B, sequence, vocabulary) logits), and components load on the CPU before moving to the model's device.

OFT's constants (chunk length, action dimension, normalisation type) are read from the loaded model's own module,
which imported them from OFT's ``prismatic.vla.constants`` (platform detected from ``sys.argv``), never hard-coded.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..vla.checkpoint import action_prompt
from .simulators import STATS_FILE, read_norm_stats

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224  # OpenVLA's input resolution (OFT's OPENVLA_IMAGE_SIZE)
CROP_SCALE = 0.9  # area of OFT's centre crop (its training-time random crop's scale)
SPACE_ID = 29871  # Llama-2's "▁", which predict_action appends to a prompt that does not end with it
SIDECAR = ("align", "projector.safetensors")  # the align plugin's sidecar beside an OFT checkpoint's weights


# --------------------------------------------------------------------------------------------------- images, proprio
def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "OFT's image pipeline (JPEG round trip, lanczos3 resize, centre crop) runs in TensorFlow: pip install "
            "tensorflow (OpenVLA-OFT pins tensorflow==2.15.0)"
        ) from None
    return tf


def _image_batch(images, what: str = "images") -> np.ndarray:
    images = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"{what}: expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images


def prepare_image(images, size: int = IMAGE_SIZE) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, size, size, 3) uint8 as OFT's ``resize_image_for_policy``: each image JPEG-encoded
    and decoded (as the RLDS builder stored the training images), then TensorFlow's lanczos3 antialiased resize,
    rounded and clipped to uint8."""
    tf = _tensorflow()
    images = _image_batch(images)
    decoded = [tf.io.decode_image(tf.image.encode_jpeg(im), expand_animations=False, dtype=tf.uint8) for im in images]
    resized = tf.image.resize(tf.stack(decoded), (size, size), method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


def center_crop(images, crop_scale: float = CROP_SCALE, size: int = IMAGE_SIZE) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, size, size, 3) uint8 as OFT's ``center_crop_image``: the central box of area
    ``crop_scale`` (sides sqrt(crop_scale)), bilinearly resized by ``tf.image.crop_and_resize`` in [0, 1] floats,
    converted back to uint8 with saturation."""
    tf = _tensorflow()
    images = _image_batch(images)
    x = tf.image.convert_image_dtype(tf.convert_to_tensor(images), tf.float32)
    side = tf.clip_by_value(tf.sqrt(crop_scale), 0, 1)
    offset = (1 - side) / 2
    boxes = tf.tile(tf.stack([offset, offset, offset + side, offset + side])[None], [len(images), 1])
    out = tf.image.crop_and_resize(x, boxes, tf.range(len(images)), (size, size))
    return tf.image.convert_image_dtype(tf.clip_by_value(out, 0, 1), tf.uint8, saturate=True).numpy()


def _bounds(stats: Mapping, kind) -> tuple:
    kind = str(getattr(kind, "value", kind)).lower()
    if kind == "bounds":
        low, high = stats["min"], stats["max"]
    elif kind == "bounds_q99":
        low, high = stats["q01"], stats["q99"]
    else:
        raise ValueError(f"normalisation {kind!r}: OFT's policies un-normalise 'bounds' or 'bounds_q99' only")
    mask = stats.get("mask", np.ones_like(low, dtype=bool))
    return np.asarray(mask, dtype=bool), np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)


def normalize_proprio(state, stats: Mapping, kind="bounds_q99") -> np.ndarray:
    """Proprio states (..., D) -> [-1, 1] as OFT's ``normalize_proprio``: masked dims map [low, high] (q01/q99, or
    min/max for ``"bounds"``) onto [-1, 1] (with OFT's 1e-8 in the denominator), then everything is clipped."""
    mask, low, high = _bounds(stats, kind)
    state = np.asarray(state, dtype=np.float64)
    return np.clip(np.where(mask, 2 * (state - low) / (high - low + 1e-8) - 1, state), -1.0, 1.0)


def unnormalize_actions(normalized, stats: Mapping, kind="bounds_q99") -> np.ndarray:
    """Normalised actions (..., D) -> the dataset's units as OFT's ``_unnormalize_actions`` (masked dims only)."""
    mask, low, high = _bounds(stats, kind)
    normalized = np.asarray(normalized)
    return np.where(mask, 0.5 * (normalized + 1) * (high - low + 1e-8) + low, normalized)


# --------------------------------------------------------------------------------------------------- settings
@dataclass
class PolicySettings:
    """The model settings of OFT's LIBERO ``GenerateConfig`` (its field names and defaults)."""

    use_l1_regression: bool = field(default=True, metadata={"help": "continuous actions from OFT's L1 action head"})
    use_diffusion: bool = field(default=False, metadata={"help": "continuous actions from the DDIM action head"})
    num_diffusion_steps_train: int = field(default=50, metadata={"help": "the diffusion head's training steps"})
    num_diffusion_steps_inference: int = field(default=50, metadata={"help": "DDIM steps per query"})
    use_film: bool = field(default=False, metadata={"help": "FiLM language conditioning of the vision towers"})
    num_images_in_input: int = field(default=2, metadata={"help": "cameras per observation (third-person first)"})
    use_proprio: bool = field(default=True, metadata={"help": "append the proprio state token"})
    center_crop: bool = field(default=True, metadata={"help": "centre-crop 0.9 of the area (trained with crops)"})
    num_open_loop_steps: int = field(default=8, metadata={"help": "actions executed per query (the chunk's last)"})
    lora_rank: int = field(default=32, metadata={"help": "the run's LoRA rank (FiLM checkpoints hold LoRA weights)"})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool") and not isinstance(value, bool):
                raise ValueError(f"policy setting {f.name}: expected true or false, got {value!r}")
            if f.type in (int, "int") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"policy setting {f.name}: expected an integer >= 1, got {value!r}")
        if self.use_l1_regression and self.use_diffusion:
            raise ValueError("policy settings: use_l1_regression and use_diffusion are both true; choose one head")
        if self.use_diffusion and self.num_diffusion_steps_inference > self.num_diffusion_steps_train:
            raise ValueError(
                f"policy setting num_diffusion_steps_inference: {self.num_diffusion_steps_inference} DDIM steps, more "
                f"than the head's {self.num_diffusion_steps_train} training steps; set at most that many"
            )

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], where: str = "policy") -> "PolicySettings":
        """Settings from a recipe's mapping; unknown keys are an error that lists the known ones."""
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown policy settings {unknown}; known: {known}")
        return cls(**data)

    @classmethod
    def for_openvla(cls, center_crop: bool = True) -> "PolicySettings":
        """OpenVLA's LIBERO evaluation: one image, no proprio, action tokens, one action per query."""
        return cls(use_l1_regression=False, num_images_in_input=1, use_proprio=False, num_open_loop_steps=1,
                   center_crop=center_crop)  # fmt: skip


# --------------------------------------------------------------------------------------------------- checkpoint files
def resolve_unnorm_key(stats: Union[Mapping[str, Any], str, Path], suite: str) -> str:
    """The un-normalisation key OFT's ``check_unnorm_key`` picks for a LIBERO suite: the suite's name, else
    ``<suite>_no_noops`` (OFT's datasets drop no-op actions). ``stats``: a statistics mapping or a checkpoint
    directory (:func:`read_norm_stats`)."""
    if not isinstance(stats, Mapping):
        stats = read_norm_stats(stats)
    for key in (suite, f"{suite}_no_noops"):
        if key in stats:
            return key
    raise ValueError(
        f"unnorm key: neither {suite!r} nor '{suite}_no_noops' is in the checkpoint's statistics (has: "
        f"{sorted(stats)}); evaluate a suite the model was fine-tuned on, or name the key"
    )


# what each setting needs from an OFT checkpoint directory: (name pattern, setting)
def _needed_components(settings: PolicySettings) -> Dict[str, str]:
    needs = {}
    if settings.use_l1_regression or settings.use_diffusion:
        needs["action_head"] = "use_l1_regression" if settings.use_l1_regression else "use_diffusion"
    if settings.use_proprio:
        needs["proprio_projector"] = "use_proprio"
    if settings.use_diffusion:
        needs["noisy_action_projector"] = "use_diffusion"
    if settings.use_film:
        needs["vision_backbone"] = "use_film"
    return needs


def find_component(checkpoint, pattern: str, setting: str) -> Path:
    """The one file of ``checkpoint`` whose name holds ``pattern`` and "checkpoint" (OFT's ``find_checkpoint_file``,
    e.g. ``action_head--150000_checkpoint.pt``)."""
    checkpoint = Path(checkpoint)
    found = sorted(p for p in checkpoint.iterdir() if pattern in p.name and "checkpoint" in p.name)
    if not found:
        raise FileNotFoundError(
            f"{checkpoint} has no *{pattern}*checkpoint* file, which {setting}=true needs; copy it from the training "
            f"run's checkpoint directory, or set {setting} false"
        )
    if len(found) > 1:
        raise ValueError(
            f"{checkpoint} has {len(found)} *{pattern}*checkpoint* files ({', '.join(p.name for p in found)}); keep "
            "the one of this checkpoint's step"
        )
    return found[0]


def sidecar_num_images(checkpoint) -> Optional[int]:
    """Cameras per sample recorded by openvla-align's ``align`` sidecar beside the weights (None: no record)."""
    path = Path(checkpoint).joinpath(*SIDECAR)
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("openvla-align", "{}"))
    except Exception as exc:  # the record is a check, not a need: a damaged sidecar does not stop an evaluation
        logger.warning("cannot read %s (%s); the camera count is not checked against it", path, exc)
        return None
    return info.get("num_images")


def check_checkpoint(checkpoint, settings: PolicySettings) -> Dict[str, Path]:
    """What an OFT checkpoint must hold for ``settings``, checked from its files without loading it: each component
    file the settings need (returned by pattern) and the camera count its ``align`` sidecar records, if any."""
    saved = sidecar_num_images(checkpoint)
    if saved is not None and saved != settings.num_images_in_input:
        raise ValueError(
            f"{checkpoint} was trained with {saved} camera(s) per sample ({'/'.join(SIDECAR)}), not "
            f"num_images_in_input={settings.num_images_in_input}; set num_images_in_input: {saved}"
        )
    return {pattern: find_component(checkpoint, pattern, s) for pattern, s in _needed_components(settings).items()}


def load_component(path: Path) -> Dict[str, torch.Tensor]:
    """A component's state dict (OFT's ``load_component_state_dict``: DDP's ``module.`` prefix dropped)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _fit(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: Path, hint: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0].rstrip(":")
        raise ValueError(f"{path.name} does not fit OFT's {type(module).__name__} here ({first}); {hint}") from None


# --------------------------------------------------------------------------------------------------- observations
def _observation_images(obs: Mapping[str, Any], num_images: int, n: int) -> List[np.ndarray]:
    """The cameras in OFT's order: ``full_image``, then every key holding "wrist" in the dict's order."""
    if "full_image" not in obs:
        raise ValueError(f"observation: no 'full_image' (has {sorted(obs)})")
    wrist = [k for k in obs if "wrist" in k] if num_images > 1 else []
    if len(wrist) != num_images - 1:
        raise ValueError(
            f"observation: num_images_in_input={num_images} needs {num_images - 1} wrist image key(s), found {wrist}"
        )
    images = [_image_batch(obs[k], f"observation {k!r}") for k in ["full_image", *wrist]]
    if any(len(im) != n for im in images):
        raise ValueError(f"observation: {n} instructions but image batches of {[len(im) for im in images]}")
    return images


def _check_instructions(instructions: Sequence[str]) -> List[str]:
    if isinstance(instructions, str) or not len(instructions):
        raise ValueError("instructions: expected a non-empty list of strings, one per observation")
    return [str(i) for i in instructions]


def _prepared(images: np.ndarray, crop: bool) -> np.ndarray:
    """OFT's two steps: ``prepare_observation``'s resize, then ``get_vla_action``'s optional centre crop."""
    images = prepare_image(images)
    return center_crop(images) if crop else images


def _settings(settings: Union[PolicySettings, Mapping, None]) -> PolicySettings:
    return settings if isinstance(settings, PolicySettings) else PolicySettings.from_dict(settings)


def _model_of(loaded, name: str, other: str):
    """``(base model, family)`` of ``loaded``, which must be of the family ``name`` (else: use ``other``)."""
    from ..vla.layout import family, unwrap

    base = unwrap(loaded.model)
    fam = family(base)
    if fam.name != name:
        label = {"openvla-oft": "OpenVLA-OFT", "openvla": "OpenVLA"}.get(name, name)
        raise ValueError(f"{loaded.path} is a {fam.name} model, not {label}; use {other}")
    return base, fam


# --------------------------------------------------------------------------------------------------- OpenVLA-OFT
class OFTPolicy:
    """An OpenVLA-OFT checkpoint's LIBERO policy: ``policy(obs, instructions) -> (B, chunk, action_dim)`` actions
    in the dataset's units, what OFT's ``get_vla_action`` returns one observation at a time.

    ``obs``: ``full_image`` (B, H, W, 3) uint8 (the env's render, already rotated 180°), wrist images (every key
    holding "wrist", in order) when ``num_images_in_input`` > 1, ``state`` (B, proprio_dim) when ``use_proprio``.
    The runner executes the chunk's last ``open_loop_steps`` actions open-loop, as OFT's action queue does.

    Construction checks everything it can before anything loads (settings, statistics, component files, the
    sidecar's camera count), then loads the components with OFT's own classes, applies FiLM as OFT's
    ``_apply_film_to_vla`` does (LoRA of ``lora_rank`` on every linear layer, the FiLM wrapper, the saved vision
    backbone) and sets the model's camera count: the loaded model is changed in place, as OFT's ``get_vla`` does.
    """

    def __init__(self, loaded, settings: Union[PolicySettings, Mapping, None], unnorm_key: str):
        settings = _settings(settings)
        base, fam = _model_of(loaded, "openvla-oft", "OpenVLALiberoPolicy")
        constants = sys.modules[type(base).__module__].__dict__
        self.chunk, self.action_dim = int(constants["NUM_ACTIONS_CHUNK"]), int(constants["ACTION_DIM"])
        self.norm_kind = constants["ACTION_PROPRIO_NORMALIZATION_TYPE"]
        self.ignore_index = int(constants["IGNORE_INDEX"])
        if not (settings.use_l1_regression or settings.use_diffusion) and (settings.use_proprio or settings.use_film):
            raise ValueError(
                "policy settings: without an action head (use_l1_regression and use_diffusion false) OFT's "
                "get_vla_action feeds the model neither proprio nor FiLM; set use_proprio and use_film false"
            )
        if settings.use_film and loaded.adapter is not None:
            raise ValueError(
                f"use_film: {loaded.adapter} is a LoRA adapter; FiLM checkpoints are evaluated merged (OFT's "
                "merged checkpoint directory holds the vision_backbone file): load that directory"
            )
        if loaded._processor is None:
            raise ValueError(f"{loaded.path} has no processor (preprocessor_config.json): OFT's pixels need it")
        if settings.num_open_loop_steps > self.chunk:
            raise ValueError(
                f"policy setting num_open_loop_steps: {settings.num_open_loop_steps}, but a query returns "
                f"{self.chunk} actions (NUM_ACTIONS_CHUNK); set at most {self.chunk}"
            )
        stats = read_norm_stats(loaded.path) or dict(getattr(base, "norm_stats", None) or {})
        if unnorm_key not in stats:
            raise ValueError(
                f"unnorm key {unnorm_key!r} is not in {loaded.path}'s statistics (has: {sorted(stats)}); name one of "
                "them (LIBERO: resolve_unnorm_key(stats, suite))"
            )
        self.stats = stats[unnorm_key]
        if settings.use_proprio and "proprio" not in self.stats:
            raise ValueError(f"statistics {unnorm_key!r} hold no proprio entry, which use_proprio=true needs")
        files = check_checkpoint(loaded.path, settings)
        film_state = self._film_state(files, settings) if settings.use_film else None

        self.loaded, self.base, self.settings, self.unnorm_key = loaded, base, settings, unnorm_key
        self.open_loop_steps = settings.num_open_loop_steps
        device, dtype = loaded.device, loaded.dtype
        self.action_head = self._action_head(files, settings, base.llm_dim)
        self.proprio_projector = self._proprio_projector(files, base.llm_dim) if settings.use_proprio else None
        self.noisy_action_projector = None
        if settings.use_diffusion:
            from prismatic.models.projectors import NoisyActionProjector

            self.noisy_action_projector = NoisyActionProjector(llm_dim=base.llm_dim)
            path = files["noisy_action_projector"]
            _fit(self.noisy_action_projector, load_component(path), path, "check use_diffusion")
        for m in (self.action_head, self.proprio_projector, self.noisy_action_projector):
            if m is not None:
                m.to(device=device, dtype=dtype).eval()
        if film_state is not None:
            self._apply_film(film_state, files["vision_backbone"], settings.lora_rank, device, dtype)
        fam.set_num_images(base, settings.num_images_in_input)
        loaded.num_images = settings.num_images_in_input

    # ---- construction
    @staticmethod
    def _film_state(files, settings) -> Dict[str, torch.Tensor]:
        """The saved FiLM vision backbone, checked against ``lora_rank`` before the model is changed."""
        path = files["vision_backbone"]
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        ranks = sorted({int(v.shape[0]) for k, v in state.items() if ".lora_A." in k})
        if ranks and ranks != [settings.lora_rank]:
            raise ValueError(
                f"{path.name} holds LoRA weights of rank {ranks}, not lora_rank={settings.lora_rank}; set lora_rank "
                "to the training run's"
            )
        return state

    def _action_head(self, files, settings, llm_dim: int):
        if not (settings.use_l1_regression or settings.use_diffusion):
            return None
        from prismatic.models.action_heads import DiffusionActionHead, L1RegressionActionHead

        if settings.use_l1_regression:
            head = L1RegressionActionHead(input_dim=llm_dim, hidden_dim=llm_dim, action_dim=self.action_dim)
        else:
            head = DiffusionActionHead(
                input_dim=llm_dim,
                hidden_dim=llm_dim,
                action_dim=self.action_dim,
                num_diffusion_steps_train=settings.num_diffusion_steps_train,
            )
            head.noise_scheduler.set_timesteps(settings.num_diffusion_steps_inference)
        path = files["action_head"]
        _fit(head, load_component(path), path, "use_l1_regression/use_diffusion must name the head the run trained")
        return head

    def _proprio_projector(self, files, llm_dim: int):
        from prismatic.models.projectors import ProprioProjector

        path = files["proprio_projector"]
        state = load_component(path)
        stats_dim = len(_bounds(self.stats["proprio"], self.norm_kind)[1])
        weight = state.get("fc1.weight")  # (llm_dim, proprio_dim): the width the run trained with
        proprio_dim = int(weight.shape[1]) if weight is not None else stats_dim
        if proprio_dim != stats_dim:
            raise ValueError(
                f"{path.name} takes {proprio_dim}-d proprio but the statistics {self.unnorm_key!r} are "
                f"{stats_dim}-d; the files come from different runs"
            )
        projector = ProprioProjector(llm_dim=llm_dim, proprio_dim=proprio_dim)
        _fit(projector, state, path, "check use_proprio")
        return projector

    def _apply_film(self, state, path: Path, rank: int, device, dtype) -> None:
        from peft import LoraConfig, get_peft_model
        from prismatic.models.film_vit_wrapper import FiLMedPrismaticVisionBackbone

        config = LoraConfig(r=rank, lora_alpha=min(rank, 16), lora_dropout=0.0, target_modules="all-linear",
                            init_lora_weights="gaussian")  # fmt: skip
        base = get_peft_model(self.base, config).model  # LoRA injected in place; its B is zero outside the towers
        base.vision_backbone = FiLMedPrismaticVisionBackbone(vision_backbone=base.vision_backbone, llm_dim=base.llm_dim)
        _fit(base.vision_backbone, state, path, "set use_film and lora_rank as the run did")
        base.to(device=device, dtype=dtype).eval()

    # ---- query
    @property
    def proprio_dim(self) -> Optional[int]:
        return self.proprio_projector.proprio_dim if self.proprio_projector is not None else None

    def __call__(self, obs: Mapping[str, Any], instructions: Sequence[str], *, noise=None) -> np.ndarray:
        """Action chunks (B, chunk, action_dim), float64 in the dataset's units. ``noise`` (B, chunk, action_dim):
        the diffusion head's starting noise (default: drawn from torch's global generator)."""
        s = self.settings
        instructions = _check_instructions(instructions)
        n = len(instructions)
        cameras = _observation_images(obs, s.num_images_in_input, n)
        proprio = None
        if s.use_proprio:
            state = np.asarray(obs.get("state"), dtype=np.float64) if "state" in obs else None
            if state is None or state.shape != (n, self.proprio_dim):
                got = None if state is None else state.shape
                raise ValueError(f"observation 'state': expected ({n}, {self.proprio_dim}) proprio states, got {got}")
            proprio = normalize_proprio(state, self.stats["proprio"], self.norm_kind)
        if noise is not None:
            noise = torch.as_tensor(noise)
            if tuple(noise.shape) != (n, self.chunk, self.action_dim):
                raise ValueError(f"noise: expected {(n, self.chunk, self.action_dim)}, got {tuple(noise.shape)}")
        elif s.use_diffusion:
            noise = torch.randn((n, self.chunk, self.action_dim), device=self.loaded.device, dtype=self.loaded.dtype)

        pixels = torch.cat([self._pixels(_prepared(images, s.center_crop)) for images in cameras], dim=1)
        rows = [self._prompt_ids(text) for text in instructions]
        normalized = np.zeros((n, self.chunk, self.action_dim), dtype=np.float64)
        for length in sorted({len(r) for r in rows}):
            idx = [i for i, r in enumerate(rows) if len(r) == length]
            normalized[idx] = self._predict(
                torch.tensor([rows[i] for i in idx]),
                pixels[idx],
                None if proprio is None else proprio[idx],
                None if noise is None else noise[idx],
            )
        return unnormalize_actions(normalized, self.stats["action"], self.norm_kind)

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        """One camera's fused 6-channel pixel values (B, 6, 224, 224) from the checkpoint's image processor, which
        transforms each image on its own (what ``processor(prompt, image)`` gives one at a time)."""
        from PIL import Image

        processor = self.loaded._processor.image_processor
        pixels = processor([Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
        return torch.as_tensor(pixels)

    def _prompt_ids(self, instruction: str) -> List[int]:
        """``get_vla_action``'s prompt (instruction lower-cased), tokenised with BOS, "▁" appended as
        ``predict_action`` does when the prompt does not end with it."""
        ids = list(self.loaded.tokenizer(action_prompt(instruction.lower())).input_ids)
        return ids if ids[-1] == SPACE_ID else ids + [SPACE_ID]

    @torch.inference_mode()
    def _predict(self, ids, pixels, proprio, noise) -> np.ndarray:
        """Normalised actions (b, chunk, dim) of rows with equal prompt lengths: ``predict_action`` for b rows."""
        base, device, dtype = self.base, self.loaded.device, self.loaded.dtype
        b, num_prompt = ids.shape[0], ids.shape[1] - 1
        ids = ids.to(device)
        labels = torch.full_like(ids, self.ignore_index)
        ids, mask = base._prepare_input_for_action_prediction(ids, torch.ones_like(ids))
        labels = base._prepare_labels_for_action_prediction(labels, ids)
        embeddings = base.get_input_embeddings()(ids)
        actions_mask = base._process_action_masks(labels)
        language = embeddings[~actions_mask].reshape(b, -1, embeddings.shape[2])
        patches = base._process_vision_features(pixels.to(device, dtype), language, self.settings.use_film)
        if proprio is not None:
            state = torch.tensor(proprio, dtype=torch.float32).to(device, patches.dtype)
            patches = base._process_proprio_features(patches, state, self.proprio_projector)
        diffusion = self.settings.use_diffusion
        start = base.vision_backbone.get_num_patches() * base.vision_backbone.get_num_images_in_input()
        start += int(proprio is not None) + int(diffusion) + num_prompt
        span = slice(start, start + self.action_dim * self.chunk)
        if diffusion:
            actions = self._denoise(embeddings, actions_mask, patches, mask, span, noise.to(device, embeddings.dtype))
        else:
            embeddings = embeddings * ~actions_mask.unsqueeze(-1)
            hidden = self._last_hidden(*base._build_multimodal_attention(embeddings, patches, mask))[:, span]
            if self.action_head is not None:
                actions = self.action_head.predict_action(hidden)
            else:
                return self._token_actions(hidden)
        return actions.reshape(b, self.chunk, self.action_dim).float().cpu().numpy()

    def _denoise(self, embeddings, actions_mask, patches, mask, span, noisy) -> torch.Tensor:
        """``_run_diffusion_prediction`` for a batch: the timestep token (one per step, shared by the rows) after
        the patches, the noisy actions' projections in the action slots, one DDIM step per scheduler timestep."""
        base, head, b = self.base, self.action_head, noisy.shape[0]
        for t in head.noise_scheduler.timesteps:
            step = torch.Tensor([t]).to(patches.device)
            token = head.time_encoder(step).to(noisy.dtype).to(noisy.device)[:, None].expand(b, -1, -1)
            features = self.noisy_action_projector(noisy.reshape(b, -1).unsqueeze(-1))
            embeddings = base._replace_input_embeddings(embeddings.clone(), actions_mask, features)
            multimodal = base._build_multimodal_attention(embeddings, torch.cat((patches, token), dim=1), mask)
            noise_pred = head.predict_noise(self._last_hidden(*multimodal)[:, span])
            noisy = head.noise_scheduler.step(noise_pred, t, noisy).prev_sample
        return noisy

    def _last_hidden(self, embeddings, mask) -> torch.Tensor:
        """The LLM's last hidden states (``output.hidden_states[-1]``: the decoder's normed output), without the LM
        head's logits over the whole sequence."""
        decoder = self.base.language_model.get_decoder()
        out = decoder(inputs_embeds=embeddings, attention_mask=mask, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def _token_actions(self, hidden) -> np.ndarray:
        """OFT's discrete path: the argmax action token at each action slot -> its bin centre."""
        base = self.base
        ids = base.language_model.get_output_embeddings()(hidden).argmax(dim=2).cpu().numpy()
        bins = np.clip(base.vocab_size - ids - 1, 0, base.bin_centers.shape[0] - 1)
        return base.bin_centers[bins].reshape(-1, self.chunk, self.action_dim)


# --------------------------------------------------------------------------------------------------- OpenVLA
class OpenVLALiberoPolicy:
    """An OpenVLA checkpoint's LIBERO policy (OpenVLA's ``experiments/robot/libero``): the third-person image
    resized and centre-cropped as OFT's (the same TensorFlow ops), then ``run.BatchedPolicy``'s greedy action tokens
    (prompt lower-cased, as OpenVLA's ``get_vla_action``). Returns (B, 1, 7); one action per query.

    ``dataset_statistics.json`` in the checkpoint directory replaces the model's ``norm_stats``, as OpenVLA's
    ``get_vla`` does."""

    open_loop_steps = 1

    def __init__(self, loaded, settings: Union[PolicySettings, Mapping, None], unnorm_key: str):
        from .run import BatchedPolicy

        settings = _settings(settings)
        base, _ = _model_of(loaded, "openvla", "OFTPolicy")
        wanted = PolicySettings.for_openvla(settings.center_crop)
        differ = [f"{f.name}={getattr(settings, f.name)}" for f in fields(settings)
                  if f.name not in ("lora_rank", "num_diffusion_steps_train", "num_diffusion_steps_inference")
                  and getattr(settings, f.name) != getattr(wanted, f.name)]  # fmt: skip
        if differ:
            raise ValueError(
                f"{loaded.path} is an OpenVLA model (one image, action tokens, one action per query): policy settings "
                f"{', '.join(differ)} need OpenVLA-OFT; set use_l1_regression: false, use_diffusion: false, use_film: "
                "false, use_proprio: false, num_images_in_input: 1, num_open_loop_steps: 1"
            )
        stats = read_norm_stats(loaded.path) if (Path(loaded.path) / STATS_FILE).is_file() else None
        if stats is not None:
            base.norm_stats = stats
        self.settings = settings
        self.policy = BatchedPolicy(loaded, unnorm_key)

    def __call__(self, obs: Mapping[str, Any], instructions: Sequence[str]) -> np.ndarray:
        instructions = _check_instructions(instructions)
        (images,) = _observation_images(obs, 1, len(instructions))
        return self.policy(list(_prepared(images, self.settings.center_crop)), instructions)[:, None, :]


def make_policy(loaded, settings: Union[PolicySettings, Mapping, None], unnorm_key: str):
    """The LIBERO policy of a loaded checkpoint's family: :class:`OFTPolicy` or :class:`OpenVLALiberoPolicy`."""
    from ..vla.layout import family

    cls = OFTPolicy if family(loaded.model).name == "openvla-oft" else OpenVLALiberoPolicy
    return cls(loaded, settings, unnorm_key)


__all__ = [
    "CROP_SCALE",
    "IMAGE_SIZE",
    "OFTPolicy",
    "OpenVLALiberoPolicy",
    "PolicySettings",
    "center_crop",
    "check_checkpoint",
    "find_component",
    "load_component",
    "make_policy",
    "normalize_proprio",
    "prepare_image",
    "read_norm_stats",
    "resolve_unnorm_key",
    "sidecar_num_images",
    "unnormalize_actions",
]
