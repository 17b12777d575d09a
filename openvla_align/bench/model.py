"""The bench's model: OpenVLA-7B's and OpenVLA-OFT's shapes (analytic) and CPU-sized models with the same structure,
their batches, and one training step per mode (plain SFT, live teacher, cached targets, the reference's
all-hidden-states path; at OFT's shapes also Spatial Forcing's VGGT teacher, live and cached)."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ..config import SPATIAL_FORCING

MODES = ("sft", "live", "cache", "reference")
# Spatial Forcing's recipe (VGGT-1B, both cameras through it together, its projector, loss, input and pooling): the
# live teacher and its cache, at OpenVLA-OFT's shapes
VGGT_MODES = ("live-vggt", "cache-vggt")
PROMPT_TEXT = 26  # "In: What action should the robot take to <instruction>?\nOut:" after BOS
PROMPT_TOKENS = PROMPT_TEXT + 7 + 1  # OpenVLA: + 7 action tokens + </s>
VISUAL_TOKENS = 256  # per image
# OpenVLA-OFT's LIBERO setting (its documented command line): 2 images (third-person + wrist), 8-d proprio,
# chunks of 8 actions x 7 dims, all 56 action tokens in one forward, an L1-regression head on their last hidden states
OFT_IMAGES, OFT_CHUNK, OFT_ACTION_DIM, OFT_PROPRIO_DIM = 2, 8, 7, 8


# --------------------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Tower:
    """A transformer stack: FLOPs per sample from its shape (matmuls only; 2 FLOPs per multiply-add)."""

    width: int
    depth: int
    mlp: int
    tokens: int
    gated: bool = False  # SwiGLU MLP (three matrices) as in Llama

    def forward_flops(self) -> float:
        t, w = self.tokens, self.width
        linear = 4 * w * w + (3 if self.gated else 2) * w * self.mlp
        attention = 2 * t * w  # scores + weighted sum, per token
        return 2.0 * self.depth * t * (linear + attention)

    def params(self) -> float:
        return self.depth * (4 * self.width**2 + (3 if self.gated else 2) * self.width * self.mlp)

    @property
    def out_width(self) -> int:  # the feature width a teacher of this shape gives
        return self.width

    def sample_flops(self, images: int) -> float:
        """A single-view teacher (or tower) runs on each image on its own."""
        return images * self.forward_flops()


@dataclass(frozen=True)
class VGGTTower:
    """VGGT's aggregator (multi-view): per frame a DINOv2 ViT patch embedding (``embed_depth`` blocks), then ``depth``
    pairs of a frame block (attention within each frame) and a global block (attention over all the sample's frames
    at once); a feature is a frame block's and a global block's outputs concatenated (2 x width). ``tokens`` per frame:
    the patches and 5 prefix tokens (the patch embedding's class token and 4 registers; the aggregator's camera token
    and 4 registers)."""

    width: int
    depth: int
    mlp: int
    tokens: int
    embed_depth: int
    heads: int
    resolution: int

    @property
    def out_width(self) -> int:
        return 2 * self.width

    def towers(self, images: int) -> Tuple[Tower, Tower, Tower]:
        """(patch embedding, frame blocks) run per frame, global blocks once per sample over ``images`` frames."""
        w, m, t = self.width, self.mlp, self.tokens
        return Tower(w, self.embed_depth, m, t), Tower(w, self.depth, m, t), Tower(w, self.depth, m, images * t)

    def sample_flops(self, images: int) -> float:
        embed, frame, glob = self.towers(images)
        return images * (embed.forward_flops() + frame.forward_flops()) + glob.forward_flops()

    def forward_flops(self) -> float:  # one frame alone
        return self.sample_flops(1)

    def params(self) -> float:
        embed, frame, glob = self.towers(1)
        return embed.params() + frame.params() + glob.params()


TeacherShape = Union[Tower, VGGTTower]


@dataclass(frozen=True)
class Scale:
    name: str
    dino: Tower
    siglip: Tower
    llm: Tower
    teacher: Tower
    vocab: int
    layer: int  # aligned LLM layer
    family: str = "openvla"  # "openvla-oft": OFT's inputs (images, proprio token, action chunk) and L1 head
    images: int = 1  # camera images per sample (each 256 visual tokens, each seen by the teacher)
    chunk: int = 1  # actions per forward (OpenVLA: 1; OFT: the whole chunk in parallel)
    teacher_name: str = "c-radio-v3-l"
    recipe: str = "blindvla"  # the alignment's settings: "blindvla" (the paper's) or "spatial-forcing" (RECIPES)
    vggt: Optional[VGGTTower] = None  # VGGT-1B at this size, and the LLM layer Spatial Forcing aligns (its 24 of 32)
    vggt_layer: int = 0

    @property
    def visual_tokens(self) -> int:
        return VISUAL_TOKENS * self.images

    @property
    def vision_flops(self) -> float:  # per sample: the towers and the teacher run once per image
        return self.images * (self.dino.forward_flops() + self.siglip.forward_flops())

    @property
    def teacher_flops(self) -> float:  # per sample: a multi-view teacher sees the sample's images together
        return self.teacher.sample_flops(self.images)

    @property
    def head_flops(self) -> float:  # OFT's L1 head: MLPResNet(2 blocks) from ACTION_DIM * width to width, per action
        if self.family != "openvla-oft":
            return 0.0
        w = self.llm.width
        return 2.0 * self.chunk * (OFT_ACTION_DIM * w * w + 2 * w * w + w * OFT_ACTION_DIM)

    def proportions(self) -> Dict[str, float]:
        llm = self.llm.forward_flops() + 2.0 * self.llm.tokens * self.llm.width * self.vocab + self.head_flops
        return {"vision": self.vision_flops / llm, "llm": 1.0, "teacher": self.teacher_flops / llm}


SEQ = 1 + VISUAL_TOKENS + PROMPT_TOKENS
OFT_PROMPT_TOKENS = PROMPT_TEXT + OFT_CHUNK * OFT_ACTION_DIM + 1  # + the chunk's 56 action tokens + </s>
OFT_SEQ = 1 + OFT_IMAGES * VISUAL_TOKENS + 1 + OFT_PROMPT_TOKENS  # BOS, visual tokens, proprio token, prompt
VGGT_PREFIX = 5  # per frame: 1 camera + 4 register tokens (its patch embedding: 1 class + 4 registers)
# VGGT-1B: 24 frame + 24 global blocks of width 1024 (16 heads, MLP 4x) over a DINOv2-L/14 patch embedding (24 blocks)
# at 518 px: 37 x 37 = 1369 patches + 5 prefix tokens per frame
VGGT_1B = VGGTTower(1024, 24, 4096, 37 * 37 + VGGT_PREFIX, embed_depth=24, heads=16, resolution=518)
# Widths / 8, and depths / 8 rather than / 4: at width 128 attention over 1374 tokens (2748 in a global block) weighs
# more against the linear layers than at width 1024, and depth 3 keeps VGGT : LLM near its 7B proportion (0.90 : 1
# against 0.80 : 1 at OFT's shapes). The input stays Spatial Forcing's 518 px.
VGGT_CPU = VGGTTower(128, 3, 512, 37 * 37 + VGGT_PREFIX, embed_depth=3, heads=2, resolution=518)
VGGT_SMOKE = VGGTTower(32, 1, 128, 16 * 16 + VGGT_PREFIX, embed_depth=1, heads=2, resolution=224)
OPENVLA_7B = Scale(
    "OpenVLA-7B + C-RADIOv3-L",
    dino=Tower(1024, 24, 4096, 261),  # ViT-L/14 with 4 registers + cls at 224 px
    siglip=Tower(1152, 27, 4304, 256),  # SigLIP so400m/14 at 224 px
    llm=Tower(4096, 32, 11008, SEQ, gated=True),  # Llama-2-7B
    teacher=Tower(1024, 24, 4096, 256 + 8),  # C-RADIOv3-L at 256 px, 8 prefix tokens
    vocab=32064,
    layer=16,
    vggt=VGGT_1B,
    vggt_layer=24,
)
CPU_SCALE = Scale(
    "CPU scale (widths / 8, depths / 4)",
    dino=Tower(128, 6, 512, 257),
    siglip=Tower(144, 6, 576, 256),
    llm=Tower(512, 8, 1376, SEQ, gated=True),
    teacher=Tower(128, 6, 512, 256 + 8),
    vocab=768,
    layer=4,
    vggt=VGGT_CPU,
    vggt_layer=6,
)
SMOKE_SCALE = Scale(  # for tests of the bench itself: same code paths, seconds not minutes
    "smoke scale",
    dino=Tower(32, 2, 128, 257),
    siglip=Tower(48, 2, 192, 256),
    llm=Tower(64, 4, 128, SEQ, gated=True),
    teacher=Tower(32, 2, 128, 256 + 8),
    vocab=768,
    layer=2,
    vggt=VGGT_SMOKE,
    vggt_layer=3,
)


def oft(scale: Scale) -> Scale:
    """``scale`` with OpenVLA-OFT's LIBERO inputs: 2 images, a proprio token, a chunk of 8 x 7 action tokens."""
    llm = Tower(scale.llm.width, scale.llm.depth, scale.llm.mlp, OFT_SEQ, gated=True)
    return replace(
        scale,
        name=f"{scale.name}, OpenVLA-OFT inputs",
        llm=llm,
        family="openvla-oft",
        images=OFT_IMAGES,
        chunk=OFT_CHUNK,
    )


def with_vggt(scale: Scale, name: Optional[str] = None) -> Scale:
    """``scale`` aligned as Spatial Forcing does: its VGGT-1B-shaped teacher on the sample's cameras together, its
    LLM layer (24 of 32), projector, loss, teacher input and pooling (``RECIPES["spatial-forcing"]``)."""
    if scale.vggt is None:
        raise ValueError(f"{scale.name} has no VGGT teacher shape.")
    return replace(
        scale,
        name=name or f"{scale.name}, VGGT",
        teacher=scale.vggt,
        teacher_name="vggt-1b",
        layer=scale.vggt_layer,
        recipe="spatial-forcing",
    )


def mode_scale(scale: Scale, mode: str) -> Scale:
    """The scale a mode runs at: Spatial Forcing's VGGT for the VGGT modes, ``scale`` itself for the others."""
    return with_vggt(scale) if mode in VGGT_MODES else scale


def family_modes(family: str) -> Tuple[str, ...]:
    """The modes the bench runs for a model family: the four, and at OpenVLA-OFT's shapes VGGT live and cached."""
    return MODES + (VGGT_MODES if family == "openvla-oft" else ())


OFT_7B = replace(oft(OPENVLA_7B), name="OpenVLA-OFT-7B + C-RADIOv3-L")
OFT_7B_VGGT = with_vggt(OFT_7B, name="OpenVLA-OFT-7B + VGGT-1B (Spatial Forcing)")
SCALES = {"cpu": CPU_SCALE, "smoke": SMOKE_SCALE, "oft-cpu": oft(CPU_SCALE), "oft-smoke": oft(SMOKE_SCALE)}
FULL_SCALES = {"openvla": OPENVLA_7B, "openvla-oft": OFT_7B}

# The alignment's settings per recipe: the paper's (BlindVLA: a frozen 3-layer MLP projector, -cos) and Spatial
# Forcing's (its trainable LayerNorm-Linear-GELU-Linear projector, hidden width = teacher width, 1 - cos, VGGT's input
# and pooling)
RECIPES = {
    "blindvla": {},
    # all but the teacher and the layer, which the bench's scale sets
    "spatial-forcing": {k: v for k, v in SPATIAL_FORCING.items() if k not in ("teacher", "layers")},
}


def align_config(scale: Scale, cpu: bool = True):
    """The ``AlignConfig`` a scale's alignment runs with (``cpu``: the MLP projector's hidden width / 8 too)."""
    from ..config import AlignConfig

    return AlignConfig(
        enabled=True,
        teacher=scale.teacher_name,
        layers=(scale.layer,),
        projector_dim=2048 // 8 if cpu else 2048,
        **RECIPES[scale.recipe],
    )


def projector_params(scale: Scale) -> float:
    """Weights of the projector: the paper's MLP (in -> 2048 -> 2048 -> teacher width) or Spatial Forcing's (in ->
    teacher width -> teacher width)."""
    w_in, w_out = scale.llm.width, scale.teacher.out_width
    if scale.recipe == "spatial-forcing":
        return w_in * w_out + w_out * w_out
    return w_in * 2048 + 2048 * 2048 + 2048 * w_out


def analytic(scale: Scale = OPENVLA_7B, batch: int = 8, lora_params: float = 110e6) -> Dict[str, Dict[str, float]]:
    """Step-time and memory ratios to SFT from FLOPs and bytes (bf16 weights, AdamW on LoRA, no recomputation).

    Time: a LoRA step costs forward + backward through activations (~2x the vision + LLM forward; weight gradients
    only for the adapters); alignment adds the teacher forward (live; a multi-view teacher's over the sample's
    images together) and the projector (both; with its weight gradient when trained). Memory: bf16 weights + LoRA
    AdamW state + activations (per layer 34*s*b*h + 5*a*s^2*b bytes, Korthikanti et al. 2022); alignment adds the
    teacher's bf16 weights and one layer's inference activations (live), the projector (and its AdamW state when
    trained), and (cache) one batch of targets.
    """
    llm_out = 2.0 * scale.llm.tokens * scale.llm.width * scale.vocab + scale.head_flops
    per_sample = scale.vision_flops + scale.llm.forward_flops() + llm_out
    step = 2.0 * batch * per_sample
    w_out = scale.teacher.out_width
    tokens = scale.visual_tokens
    trainable = scale.recipe == "spatial-forcing"
    # forward + input gradient (+ weight gradient when the projector is trained)
    projector = 2.0 * tokens * projector_params(scale) * (3 if trainable else 2)
    teacher = scale.teacher_flops

    def acts(t: Tower, heads: int) -> float:
        return t.depth * (34 * t.tokens * batch * t.width + 5 * heads * t.tokens**2 * batch)

    embeddings = 2 * scale.llm.width * scale.vocab
    weights = 2.0 * (scale.dino.params() + scale.siglip.params() + scale.llm.params() + embeddings)
    towers = scale.images * (acts(scale.dino, 16) + acts(scale.siglip, 16))
    head = 0.0
    if scale.family == "openvla-oft":  # the L1 head (~117M + 34M at 7B), trained in full with AdamW
        head = (OFT_ACTION_DIM + 2) * scale.llm.width**2 * (2 + 4 + 4 + 4)
    base = weights + lora_params * (2 + 4 + 4 + 4) + head + acts(scale.llm, 32) + towers
    teacher_acts = 10 * scale.teacher.tokens * batch * scale.images * scale.teacher.width * 2
    teacher_mem = 2.0 * scale.teacher.params() + teacher_acts
    # frozen: bf16 weights; trained (Spatial Forcing): bf16 weights + AdamW's fp32 state and gradient, as LoRA's
    projector_mem = projector_params(scale) * ((2 + 4 + 4 + 4) if trainable else 2.0)
    targets = 2.0 * batch * tokens * w_out
    return {
        "time": {
            "sft": 1.0,
            "live": (step + batch * (teacher + projector)) / step,
            "cache": (step + batch * projector) / step,
            "reference": (step + batch * (teacher + projector)) / step,
        },
        "memory": {
            "sft": 1.0,
            "live": (base + teacher_mem + projector_mem) / base,
            "cache": (base + projector_mem + targets) / base,
            "reference": (base + teacher_mem + projector_mem) / base,
        },
        "memory_gb": {"sft": base / 1e9},
    }


# --------------------------------------------------------------------------------------------------- the CPU model
def build(scale: Scale = CPU_SCALE, seed: int = 0, device: str = "cpu", with_teacher: bool = True):
    """The scaled VLA (LoRA r=32 on all linear layers, as the paper) and its teacher."""
    from peft import LoraConfig, get_peft_model

    from ..tiny import build_tiny_vla

    vla = build_tiny_vla(
        seed=seed,
        image_size=224,
        patch_size=14,
        dino_dim=scale.dino.width,
        siglip_dim=scale.siglip.width,
        vision_depth=scale.dino.depth,
        vision_heads=2,
        llm_dim=scale.llm.width,
        llm_layers=scale.llm.depth,
        llm_heads=8,
        llm_intermediate=scale.llm.mlp,
        vocab_size=scale.vocab,
        num_images_in_input=scale.images if scale.family == "openvla-oft" else None,
        attn_implementation_llm="sdpa",  # fused attention, as both scripts train (flash-attention 2 / OFT's SDPA)
        max_position_embeddings=max(512, scale.llm.tokens),
    )
    lora = LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="gaussian")
    vla = get_peft_model(vla, lora).to(device)
    if not with_teacher:
        return vla, None
    return vla, build_bench_teacher(scale, seed, device)


def build_bench_teacher(scale: Scale, seed: int = 0, device: str = "cpu"):
    """The scale's teacher with random weights at its shape: C-RADIOv3-L's architecture, or VGGT's aggregator (the
    sample's cameras together) at its input size."""
    from ..teachers.build import build_teacher

    t = scale.teacher
    kwargs = {}
    if isinstance(t, VGGTTower):
        arch = dict(
            embed_dim=t.width,
            depth=t.depth,
            num_heads=t.heads,
            mlp_ratio=t.mlp / t.width,
            patch_embed_depth=t.embed_depth,
            img_size=t.resolution,
        )
        kwargs["resolution"] = t.resolution
    else:
        arch = dict(embed_dim=t.width, depth=t.depth, num_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the bench measures cost, not quality
        # dtype "auto", as the plugin runs it: bfloat16 on CUDA, float32 on the CPU
        return build_teacher(scale.teacher_name, allow_random=True, arch=arch, device=device, seed=seed, **kwargs)


class OFTHeads(torch.nn.Module):
    """OpenVLA-OFT's trained additions at the scale's width, built from the layout of OFT's classes: the L1-regression
    action head (an MLP ResNet with 2 blocks from ``ACTION_DIM * width`` to ``width`` to ``ACTION_DIM``, per action of
    the chunk) and the proprio projector (Linear, GELU, Linear into the LLM's width)."""

    def __init__(self, width: int, proprio_dim: int = OFT_PROPRIO_DIM, action_dim: int = OFT_ACTION_DIM):
        super().__init__()
        nn = torch.nn

        def block():
            return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU())

        self.head_in = nn.Sequential(nn.LayerNorm(action_dim * width), nn.Linear(action_dim * width, width), nn.ReLU())
        self.head_blocks = nn.ModuleList([block(), block()])
        self.head_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, action_dim))
        self.proprio_projector = nn.Sequential(nn.Linear(proprio_dim, width), nn.GELU(), nn.Linear(width, width))

    def predict_action(self, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        """(B, chunk * ACTION_DIM, width) action-token states -> (B, chunk, ACTION_DIM) actions."""
        x = self.head_in(hidden.reshape(hidden.shape[0], chunk, -1))
        for block in self.head_blocks:
            x = x + block(x)
        return self.head_out(x)


def build_heads(scale: Scale, seed: int = 0, device: str = "cpu"):
    """OFT's action head and proprio projector for ``scale`` (None for OpenVLA); the same seed, the same weights."""
    if scale.family != "openvla-oft":
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OFTHeads(scale.llm.width).to(device)


def frames(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def frame_indices(scale: Scale, batch_size: int, n_frames: int = 8):
    """Per batch, the frame index of each camera of each sample: [camera][sample], cycling over ``n_frames``."""
    i = 0
    while True:
        cameras = []
        for _ in range(scale.images):
            cameras.append([(i + k) % n_frames for k in range(batch_size)])
            i += batch_size
        yield cameras


def bench_samples(scale: Scale, batch_size: int, n_frames: int = 8) -> list:
    """Every distinct sample ``batches`` feeds, as tuples of frame indices in camera order (what a multi-view cache
    must hold)."""
    period = n_frames // math.gcd(n_frames, scale.images * batch_size)  # batches until the indices repeat
    out = []
    for _, cameras in zip(range(period), frame_indices(scale, batch_size, n_frames)):
        out += [tuple(cam[k] for cam in cameras) for k in range(batch_size)]
    return list(dict.fromkeys(out))


def batches(scale: Scale, batch_size: int, n_frames: int = 8, seed: int = 0):
    """Cycling batches over ``n_frames`` images: OpenVLA's layout (BOS, prompt, 7 action tokens, </s>), or OFT's
    (``images`` cameras stacked on the channels, BOS, prompt, the chunk's action tokens, </s>, plus the chunk's
    continuous ``actions`` and the ``proprio`` state)."""
    from ..targets.frame_keys import pixel_values_from_frames

    fs = frames(n_frames, seed)
    gen = torch.Generator().manual_seed(seed)
    n_actions = scale.chunk * 7 if scale.family == "openvla-oft" else 7
    for indices in frame_indices(scale, batch_size, n_frames):
        cameras = [pixel_values_from_frames([fs[j] for j in idx]) for idx in indices]
        ids = torch.randint(4, scale.vocab - 256, (batch_size, PROMPT_TEXT + n_actions + 2), generator=gen)
        ids[:, 0] = 1
        actions = torch.randint(scale.vocab - 256, scale.vocab, (batch_size, n_actions), generator=gen)
        ids[:, -1 - n_actions : -1] = actions
        ids[:, -1] = 2
        labels = torch.full_like(ids, -100)
        labels[:, -1 - n_actions :] = ids[:, -1 - n_actions :]
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "pixel_values": torch.cat(cameras, dim=1),
        }
        if scale.family == "openvla-oft":
            batch["actions"] = torch.rand((batch_size, scale.chunk, OFT_ACTION_DIM), generator=gen) * 2 - 1
            batch["proprio"] = torch.rand((batch_size, OFT_PROPRIO_DIM), generator=gen) * 2 - 1
        yield batch


class Runner:
    """One mode's step on the shared model: ``sft``, ``live`` (teacher run on each batch), ``cache`` (targets read from
    a teacher cache, the plugin's way: the Aligner's target source), ``reference`` (all hidden states returned, the
    layer sliced); ``live-vggt`` / ``cache-vggt`` are live / cache at ``with_vggt(scale)`` (pass that scale, the VGGT
    teacher and its cache)."""

    def __init__(self, mode: str, vla, teacher, cache, scale: Scale, device: str, heads=None):
        from ..aligner import Aligner

        self.mode, self.kind = mode, mode.split("-")[0]
        self.vla, self.device, self.scale = vla, device, scale
        if self.kind not in ("sft", "live", "cache", "reference"):
            raise ValueError(f"mode={mode!r}: the bench runs {MODES + VGGT_MODES}.")
        if self.kind == "reference" and scale.recipe != "blindvla":
            raise ValueError("The reference mode is the paper's reference implementation: its recipe only.")
        self.cfg = align_config(scale)
        self.aligner = None
        self.cache = cache
        if self.kind in ("live", "reference"):
            self.aligner = Aligner(self.cfg, teacher)  # reference: its projector and teacher; the hook is not used
        elif self.kind == "cache":
            self.aligner = Aligner(self.cfg, cache)
        if scale.family == "openvla-oft" and heads is None:
            raise ValueError("OpenVLA-OFT's step needs its action head and proprio projector: pass build_heads(scale)")
        self.heads = heads
        trained = list(vla.parameters()) + (list(heads.parameters()) if heads is not None else [])
        if self.aligner is not None:
            self.aligner.attach(vla)  # builds and places the projector (trained with the LoRA weights in SF's recipe)
            self.aligner.remove()
            trained += self.aligner.trainable_parameters()
        self.params = [p for p in trained if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=5e-4)

    def __enter__(self):
        if self.kind in ("live", "cache"):
            aligner_log = logging.getLogger("openvla_align.aligner")
            level = aligner_log.level
            aligner_log.setLevel(logging.WARNING)  # the bench attaches every step: its placement note was said once
            try:
                self.aligner.attach(self.vla)
            finally:
                aligner_log.setLevel(level)
        return self

    def __exit__(self, *exc):
        if self.kind in ("live", "cache"):
            self.aligner.remove()

    def loss(self, batch) -> torch.Tensor:
        from ..vla.pixels import rgb_from_pixel_values, split_images

        dev, scale = self.device, self.scale
        model_batch = {k: v.to(dev) for k, v in batch.items()}
        actions, proprio = model_batch.pop("actions", None), model_batch.pop("proprio", None)
        kwargs = {}
        if scale.family == "openvla-oft":  # OFT's step always asks for every layer's hidden states (its L1 head)
            kwargs = dict(output_hidden_states=True, proprio=proprio, proprio_projector=self.heads.proprio_projector)
        elif self.kind == "reference":
            kwargs = dict(output_hidden_states=True)
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else _Null()
        with autocast:
            out = self.vla(**model_batch, **kwargs)
            action_loss = out.loss if actions is None else self._l1_loss(out, actions)
            if self.kind == "reference":
                hidden = out.hidden_states[scale.layer][:, 1 : 1 + scale.visual_tokens]
                with torch.no_grad():
                    targets = self.aligner.teacher(rgb_from_pixel_values(split_images(model_batch["pixel_values"])))
                targets = targets.reshape(hidden.shape[0], -1, targets.shape[-1])
                proj = self.aligner.projectors[str(scale.layer)]
                student = proj(hidden.float())
                cos = torch.nn.functional.cosine_similarity(student, targets.float(), dim=-1)
                return action_loss + self.cfg.coeff * (-cos.mean())
            if self.kind == "live":
                return action_loss + self.aligner(pixel_values=model_batch["pixel_values"]).loss
            if self.kind == "cache":  # the loader's CPU batch, as the plugin gets it: keys hashed there
                return action_loss + self.aligner(pixel_values=batch["pixel_values"]).loss
            return action_loss

    def _l1_loss(self, out, actions: torch.Tensor) -> torch.Tensor:
        """OFT's L1 regression: the last layer's states just before each of the chunk's action tokens (after the
        visual and proprio tokens and the prompt) through the action head, against the continuous actions."""
        start = self.scale.visual_tokens + 1 + PROMPT_TEXT
        hidden = out.hidden_states[-1][:, start : start + self.scale.chunk * OFT_ACTION_DIM]
        predicted = self.heads.predict_action(hidden, self.scale.chunk)
        return torch.nn.functional.l1_loss(predicted.float(), actions.float())

    def step(self, batch) -> None:
        self.loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_bench_cache(
    teacher,
    directory: Path,
    n_frames: int = 8,
    seed: int = 0,
    device: str = "cpu",
    scale: Optional[Scale] = None,
    batch_size: int = 2,
) -> Dict[str, object]:
    """The cache the cached modes read: every frame ``batches`` feeds, or for a multi-view teacher every sample (its
    cameras together; ``scale`` and ``batch_size`` say which), built with the scale's teacher input and pooling."""
    from ..cache.build import build_cache

    fs = frames(n_frames, seed)
    settings = {}
    if scale is not None:
        cfg = align_config(scale)
        settings = dict(teacher_input=cfg.teacher_input, pooling=cfg.pooling, pooling_pos_embed=cfg.pooling_pos_embed)
    if getattr(teacher, "multi_view", False):
        if scale is None:
            raise ValueError("A multi-view teacher's bench cache holds samples: pass the scale (and batch size).")
        items = [tuple(fs[i] for i in sample) for sample in bench_samples(scale, batch_size, n_frames)]
    else:
        items = fs
    return build_cache(
        directory,
        teacher,
        iter(items),
        source={"kind": "bench"},
        teacher_name=scale.teacher_name if scale is not None else "bench-radio",
        device=device,
        progress=False,
        batch_size=8,
        **settings,
    )


def bench_sources(modes, scale: Scale, teacher, tmp: Path, batch_size: int, device: str):
    """Per teacher the modes use (C-RADIO; VGGT for the VGGT modes): the teacher, its cache and the build's figures."""
    from ..targets.cache import TeacherCache

    sources = {}
    for mode in modes:
        at = mode_scale(scale, mode)
        if at.teacher_name in sources:
            continue
        t = teacher if at.teacher_name == scale.teacher_name else build_bench_teacher(at, device=device)
        where = Path(tmp) / at.teacher_name
        info = build_bench_cache(t, where, device=device, scale=at, batch_size=batch_size)
        sources[at.teacher_name] = (t, TeacherCache(where), info)
    return sources
