"""The bench's model: OpenVLA-7B's shapes (analytic) and a CPU-sized model with the same structure, its batches,
and one training step per mode (plain SFT, live teacher, cached targets, the reference's all-hidden-states path)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch

MODES = ("sft", "live", "cache", "reference")
PROMPT_TOKENS = 34  # "In: What action should the robot take to <instruction>?\nOut:" + 7 action tokens + </s>
VISUAL_TOKENS = 256


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


@dataclass(frozen=True)
class Scale:
    name: str
    dino: Tower
    siglip: Tower
    llm: Tower
    teacher: Tower
    vocab: int
    layer: int  # aligned LLM layer

    @property
    def vision_flops(self) -> float:
        return self.dino.forward_flops() + self.siglip.forward_flops()

    def proportions(self) -> Dict[str, float]:
        llm = self.llm.forward_flops() + 2.0 * self.llm.tokens * self.llm.width * self.vocab
        return {"vision": self.vision_flops / llm, "llm": 1.0, "teacher": self.teacher.forward_flops() / llm}


SEQ = 1 + VISUAL_TOKENS + PROMPT_TOKENS
OPENVLA_7B = Scale(
    "OpenVLA-7B + C-RADIOv3-L",
    dino=Tower(1024, 24, 4096, 261),  # ViT-L/14 with 4 registers + cls at 224 px
    siglip=Tower(1152, 27, 4304, 256),  # SigLIP so400m/14 at 224 px
    llm=Tower(4096, 32, 11008, SEQ, gated=True),  # Llama-2-7B
    teacher=Tower(1024, 24, 4096, 256 + 8),  # C-RADIOv3-L at 256 px, 8 prefix tokens
    vocab=32064,
    layer=16,
)
CPU_SCALE = Scale(
    "CPU scale (widths / 8, depths / 4)",
    dino=Tower(128, 6, 512, 257),
    siglip=Tower(144, 6, 576, 256),
    llm=Tower(512, 8, 1376, SEQ, gated=True),
    teacher=Tower(128, 6, 512, 256 + 8),
    vocab=768,
    layer=4,
)
SMOKE_SCALE = Scale(  # for tests of the bench itself: same code paths, seconds not minutes
    "smoke scale",
    dino=Tower(32, 2, 128, 257),
    siglip=Tower(48, 2, 192, 256),
    llm=Tower(64, 4, 128, SEQ, gated=True),
    teacher=Tower(32, 2, 128, 256 + 8),
    vocab=768,
    layer=2,
)
SCALES = {"cpu": CPU_SCALE, "smoke": SMOKE_SCALE}


def analytic(scale: Scale = OPENVLA_7B, batch: int = 8, lora_params: float = 110e6) -> Dict[str, Dict[str, float]]:
    """Step-time and memory ratios to SFT from FLOPs and bytes (bf16 weights, AdamW on LoRA, no recomputation).

    Time: a LoRA step costs forward + backward through activations (~2x the vision + LLM forward; weight gradients
    only for the adapters); alignment adds the teacher forward (live) and the projector (both). Memory: bf16
    weights + LoRA AdamW state + activations (per layer 34*s*b*h + 5*a*s^2*b bytes, Korthikanti et al. 2022);
    alignment adds the teacher's bf16 weights and one layer's inference activations (live), the projector, and
    (cache) one batch of targets.
    """
    per_sample = scale.vision_flops + scale.llm.forward_flops() + 2.0 * scale.llm.tokens * scale.llm.width * 32064
    step = 2.0 * batch * per_sample
    w_in, w_out = scale.llm.width, scale.teacher.width
    projector = 2.0 * VISUAL_TOKENS * (w_in * 2048 + 2048 * 2048 + 2048 * w_out) * 2  # forward + input gradient
    teacher = scale.teacher.forward_flops()

    def acts(t: Tower, heads: int) -> float:
        return t.depth * (34 * t.tokens * batch * t.width + 5 * heads * t.tokens**2 * batch)

    weights = 2.0 * (scale.dino.params() + scale.siglip.params() + scale.llm.params() + 2 * scale.llm.width * 32064)
    base = weights + lora_params * (2 + 4 + 4 + 4) + acts(scale.llm, 32) + acts(scale.dino, 16) + acts(scale.siglip, 16)
    teacher_mem = 2.0 * scale.teacher.params() + 10 * scale.teacher.tokens * batch * scale.teacher.width * 2
    projector_mem = 2.0 * (w_in * 2048 + 2048 * 2048 + 2048 * w_out)
    targets = 2.0 * batch * VISUAL_TOKENS * w_out
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
    """The scaled VLA (LoRA r=32 on all linear layers, as the paper), its teacher, and a batch generator."""
    from peft import LoraConfig, get_peft_model

    from ..teachers.build import build_teacher
    from ..testing import build_tiny_vla

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
    )
    lora = LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="gaussian")
    vla = get_peft_model(vla, lora).to(device)
    if not with_teacher:
        return vla, None
    arch = dict(embed_dim=scale.teacher.width, depth=scale.teacher.depth, num_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the bench measures cost, not quality
        # dtype "auto", as the plugin runs it: bfloat16 on CUDA, float32 on the CPU
        teacher = build_teacher("c-radio-v3-l", allow_random=True, arch=arch, device=device, seed=seed)
    return vla, teacher


def frames(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def batches(scale: Scale, batch_size: int, n_frames: int = 8, seed: int = 0):
    """Cycling OpenVLA-layout batches (BOS, prompt, 7 action tokens, </s>) over ``n_frames`` images."""
    from ..cache.keys import pixel_values_from_frames

    fs = frames(n_frames, seed)
    gen = torch.Generator().manual_seed(seed)
    i = 0
    while True:
        idx = [(i + k) % n_frames for k in range(batch_size)]
        i += batch_size
        ids = torch.randint(4, scale.vocab - 256, (batch_size, PROMPT_TOKENS + 1), generator=gen)
        ids[:, 0] = 1
        ids[:, -8:-1] = torch.randint(scale.vocab - 256, scale.vocab, (batch_size, 7), generator=gen)
        ids[:, -1] = 2
        labels = torch.full_like(ids, -100)
        labels[:, -8:] = ids[:, -8:]
        yield {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "pixel_values": pixel_values_from_frames([fs[j] for j in idx]),
        }


class Runner:
    """One mode's step on the shared model."""

    def __init__(self, mode: str, vla, teacher, cache, scale: Scale, device: str):
        from ..aligner import Aligner
        from ..config import AlignConfig

        self.mode, self.vla, self.device, self.scale = mode, vla, device, scale
        self.cfg = AlignConfig(enabled=True, layers=(scale.layer,), projector_dim=2048 // 8)
        self.aligner = None
        self.cache = cache
        if mode in ("live", "cache"):
            kwargs = {"target_width": scale.teacher.width} if mode == "cache" else {}
            self.aligner = Aligner(self.cfg, teacher if mode == "live" else None, **kwargs)
        elif mode == "reference":
            self.aligner = Aligner(self.cfg, teacher)  # its projector and teacher; the hook is not used
        self.params = [p for p in vla.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=5e-4)

    def __enter__(self):
        if self.mode in ("live", "cache"):
            self.aligner.attach(self.vla)
        elif self.mode == "reference":
            self.aligner.attach(self.vla)
            self.aligner.remove()  # projector built and placed, no hook
        return self

    def __exit__(self, *exc):
        if self.mode in ("live", "cache"):
            self.aligner.remove()

    def loss(self, batch) -> torch.Tensor:
        dev = self.device
        model_batch = {k: v.to(dev) for k, v in batch.items()}
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else _Null()
        with autocast:
            if self.mode == "reference":
                out = self.vla(**model_batch, output_hidden_states=True)
                hidden = out.hidden_states[self.scale.layer][:, 1 : 1 + VISUAL_TOKENS]
                with torch.no_grad():
                    from ..vla.pixels import rgb_from_pixel_values

                    targets = self.aligner.teacher(rgb_from_pixel_values(model_batch["pixel_values"]))
                proj = self.aligner.projectors[str(self.scale.layer)]
                student = proj(hidden.float())
                cos = torch.nn.functional.cosine_similarity(student, targets.float(), dim=-1)
                return out.loss + self.cfg.coeff * (-cos.mean())
            out = self.vla(**model_batch)
            if self.mode == "live":
                return out.loss + self.aligner(pixel_values=model_batch["pixel_values"]).loss
            if self.mode == "cache":
                return out.loss + self.aligner(targets=self.cache.targets(batch["pixel_values"])).loss
            return out.loss

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
    teacher, directory: Path, n_frames: int = 8, seed: int = 0, device: str = "cpu"
) -> Dict[str, object]:
    from ..cache.build import build_cache

    return build_cache(
        directory,
        teacher,
        iter(frames(n_frames, seed)),
        source={"kind": "bench"},
        teacher_name="bench-radio",
        device=device,
        progress=False,
        batch_size=8,
    )
