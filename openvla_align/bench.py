"""`openvla-align bench`: what alignment costs per training step, measured against plain LoRA SFT.

Four ways to run a step, on one model, interleaved round by round so that drift (thermal, other load) hits them all:

  sft        the action loss only (what the stock finetune.py computes)
  live       + alignment with the teacher run on every batch (openvla-align's hook, one layer)
  cache      + alignment with targets read from a teacher feature cache (no teacher at all)
  reference  the reference implementation's approach: ``output_hidden_states=True`` (every layer returned), the
             layer sliced from that tuple, plus the live teacher

The model is OpenVLA-7B + C-RADIOv3-L scaled down so that it runs on a CPU: widths / 8 and depths / 4 for every
component, the same 256 visual tokens per image and the same prompt length, so the vision : LLM : teacher FLOP
proportions stay close to the full-size ones (both are printed). Step time is the median over all timed steps;
peak memory is measured per mode in a fresh process (CUDA: ``max_memory_allocated``; CPU: peak resident memory
above the process's footprint before the model is built). An analytic estimate gives the same ratios at 7B scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

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

    from .teachers.radio import build_radio_teacher
    from .testing import build_tiny_vla

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
        torch.manual_seed(seed)
        teacher = build_radio_teacher("c-radio-v3-l", allow_random=True, arch=arch).to(device)
    if device.startswith("cuda"):
        teacher = teacher.to(torch.bfloat16)  # as the plugin runs it (AlignConfig.teacher_dtype)
    return vla, teacher


def frames(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def batches(scale: Scale, batch_size: int, n_frames: int = 8, seed: int = 0):
    """Cycling OpenVLA-layout batches (BOS, prompt, 7 action tokens, </s>) over ``n_frames`` images."""
    from .cache.keys import pixel_values_from_frames

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
        from .aligner import Aligner
        from .config import AlignConfig

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
                    from .vla.pixels import rgb_from_pixel_values

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
    from .cache.build import build_cache

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


# --------------------------------------------------------------------------------------------------- measurements
def time_modes(
    modes=MODES,
    rounds: int = 3,
    steps: int = 4,
    warmup: int = 1,
    batch_size: int = 2,
    device: str = "cpu",
    scale: Scale = CPU_SCALE,
) -> Dict[str, object]:
    """Median step time per mode, modes interleaved in a rotating order each round."""
    from .cache.store import TeacherCache

    torch.manual_seed(0)
    vla, teacher = build(scale, device=device)
    vla.train()
    with tempfile.TemporaryDirectory() as tmp:
        build_info = build_bench_cache(teacher, Path(tmp) / "cache", device=device)
        cache = TeacherCache(Path(tmp) / "cache")
        runners = {m: Runner(m, vla, teacher, cache, scale, device) for m in modes}
        data = batches(scale, batch_size)
        times: Dict[str, List[float]] = {m: [] for m in modes}
        for r in range(rounds):
            order = list(modes[r % len(modes) :]) + list(modes[: r % len(modes)])
            for mode in order:
                with runners[mode] as runner:
                    for s in range(warmup + steps):
                        batch = next(data)
                        t0 = time.perf_counter()
                        runner.step(batch)
                        if s >= warmup:
                            times[mode].append(time.perf_counter() - t0)
    medians = {m: statistics.median(v) for m, v in times.items()}
    return {
        "median_s": medians,
        "ratio": {m: medians[m] / medians["sft"] for m in modes},
        "steps": {m: len(v) for m, v in times.items()},
        "cache_build": build_info,
    }


def _heap_reader():
    """Bytes the process's C heap has handed out and not freed (glibc ``mallinfo2``: in-use chunks + mmapped
    blocks), which is where torch's CPU allocator gets its memory. Unlike RSS it drops when tensors are freed, so its
    peak is the CPU analogue of ``torch.cuda.max_memory_allocated``. Falls back to RSS without glibc >= 2.33."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
        fn.restype = MallInfo2

        def heap() -> int:
            info = fn()
            return int(info.uordblks + info.hblkhd)

        heap()
        return heap, "heap in use (mallinfo2)"
    except (OSError, AttributeError):

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        return rss, "resident set size"


def peak_memory(
    mode: str,
    cache_dir: Optional[str] = None,
    steps: int = 3,
    batch_size: int = 2,
    device: str = "cpu",
    scale: str = "cpu",
) -> int:
    """Peak bytes for ``mode`` in this process: CUDA allocator peak, or peak RSS above the pre-model baseline.
    Only the live and reference modes build a teacher; the cache mode reads ``cache_dir`` (built elsewhere)."""
    from .cache.store import TeacherCache

    measure, _ = _heap_reader()
    baseline = measure()
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], measure())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    if not device.startswith("cuda"):
        sampler.start()
    scale = SCALES[scale]
    torch.manual_seed(0)
    vla, teacher = build(scale, device=device, with_teacher=mode in ("live", "reference"))
    vla.train()
    cache = TeacherCache(cache_dir) if mode == "cache" else None
    runner = Runner(mode, vla, teacher, cache, scale, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    data = batches(scale, batch_size)
    with runner:
        for _ in range(steps):
            runner.step(next(data))
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    stop.set()
    sampler.join()
    return peak[0] - baseline


def memory_modes(modes=MODES, device: str = "cpu", batch_size: int = 2, scale: str = "cpu") -> Dict[str, object]:
    """Each mode in a fresh interpreter (a process's peak cannot be reset)."""
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, teacher = build(SCALES[scale], device=device)
        build_bench_cache(teacher, Path(tmp) / "cache", device=device)
        del teacher
        for mode in modes:
            code = (
                "import json, sys; from openvla_align.bench import peak_memory; "
                f"print(json.dumps(peak_memory({mode!r}, {str(Path(tmp) / 'cache')!r}, device={device!r}, "
                f"batch_size={batch_size}, scale={scale!r})))"
            )
            proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"memory run for {mode} failed:\n{proc.stderr[-3000:]}")
            peaks[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    what = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else _heap_reader()[1] + ", sampled"
    return {"peak_bytes": peaks, "ratio": {m: peaks[m] / peaks["sft"] for m in modes}, "measure": what}


# --------------------------------------------------------------------------------------------------- report
def run(
    rounds: int = 3,
    steps: int = 4,
    batch_size: int = 2,
    device: str = "cpu",
    out: Optional[str] = None,
    memory: bool = True,
    scale: str = "cpu",
) -> Dict[str, object]:
    small = SCALES[scale]
    result = {
        "machine": {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": {"rounds": rounds, "steps": steps, "batch_size": batch_size, "scale": scale},
        "scales": {
            "cpu": {"name": small.name, "proportions": small.proportions(), **_dims(small)},
            "7b": {"name": OPENVLA_7B.name, "proportions": OPENVLA_7B.proportions(), **_dims(OPENVLA_7B)},
        },
        "time": time_modes(rounds=rounds, steps=steps, batch_size=batch_size, device=device, scale=small),
        "memory": memory_modes(device=device, batch_size=batch_size, scale=scale) if memory else None,
        "analytic_7b": analytic(),
    }
    if out:
        from ._io import atomic_write_bytes

        atomic_write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    return result


def _dims(scale: Scale) -> dict:
    return {k: asdict(getattr(scale, k)) for k in ("dino", "siglip", "llm", "teacher")}


def format_report(result: Dict[str, object]) -> str:
    cpu, big = result["scales"]["cpu"]["proportions"], result["scales"]["7b"]["proportions"]
    lines = [
        "FLOP proportions (vision : LLM : teacher, forward per sample)",
        f"  7B scale  {big['vision']:.3f} : 1 : {big['teacher']:.3f}",
        f"  measured  {cpu['vision']:.3f} : 1 : {cpu['teacher']:.3f}  ({result['scales']['cpu']['name']})",
        "",
        f"{'mode':<10} {'step (ms)':>10} {'x SFT':>7} {'peak mem (MB)':>14} {'x SFT':>7} {'7B time x':>10} "
        f"{'7B mem x':>9}",
    ]
    t, m, a = result["time"], result["memory"], result["analytic_7b"]
    for mode in MODES:
        mem = f"{m['peak_bytes'][mode] / 2**20:>14.1f} {m['ratio'][mode]:>7.3f}" if m else f"{'-':>14} {'-':>7}"
        lines.append(
            f"{mode:<10} {t['median_s'][mode] * 1e3:>10.1f} {t['ratio'][mode]:>7.3f} {mem} "
            f"{a['time'][mode]:>10.3f} {a['memory'][mode]:>9.3f}"
        )
    cb = t["cache_build"]
    lines += [
        "",
        f"cache builder: {cb['teacher_frames_per_s']} frames/s of teacher inference ({cb['frames_per_s']} overall)",
        f"timed steps per mode: {t['steps']['sft']} (median); 7B columns: analytic, batch 8, bf16, LoRA r=32",
        f"peak memory: {m['measure']} above the footprint before the model was built" if m else "",
    ]
    return "\n".join(lines)


def policy_throughput(scale: Scale = CPU_SCALE, batch: int = 64, rounds: int = 3, device: str = "cpu") -> Dict:
    """Evaluation-policy throughput (actions/s): `eval run`'s KV-cached decoding vs re-running the whole multimodal
    forward per action token (the path before), on the same model, frames and prompts of several lengths, rounds
    interleaved; the median round of each counts."""
    import numpy as np

    from .eval.run import BatchedPolicy
    from .testing import build_tokenizer
    from .vla.checkpoint import LoadedVLA
    from .vla.layout import unwrap

    vla, _ = build(scale, device=device, with_teacher=False)
    stats = {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}
    unwrap(vla).config.norm_stats = {"bench": {"action": stats}}
    policy = BatchedPolicy(LoadedVLA(vla.eval(), build_tokenizer(), 224, "bench"), "bench")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    texts = ["put the carrot on the plate", "put the red cup on the left plate", "put it on the board that is blue"]
    instructions = [texts[i % len(texts)] for i in range(batch)]
    times: Dict[str, List[float]] = {"kv_cache": [], "full_forward": []}
    for kv in (True, False):  # warm-up
        policy.action_tokens(images[:2], instructions[:2], kv_cache=kv)
    for r in range(rounds):
        for kv in (True, False) if r % 2 == 0 else (False, True):
            start = time.perf_counter()
            policy.action_tokens(images, instructions, kv_cache=kv)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times["kv_cache" if kv else "full_forward"].append(time.perf_counter() - start)
    per_s = {mode: batch / statistics.median(ts) for mode, ts in times.items()}
    return {
        "scale": scale.name,
        "batch": batch,
        "rounds": rounds,
        "actions_per_s": {k: round(v, 2) for k, v in per_s.items()},
        "speedup": round(per_s["kv_cache"] / per_s["full_forward"], 2),
    }


def format_policy(result: Dict) -> str:
    a = result["actions_per_s"]
    return (
        f"eval policy at batch {result['batch']} ({result['scale']}): KV cache {a['kv_cache']:.1f} actions/s, "
        f"full re-forward per token {a['full_forward']:.1f} actions/s: {result['speedup']:.2f}x"
    )


def _cmd_bench(args) -> int:
    if args.policy:
        result = policy_throughput(SCALES[args.scale], args.policy_batch, args.rounds, args.device)
        print(format_policy(result))
        if args.out:
            from ._io import atomic_write_bytes

            atomic_write_bytes(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())
            print(f"wrote {args.out}")
        return 0
    result = run(
        args.rounds, args.steps, args.batch_size, args.device, args.out, memory=not args.no_memory, scale=args.scale
    )
    print(format_report(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every mode once)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode per round (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=2, help="samples per training step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", default="bench.json", help="JSON with every figure, for later comparison")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode memory processes")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="model size (smoke: seconds, for tests)")
    p.add_argument(
        "--policy",
        action="store_true",
        help="instead: the evaluation policy's throughput, KV-cached decoding vs a full forward per action token",
    )
    p.add_argument("--policy-batch", type=int, default=64, help="frames per policy call (the reference infers 64)")
    p.set_defaults(func=_cmd_bench)
    return p
