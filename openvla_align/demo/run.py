"""`openvla-align demo`: the paper's effect in miniature, every stage real and small, on the CPU.

1. teacher: a small patch encoder (the registered ``demo-scenes`` teacher) learns the scenes' hues, shades and
   places from "web" scenes, is saved, and is loaded back through the teacher registry;
2. base VLA: the tiny OpenVLA-layout model's vision towers learn the same scenes densely, then its projector and LLM
   learn a vision-language task (questions about hue, shade, place) with the vision towers frozen, as Prismatic
   trains the VLM OpenVLA starts from;
3. robot task: LoRA SFT, and LoRA SFT + alignment of the middle LLM layer's visual tokens to the teacher at the
   paper's weight (0.2) and at a stronger pull (1.0), same data, steps and seeds, on narrow robot data (9 of the 12
   objects, 3 table colours);
4. evaluation: the aligned layer's cosine to the teacher, linear probes of it (12 classes, 9 places), the VL
   questions, sorting accuracy in distribution and on unseen objects / unseen scenes, attention maps; table,
   verdict, PNG and metrics.json, all from this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from .._io import atomic_write_bytes
from ..argtypes import output_dir, positive_float, positive_int

BANNER = (
    "openvla-align demo: tiny OpenVLA-layout models and generated scenes on the CPU. A miniature of the paper's "
    "setup, not its models: the figures say what happens at this scale only."
)


@dataclass
class DemoConfig:
    out_dir: str = "openvla_align_demo"
    seed: int = 0  # data, teacher and base VLA
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)  # robot fine-tuning runs (LoRA init, projector init, batch order)
    n_vl: int = 1500
    n_train: int = 1500
    n_eval: int = 128
    n_probe: Tuple[int, int] = (240, 120)  # probe train / test scenes
    teacher_steps: int = 200
    vision_steps: int = 150
    vl_steps: int = 400
    vl_lr: float = 1e-3
    steps: int = 100
    lr: float = 3e-3
    batch_size: int = 16  # VL stage
    robot_batch_size: int = 6
    lora_rank: int = 8
    lora_vision: bool = False  # LoRA on projector + LLM; True adds the vision towers (OpenVLA's all-linear)
    llm_layers: int = 8
    layer: int = 4  # the middle of the 8-block LLM, as layer 16 is of Llama-2-7B's 32
    coeff: float = 0.2  # the paper's weight
    strong_coeff: float = 1.0  # the stronger pull of the third arm
    image_size: int = 112  # an 8x8 grid of 14 px patches
    attention_examples: int = 4
    model: Dict[str, int] = field(default_factory=lambda: {"vision_depth": 3})
    threads: int = 1  # torch threads of each fine-tuning run (its figures depend on it, slightly)
    workers: int = 0  # fine-tuning runs at once (Python threads); 0: the CPU count // threads
    # torch threads of the stages before the robot task: fixed, not the CPU count, because a reduction split over
    # another number of threads sums in another order (1 thread instead of 2 changed the quick setting's figures)
    stage_threads: int = 2


# The smallest setting that runs every stage (`openvla-align demo --quick`, ~30 s): it checks an install and, through
# tests/test_demo_lock.py, that the figures are exactly the committed ones; its figures say nothing about alignment.
QUICK = dict(
    seeds=(0, 1),
    n_vl=400,
    n_train=64,
    n_eval=16,
    n_probe=(144, 72),
    teacher_steps=150,
    vision_steps=150,
    vl_steps=4,
    steps=3,
    batch_size=8,
    attention_examples=2,
)


class Stopwatch:
    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def add(self, name: str, since: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - since


def run_demo(cfg: DemoConfig) -> Dict:
    """The stages before the robot task run on ``stage_threads`` torch threads, then ``workers`` fine-tuning runs at
    once on ``threads`` each (the previous thread count is restored afterwards)."""
    before = torch.get_num_threads()
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run(cfg: DemoConfig) -> Dict:
    workers = cfg.workers or max(1, _cpus() // cfg.threads)
    torch.set_num_threads(cfg.stage_threads)
    from .. import numerics
    from ..aligner import Aligner
    from ..config import AlignConfig
    from ..probe import linear as probe_linear
    from ..teachers import build_teacher, teacher_spec
    from ..teachers.scenes import SceneTeacher, save_scene_teacher
    from ..tiny import build_tiny_vla, build_tokenizer, save_tiny_checkpoint
    from ..vla.actions import ActionTokenizer
    from . import plot, report
    from . import stages as S
    from .code import code_identity
    from .scenes import N_CLASSES, make_split
    from .teacher import train_scene_teacher

    t_start = time.time()
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory for the demo's outputs.")
    if cfg.layer < 1 or cfg.layer > cfg.llm_layers:
        raise ValueError(f"layer={cfg.layer} is outside the demo LLM's 1..{cfg.llm_layers} blocks.")
    print(BANNER, flush=True)
    world = numerics.world()
    print(f"numerics: {numerics.describe(world)}; {cfg.stage_threads} torch threads before the robot task", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch()
    grid = (cfg.image_size // 14,) * 2

    # --- data ---
    t = time.time()
    vl, train = make_split("vl", cfg.n_vl, cfg.seed), make_split("train", cfg.n_train, cfg.seed)
    evals = {k: make_split(k, cfg.n_eval, cfg.seed + 1) for k in ("id", "ood_objects", "ood_scenes")}
    probe_tr, probe_te = (
        make_split("probe", cfg.n_probe[0], cfg.seed),
        make_split("probe", cfg.n_probe[1], cfg.seed + 1),
    )
    y_tr, y_te = torch.tensor([s.label for s in probe_tr]), torch.tensor([s.label for s in probe_te])
    vl_test = make_split("vl", cfg.n_eval, cfg.seed + 1)  # held-out VL questions, one fixed kind per scene
    vl_kinds = list(np.random.default_rng([cfg.seed, 1]).choice(S.VL_KINDS, cfg.n_eval))
    tok = build_tokenizer(corpus=S.corpus())
    batcher = S.Batcher(tok, ActionTokenizer(len(tok)))
    clock.add("data", t)
    print(
        f"data: {cfg.n_vl} VL scenes (every object and table), {cfg.n_train} robot scenes (9 of 12 objects, 3 of 5 "
        f"tables), {cfg.n_eval} per evaluation split, probe {cfg.n_probe[0]}/{cfg.n_probe[1]}",
        flush=True,
    )

    place_tr, place_te = (torch.tensor([int(s.cells[0]) for s in split]) for split in (probe_tr, probe_te))

    def probe(train, test) -> Dict[str, float]:
        """Top-1 of linear probes: the object (12 classes) from its tokens ("probe") and from all tokens
        ("probe_mean"), and the object's place (9 cells, which the robot task never needs) from its tokens."""

        def fit(x_tr, labels_tr, x_te, labels_te):
            return probe_linear.linear_probe(
                x_tr, labels_tr, x_te, labels_te, 300, 0, lr=0.05, weight_decay=1e-3, batch_size=0
            )

        return {
            "probe": fit(train["object"], y_tr, test["object"], y_te),
            "probe_place": fit(train["object"], place_tr, test["object"], place_te),
            "probe_mean": fit(train["mean"], y_tr, test["mean"], y_te),
        }

    # --- 1. teacher ---
    t = time.time()
    torch.manual_seed(cfg.seed)
    trained = SceneTeacher(teacher_spec("demo-scenes"), grid=grid)
    train_scene_teacher(trained, vl, N_CLASSES, cfg.teacher_steps, cfg.seed)
    weights = out / "teacher" / "model.safetensors"
    save_scene_teacher(trained, weights)  # records its resolution: later commands need only the path
    teacher = build_teacher("demo-scenes", path=str(weights), grid=grid)  # through the registry, as a run would
    clock.add("teacher", t)
    teacher_probe = probe(S.teacher_features(teacher, probe_tr), S.teacher_features(teacher, probe_te))
    print(
        f"teacher: probe top-1 {teacher_probe['probe']:.3f} (object tokens), {teacher_probe['probe_mean']:.3f} "
        f"(all tokens); chance 0.083; weights {weights}",
        flush=True,
    )

    # --- 2. base VLA ---
    t = time.time()
    arch = dict(vocab_size=len(tok), image_size=cfg.image_size, llm_layers=cfg.llm_layers, **cfg.model)
    vla = build_tiny_vla(seed=cfg.seed, **arch)
    S.pretrain_vision(vla, vl, N_CLASSES, cfg.vision_steps, 3e-3, cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    def vl_batch(_step):
        idx = rng.choice(len(vl), cfg.batch_size, replace=False)
        return batcher.vl([vl[i] for i in idx], rng.choice(S.VL_KINDS, cfg.batch_size))

    # Prismatic keeps the vision backbone frozen while its projector and LLM learn; here too (training the towers
    # with a random LLM erased what they had learnt: VL answers 0.12 against 0.46, measured for issue 31)
    vla.vision_backbone.requires_grad_(False)
    S.train_loop(vla, vl_batch, cfg.vl_steps, cfg.vl_lr, "VL task")
    vla.vision_backbone.requires_grad_(True)
    save_tiny_checkpoint(out / "base", vla, tok)
    clock.add("base", t)

    rng_lock = threading.Lock()  # torch's global RNG: LoRA init and the probe's init draw from it
    coeffs = {"align": cfg.coeff, "strong": cfg.strong_coeff}

    def align_config(coeff: float, seed: int) -> AlignConfig:
        return AlignConfig(
            enabled=True,
            teacher="demo-scenes",
            teacher_path=str(weights),
            layers=(cfg.layer,),
            coeff=coeff,
            projector_dim=4 * teacher.width,
            projector_seed=seed,
        )

    def evaluate(model, seeds) -> Dict[str, float]:
        """Every metric of ``model``; "cosine": the aligned layer's tokens on the held-out probe scenes through each
        of ``seeds``' frozen projectors against the teacher (averaged): the alignment loss's own quantity, read by
        aligners attached for the probe's pass (the aligned arms trained on it; the others are measured by it)."""
        train_feats = S.pooled_features(model, batcher, probe_tr, cfg.layer)
        with rng_lock:
            aligners = [Aligner(align_config(1.0, seed), teacher).attach(model) for seed in seeds]
        cosines = []

        def read(pixel_values):
            n = pixel_values.shape[0]
            cosines.append(
                [a(pixel_values=pixel_values).metrics[f"align/cos_layer{cfg.layer}"].item() * n for a in aligners]
            )

        try:
            with torch.no_grad():
                test_feats = S.pooled_features(model, batcher, probe_te, cfg.layer, after_forward=read)
        finally:
            for aligner in aligners:
                aligner.remove()
        res = {"cosine": float(np.sum(cosines) / (len(probe_te) * len(seeds)))}
        feats = (train_feats, test_feats)
        with rng_lock:
            res.update(probe(*feats))
        res["vl"] = S.vl_accuracy(model, batcher, vl_test, vl_kinds)
        res.update({k: S.sort_accuracy(model, batcher, scenes) for k, scenes in evals.items()})
        return res

    t = time.time()
    base = evaluate(vla, cfg.seeds)  # the base VLA: its cosine averaged over every seed's projector
    clock.add("evaluation", t)
    print("base VLA: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()), flush=True)
    base_state = copy.deepcopy(vla.state_dict())

    # --- 3. robot task: SFT vs SFT+Align, same seeds; runs in parallel threads, each on cfg.threads torch threads ---
    def fine_tune(run: str, seed: int):
        t0 = time.time()
        with rng_lock:
            model = build_tiny_vla(seed=cfg.seed, **arch)
            model.load_state_dict(base_state)
            model = S.lora(model, cfg.lora_rank, seed, vision=cfg.lora_vision)
            aligner = None
            if run in coeffs:
                aligner = Aligner(align_config(coeffs[run], seed), teacher).attach(model)
        order = np.random.default_rng(seed)

        def robot_batch(_step):
            return batcher.action([train[i] for i in order.choice(len(train), cfg.robot_batch_size, replace=False)])

        hist = S.train_loop(model, robot_batch, cfg.steps, cfg.lr, None, aligner=aligner)
        run_dir = out / run / f"seed{seed}"
        model.save_pretrained(run_dir / "adapter")
        if aligner is not None:
            aligner.save(run_dir / "adapter" / "align")
            aligner.remove()
        t1 = time.time()
        metrics = evaluate(model, [seed])
        print(f"{run} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        kept = model if seed == cfg.seeds[0] else None  # the report plots the first seed's models; free the rest
        return kept, {"seed": seed, **metrics}, hist, t1 - t0, time.time() - t1

    jobs = [(run, seed) for seed in cfg.seeds for run in report.RUNS]
    torch.set_num_threads(cfg.threads)
    print(
        f"robot task: {len(jobs)} LoRA runs of {cfg.steps} steps, {min(workers, len(jobs))} at a time, "
        f"{cfg.threads} torch thread(s) each",
        flush=True,
    )
    t = time.time()
    # warning filters are process-wide: set them here, not in the runs' threads (catch_warnings is not thread-safe)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")  # PEFT saves the untouched embeddings
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        done = list(pool.map(lambda job: fine_tune(*job), jobs))
    clock.add("fine-tuning + evaluation", t)
    per_seed: Dict[str, list] = {run: [] for run in report.RUNS}
    histories: Dict[str, list] = {run: [] for run in report.RUNS}
    keep, run_seconds = {}, {run: [] for run in report.RUNS}
    for (run, seed), (model, metrics, hist, train_s, _eval_s) in zip(jobs, done):
        per_seed[run].append(metrics)
        histories[run].append(hist)
        run_seconds[run].append(train_s)
        if model is not None:
            keep[run] = model
    del done

    # --- 4. report ---
    t = time.time()
    reload_diff = _check_reload(
        keep["align"], out / "base", out / "align" / f"seed{cfg.seeds[0]}", teacher, batcher, evals
    )
    summary = report.summarize(base, per_seed)
    examples = evals["ood_objects"][: cfg.attention_examples // 2] + evals["ood_scenes"][: cfg.attention_examples // 2]
    attention = {
        "scenes": examples,
        "splits": ["OOD objects"] * (cfg.attention_examples // 2) + ["OOD scenes"] * (cfg.attention_examples // 2),
        "instruction": S.ACTION_PROMPT,
        "layer": cfg.layer,
        "seed": cfg.seeds[0],
        "rows": {
            "base VLA": S.attention_rows(vla, batcher, examples, cfg.layer),
            **{
                name: S.attention_rows(keep[run], batcher, examples, cfg.layer)
                for run, name in report.arm_names(coeffs).items()
            },
        },
    }
    png = plot.plot(out / "demo.png", teacher_probe, base, summary, coeffs, attention)
    seconds = {k: round(v, 1) for k, v in clock.seconds.items()}
    seconds.update({f"{r} s/run": round(float(np.mean(v)), 1) for r, v in run_seconds.items()})
    table = report.table(teacher_probe, base, summary, cfg.seeds, coeffs)
    lines = report.verdict(summary, coeffs)
    conclusion = report.conclusion(summary, coeffs)
    clock.add("report", t)
    total = round(time.time() - t_start, 1)
    seconds = {**{k: round(v, 1) for k, v in clock.seconds.items()}, **seconds, "total": total}
    print("\n" + table + "\n")
    for line in lines:
        print("  " + line)
    print(conclusion)
    print(report.stage_times(seconds))
    summary_json = {
        "note": BANNER,
        "config": json.loads(json.dumps(asdict(cfg))),
        "code": code_identity(),
        "world": world,
        "fingerprint": report.figures_fingerprint(teacher_probe, base, per_seed),
        "teacher_probe": teacher_probe,
        "base": base,
        "per_seed": per_seed,
        "summary": summary,
        "verdict": lines,
        "words": report.words(summary),
        "conclusion": conclusion,
        "seconds": seconds,
        "reload_max_abs_logit_diff": reload_diff,
        "history": histories,
        "table": table,
    }
    atomic_write_bytes(out / "metrics.json", json.dumps(summary_json, indent=2, sort_keys=True).encode())
    if reload_diff >= 1e-4:
        raise SystemExit(f"The reloaded Align adapter does not reproduce its logits (max |diff| {reload_diff:.2e}).")
    print(
        f"reloaded {out}/align/seed{cfg.seeds[0]}/adapter with the stock loaders: max |logit diff| {reload_diff:.1e}\n"
        f"figures fingerprint {summary_json['fingerprint']} ({numerics.describe(world)})\n"
        f"wrote {out}/metrics.json" + (f", {png}" if png else "") + f", {out}/base, {out}/teacher, "
        f"{out}/{{sft,align,strong}}/seed*/adapter in {total:.0f} s. Next: on a real checkpoint, "
        "`openvla-align probe linear --help` and `openvla-align eval --help`.",
        flush=True,
    )
    return summary_json


def _check_reload(model, base_dir: Path, run_dir: Path, teacher, batcher, evals) -> float:
    """Load the base checkpoint + the Align adapter the way a user would, and compare logits; the sidecar must load."""
    from ..aligner import Aligner
    from ..vla.checkpoint import load_vla

    reloaded = load_vla(base_dir, run_dir / "adapter").model
    Aligner.load(run_dir / "adapter" / "align", teacher=teacher)
    batch = batcher.action(evals["id"][:8])
    with torch.no_grad():
        return (model(**batch).logits - reloaded(**batch).logits).abs().max().item()


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo")
    p.add_argument("--out", type=output_dir, default=DemoConfig.out_dir, help="output directory")
    p.add_argument("--steps", type=positive_int, default=DemoConfig.steps, help="LoRA steps per robot run")
    p.add_argument("--seed", type=int, default=DemoConfig.seed, help="seed of the data, teacher and base VLA")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=list(DemoConfig.seeds), help="seeds of the robot runs (SFT and Align)"
    )
    p.add_argument("--lr", type=positive_float, default=DemoConfig.lr, help="LoRA learning rate")
    p.add_argument("--threads", type=positive_int, default=DemoConfig.threads, help="torch threads per fine-tuning run")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="fine-tuning runs at once, each in its own Python thread (default: the CPU count // --threads)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="every stage on the smallest setting (2 seeds, 3 steps, ~30 s): checks an install and prints the "
        "figures fingerprint the tests commit; its figures say nothing about alignment",
    )
    p.set_defaults(func=_cmd_demo)
    return p


def _cmd_demo(args) -> int:
    if len(args.seeds) < 2:
        raise ValueError("--seeds needs at least two seeds: the verdict is a confidence interval over seeds.")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds names a seed twice ({' '.join(map(str, args.seeds))}); each run needs its own seed.")
    setting = dict(steps=args.steps, seed=args.seed, seeds=tuple(args.seeds), lr=args.lr)
    if args.quick:
        changed = [f"--{k}" for k, v in setting.items() if v != getattr(DemoConfig, k)]
        if changed:
            raise ValueError(f"--quick runs a fixed setting; drop {', '.join(changed)} (or drop --quick).")
        setting = dict(QUICK)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        run_demo(DemoConfig(out_dir=str(args.out), threads=args.threads, workers=args.workers or 0, **setting))
    return 0
