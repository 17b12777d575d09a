"""`openvla-align demo`: plain SFT vs SFT+Align on tiny random-weight models and generated data, on the CPU.

Same seed, data, LoRA and steps for both runs; the only difference is the alignment term. Everything here is a
tiny stand-in for OpenVLA-7B and C-RADIOv3-L, so the figures show the mechanics, not the paper's results.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from .aligner import Aligner
from .config import AlignConfig
from .hooks import VisualTokenHook
from .probe import linear as probe_linear
from .probe import load_vla
from .testing import build_tiny_vla, build_tokenizer, save_tiny_checkpoint, tiny_teacher
from .testing.data import COLORS, SHAPES, collate, generate_scenes
from .testing.tiny import ActionTokenizer

logger = logging.getLogger(__name__)

BANNER = (
    "NOTE: tiny random-weight models (an OpenVLA-layout VLA with an 18-block Llama of width 64, and a C-RADIOv3-L-"
    "architecture teacher of width 32) on generated scenes. The numbers show the mechanics, not the paper's results."
)


@dataclass
class DemoConfig:
    out_dir: str = "openvla_align_demo"
    steps: int = 60
    batch_size: int = 8
    lr: float = 2e-3
    lora_rank: int = 8
    n_train: int = 128
    n_heldout: int = 64
    seed: int = 0
    teacher: str = "c-radio-v3-l"
    layers: tuple = (8, 16)
    coeff: float = 0.2


def _lora(vla, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank, lora_alpha=min(rank, 16), lora_dropout=0.0, target_modules="all-linear", init_lora_weights="gaussian"
    )
    with warnings.catch_warnings():  # PEFT on current transformers: an API rename notice, not the demo's business
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(vla, cfg)


def _action_metrics(model, batch, action_tok: ActionTokenizer) -> Dict[str, float]:
    out = model(**batch)
    n = out.projector_features.shape[1]
    preds = out.logits[:, n:-1].argmax(-1)
    gt = batch["labels"][:, 1:]
    mask = gt > action_tok.action_token_begin_idx
    acc = ((preds == gt) & mask).sum().item() / max(mask.sum().item(), 1)
    l1 = float(np.abs(action_tok.decode(preds[mask].numpy()) - action_tok.decode(gt[mask].numpy())).mean())
    return {"action_loss": out.loss.item(), "token_accuracy": acc, "action_l1": l1}


@torch.no_grad()
def _features(model, scenes, idx, tok, action_tok, layer: int, batch_size: int) -> torch.Tensor:
    """Mean-pooled visual-token features of ``layer`` (linear-probe input)."""
    feats = []
    with VisualTokenHook(model, (layer,)) as hook:
        for start in range(0, len(idx), batch_size):
            model(**collate(scenes, idx[start : start + batch_size], tok, action_tok))
            feats.append(hook.pop()[layer].mean(1))
    return torch.cat(feats)


def linear_probe(train_x, train_y, test_x, test_y, epochs: int = 300, seed: int = 0) -> float:
    """Top-1 of the demo's probe: full batch with a large lr, which fits its ~100 examples in well under a second."""
    return probe_linear.linear_probe(
        train_x, train_y, test_x, test_y, epochs, seed, lr=0.05, weight_decay=1e-3, batch_size=0
    )


def _run(name, cfg: DemoConfig, tok, action_tok, scenes, heldout, teacher, align: bool, out_dir: Path):
    vla = build_tiny_vla(seed=cfg.seed, vocab_size=len(tok))
    base_dir = out_dir / "base"
    if not base_dir.exists():  # loadable by `openvla-align probe ... --model DIR/base --adapter DIR/align/adapter`
        save_tiny_checkpoint(base_dir, vla, tok)
    model = _lora(vla, cfg.lora_rank, cfg.seed)
    align_cfg = AlignConfig(
        enabled=True,
        teacher=cfg.teacher,
        layers=cfg.layers,
        coeff=cfg.coeff,
        projector_dim=64,
        allow_random_teacher=True,
    )
    aligner = Aligner(align_cfg, teacher).attach(model)  # attached in both runs: SFT only *measures* the cosine
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    history: List[Dict[str, float]] = []
    model.train()
    for step in tqdm(range(cfg.steps), desc=f"{name:>5}", unit="step", leave=True):
        idx = rng.choice(len(scenes.instructions), cfg.batch_size, replace=False)
        batch = collate(scenes, idx, tok, action_tok)
        out = model(**batch)
        a = aligner(pixel_values=batch["pixel_values"])
        loss = out.loss + a.loss if align else out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step, "action_loss": out.loss.item(), **{k: v.item() for k, v in a.metrics.items()}})
    model.eval()
    all_idx = np.arange(len(heldout.instructions))
    with torch.no_grad():
        eval_batch = collate(heldout, all_idx, tok, action_tok)
        metrics = _action_metrics(model, eval_batch, action_tok)
        aligner._hook.clear()
        model(**eval_batch)
        cos = {k: v.item() for k, v in aligner(pixel_values=eval_batch["pixel_values"]).metrics.items() if "cos" in k}
    train_idx = np.arange(len(scenes.instructions))
    train_x = _features(model, scenes, train_idx, tok, action_tok, 16, cfg.batch_size)
    test_x = _features(model, heldout, all_idx, tok, action_tok, 16, cfg.batch_size)
    probes = {
        f"linear_probe_{label}_layer16": linear_probe(
            train_x,
            torch.as_tensor(getattr(scenes, f"{label}_label")),
            test_x,
            torch.as_tensor(getattr(heldout, f"{label}_label")),
        )
        for label in ("shape", "color")
    }
    run_dir = out_dir / name
    model.save_pretrained(run_dir / "adapter")
    if align:
        aligner.save(run_dir / "adapter" / "align")
    aligner.remove()
    return model, {**metrics, **cos, **probes}, history


def _plot(histories: Dict[str, list], path: Path, layers) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install 'openvla-align[demo]').", path.name)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, hist in histories.items():
        steps = [h["step"] for h in hist]
        axes[0].plot(steps, [h["action_loss"] for h in hist], label=name)
        for layer in layers:
            axes[1].plot(steps, [h[f"align/cos_layer{layer}"] for h in hist], label=f"{name} layer {layer}")
    axes[0].set(title="action loss (train)", xlabel="step")
    axes[1].set(title="cosine to teacher (frozen projector)", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("openvla-align demo - tiny random-weight models", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(cfg: DemoConfig) -> Dict:
    t0 = time.time()
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a directory for the demo's outputs.")
    print(BANNER, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scenes = generate_scenes(cfg.n_train, seed=cfg.seed)
    heldout = generate_scenes(cfg.n_heldout, seed=cfg.seed + 1)
    tok = build_tokenizer(corpus=scenes.instructions)
    action_tok = ActionTokenizer(len(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the demo's banner already says the teacher is random
        teacher = tiny_teacher(cfg.teacher, seed=cfg.seed)
    print(
        f"data: {cfg.n_train} train / {cfg.n_heldout} held-out generated scenes; probe labels: shape {SHAPES}, "
        f"colour {tuple(COLORS)} (chance {1 / len(SHAPES):.2f} / {1 / len(COLORS):.2f})"
    )
    results, histories, models = {}, {}, {}
    for name, align in (("sft", False), ("align", True)):
        models[name], results[name], histories[name] = _run(
            name, cfg, tok, action_tok, scenes, heldout, teacher, align, out_dir
        )
    reload_diff = _check_reload(models["align"], out_dir, tok, action_tok, heldout, teacher)
    results["align"]["reload_max_abs_logit_diff"] = reload_diff
    plot = _plot(histories, out_dir / "demo.png", cfg.layers)
    table = _table(results, cfg.layers)
    print(table)
    verdict = "OK" if reload_diff < 1e-4 else "MISMATCH"
    print(f"reloaded align checkpoint: max |logit diff| = {reload_diff:.2e} ({verdict})")
    summary = {
        "note": BANNER,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
        "results": results,
        "history": histories,
        "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(
        f"wrote {out_dir}/metrics.json" + (f", {plot}" if plot else "") + f", {out_dir}/base (the tiny base "
        f"checkpoint), {out_dir}/sft/adapter, {out_dir}/align/adapter (+ align/ sidecar) in {summary['seconds']} s"
    )
    if reload_diff >= 1e-4:
        raise SystemExit("The reloaded Align checkpoint does not reproduce its logits.")
    return summary


def _check_reload(model, out_dir: Path, tok, action_tok, heldout, teacher) -> float:
    reloaded = load_vla(out_dir / "base", out_dir / "align" / "adapter").model
    Aligner.load(out_dir / "align" / "adapter" / "align", teacher=teacher)  # the sidecar must load too
    batch = collate(heldout, np.arange(8), tok, action_tok)
    with torch.no_grad():
        return (model(**batch).logits - reloaded(**batch).logits).abs().max().item()


def _table(results: Dict[str, Dict[str, float]], layers) -> str:
    rows = [
        ("held-out action loss (lower is better)", "action_loss", "{:.3f}"),
        ("action token accuracy (higher)", "token_accuracy", "{:.3f}"),
        ("action L1 (lower)", "action_l1", "{:.3f}"),
    ]
    rows += [(f"cosine to teacher, layer {layer} (higher)", f"align/cos_layer{layer}", "{:+.3f}") for layer in layers]
    rows += [
        (f"linear probe ({label}), layer 16 (higher)", f"linear_probe_{label}_layer16", "{:.3f}")
        for label in ("shape", "color")
    ]
    lines = [f"{'metric':<42}{'SFT':>10}{'SFT+Align':>12}", "-" * 64]
    for label, key, fmt in rows:
        lines.append(f"{label:<42}{fmt.format(results['sft'][key]):>10}{fmt.format(results['align'][key]):>12}")
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo")
    p.add_argument("--out", default="openvla_align_demo", help="output directory")
    p.add_argument("--steps", type=int, default=60, help="LoRA steps per run")
    p.add_argument("--seed", type=int, default=0, help="seed of the models, data and LoRA init")
    p.add_argument("--lr", type=float, default=DemoConfig.lr, help="LoRA learning rate")
    p.set_defaults(func=_cmd_demo)
    return p


def _cmd_demo(args) -> int:
    run_demo(DemoConfig(out_dir=args.out, steps=args.steps, seed=args.seed, lr=args.lr))
    return 0
