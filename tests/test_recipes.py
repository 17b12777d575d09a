"""recipes/: every training recipe parses through draccus into the patched finetune config (unknown keys fail), and
every one trains a few steps on a tiny model with its own settings (LoRA rank, align settings, freeze switch).

The config is upstream's `FinetuneConfig` field list (names, types, defaults) extended by the patch's own helper
code; with OPENVLA_SRC the field list is also checked against the real patched script.
"""

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Optional

import draccus
import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_patch import PATCH_DIR, exec_block, upstream_config_source

from openvla_align import AlignConfig
from openvla_align.config import SPATIAL_FORCING
from openvla_align.openvla import patch as P
from openvla_align.openvla.plugins import PLUGINS, AlignPlugin, FreezePlugin
from openvla_align.tiny import build_tiny_vla, tiny_teacher

from conftest import make_batch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAINING = sorted(p for p in RECIPES.rglob("*.yaml") if not {"eval", "oft"} & set(p.parts))
OFT = sorted((RECIPES / "oft").glob("*.yaml"))

# upstream FinetuneConfig as patched: (name, type, default)
FIELDS = [
    ("vla_path", str, "openvla/openvla-7b"),
    ("data_root_dir", Path, Path("datasets/open-x-embodiment")),
    ("dataset_name", str, "droid_wipe"),
    ("run_root_dir", Path, Path("runs")),
    ("adapter_tmp_dir", Path, Path("adapter-tmp")),
    ("batch_size", int, 16),
    ("max_steps", int, 200_000),
    ("save_steps", int, 5000),
    ("learning_rate", float, 5e-4),
    ("grad_accumulation_steps", int, 1),
    ("image_aug", bool, True),
    ("shuffle_buffer_size", int, 100_000),
    ("save_latest_checkpoint_only", bool, True),
    ("merge_on_save", bool, True),
    ("resume_from", Optional[Path], None),
    ("use_lora", bool, True),
    ("lora_rank", int, 32),
    ("lora_dropout", float, 0.0),
    ("use_quantization", bool, False),
    ("wandb_project", str, "openvla"),
    ("wandb_entity", str, "stanford-voltron"),
    ("run_id_note", Optional[str], None),
]


# OpenVLA-OFT's FinetuneConfig (moojink/openvla-oft@213c5ff8), as patched
OFT_FIELDS = [
    ("vla_path", str, "openvla/openvla-7b"),
    ("data_root_dir", Path, Path("datasets/rlds")),
    ("dataset_name", str, "aloha_scoop_x_into_bowl"),
    ("run_root_dir", Path, Path("runs")),
    ("shuffle_buffer_size", int, 100_000),
    ("use_l1_regression", bool, True),
    ("use_diffusion", bool, False),
    ("num_diffusion_steps_train", int, 50),
    ("use_film", bool, False),
    ("num_images_in_input", int, 1),
    ("use_proprio", bool, False),
    ("batch_size", int, 8),
    ("learning_rate", float, 5e-4),
    ("lr_warmup_steps", int, 0),
    ("num_steps_before_decay", int, 100_000),
    ("grad_accumulation_steps", int, 1),
    ("max_steps", int, 200_000),
    ("use_val_set", bool, False),
    ("val_freq", int, 10_000),
    ("val_time_limit", int, 180),
    ("save_freq", int, 10_000),
    ("save_latest_checkpoint_only", bool, False),
    ("resume", bool, False),
    ("resume_step", Optional[int], None),
    ("image_aug", bool, True),
    ("diffusion_sample_freq", int, 50),
    ("use_lora", bool, True),
    ("lora_rank", int, 32),
    ("lora_dropout", float, 0.0),
    ("merge_lora_during_training", bool, True),
    ("wandb_entity", str, "your-wandb-entity"),
    ("wandb_project", str, "your-wandb-project"),
    ("run_id_note", Optional[str], None),
    ("run_id_override", Optional[str], None),
    ("wandb_log_freq", int, 10),
]


def finetune_config(fields=FIELDS):
    base = dataclasses.make_dataclass("FinetuneConfig", [(n, t, dataclasses.field(default=d)) for n, t, d in fields])
    return exec_block()["extend_config"](base, list(PLUGINS))


def parse(path, fields=FIELDS):
    return draccus.parse(config_class=finetune_config(fields), config_path=str(path), args=[])


@pytest.mark.skipif(not os.environ.get("OPENVLA_SRC"), reason="set OPENVLA_SRC to compare with upstream's fields")
def test_field_list_is_upstreams():
    patch = P.load_patch(PATCH_DIR)
    patched = P.apply_hunks((Path(os.environ["OPENVLA_SRC"]) / patch.target).read_text(), patch.hunks)
    source = upstream_config_source(patched)
    names = [line.split(":")[0].strip() for line in source.splitlines() if line.startswith("    ") and ": " in line]
    names = [n for n in names if n.isidentifier()]
    assert names == [n for n, _, _ in FIELDS]


@pytest.mark.skipif(not os.environ.get("OPENVLA_OFT_SRC"), reason="set OPENVLA_OFT_SRC to compare with OFT's fields")
def test_oft_field_list_is_ofts():
    patch = P.load_patch(P.patch_dir("openvla-oft"))
    patched = P.apply_hunks((Path(os.environ["OPENVLA_OFT_SRC"]) / patch.target).read_text(), patch.hunks)
    source = patched[patched.index("class FinetuneConfig:") : patched.index("# fmt: on")]
    names = [line.split(":")[0].strip() for line in source.splitlines() if line.startswith("    ") and ": " in line]
    assert [n for n in names if n.isidentifier()] == [n for n, _, _ in OFT_FIELDS]


def test_oft_recipes_are_ofts_libero_command_with_one_change_each():
    """recipes/oft/: OFT's documented LIBERO command line (LIBERO.md) as the baseline; Align and Freeze differ from it
    only in their plugin section and run tag."""
    assert [p.name for p in OFT] == [
        "libero-align.yaml", "libero-freeze.yaml", "libero-radio-vggt.yaml", "libero-sft.yaml",
        "libero-spatial-forcing.yaml",
    ]  # fmt: skip
    sft, align, freeze, sf, both = (
        parse(RECIPES / "oft" / f"libero-{n}.yaml", OFT_FIELDS)
        for n in ("sft", "align", "freeze", "spatial-forcing", "radio-vggt")
    )
    assert (sft.dataset_name, sft.num_images_in_input, sft.use_proprio, sft.use_l1_regression) == (
        "libero_spatial_no_noops", 2, True, True)  # fmt: skip
    assert (sft.batch_size, sft.learning_rate, sft.lora_rank, sft.max_steps, sft.save_freq) == (
        8,
        5e-4,
        32,
        150005,
        10000,
    )
    assert not sft.align.enabled and not sft.freeze.vision
    assert align.align == AlignConfig(enabled=True) and not align.freeze.vision
    assert freeze.freeze.vision and not freeze.align.enabled
    # Spatial Forcing's train.sh: its alignment flags as our registered choices (shared/upstream/spatial-forcing)
    assert sf.align == AlignConfig(
        enabled=True, teacher="vggt-1b", layers=(24,), coeff=0.5, loss="one-minus-cosine", projector="spatial-forcing",
        freeze_projector=False, teacher_input="spatial-forcing", pooling="bilinear-corners", pooling_pos_embed=0.1,
    )  # fmt: skip
    assert sf.align == AlignConfig(enabled=True, **SPATIAL_FORCING)  # the bench's and the tests' definition too
    assert (sf.image_aug, sf.use_film, sf.use_diffusion) == (True, False, False)
    assert (both.align, both.align2) == (align.align, sf.align) and not sf.align2.enabled  # two terms at once
    differ = [f.name for f in dataclasses.fields(sft) if getattr(sft, f.name) != getattr(both, f.name)]
    assert sorted(differ) == ["align", "align2", "run_id_note"], differ
    for other in (align, freeze, sf):
        differ = [f.name for f in dataclasses.fields(sft) if getattr(sft, f.name) != getattr(other, f.name)]
        assert sorted(differ) in (["align", "run_id_note"], ["freeze", "run_id_note"]), differ
    for path in OFT:
        for line in path.read_text().splitlines()[1:]:
            section = line.strip() in {f"{cls.name}:" for cls in PLUGINS}
            assert section or " # " in line, f"{path}: every setting carries a comment: {line!r}"


def test_every_recipe_parses_and_unknown_keys_fail(tmp_path):
    assert len(TRAINING) == 41  # 4 paper runs + 35 ablation runs of the paper + 2 with Spatial Forcing's choices
    for path in TRAINING:
        cfg = parse(path)
        assert cfg.batch_size == 8 and cfg.lora_rank == 32 and cfg.lora_dropout == 0.0, path
        assert cfg.dataset_name in ("sft", "warmup") and cfg.run_id_note, path
        for line in path.read_text().splitlines()[1:]:
            section = line.strip() in {f"{cls.name}:" for cls in PLUGINS}
            assert section or " # " in line, f"{path}: every setting carries a comment: {line!r}"
    paper = parse(RECIPES / "paper" / "align.yaml")
    assert paper.align == AlignConfig(enabled=True)  # the defaults are the paper's settings
    assert (paper.max_steps, paper.image_aug, paper.learning_rate) == (60000, True, 5e-4)
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "paper" / "align.yaml").read_text() + "  coef: 0.5\n")
    with pytest.raises(Exception, match="coef"):
        parse(bad)


@pytest.mark.parametrize("path", TRAINING, ids=[str(p.relative_to(RECIPES)) for p in TRAINING])
def test_recipe_trains_on_a_tiny_model(path, tokenizer):
    """Two optimizer steps with the recipe's LoRA and align settings on a 32-layer tiny VLA (so layers 8/16/24
    exist) and a tiny teacher of the recipe's family."""
    cfg = parse(path)
    vla = build_tiny_vla(seed=0, vocab_size=len(tokenizer), llm_layers=32)
    torch.manual_seed(0)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=min(cfg.lora_rank, 16),
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        init_lora_weights="gaussian",
    )
    model = get_peft_model(vla, lora)
    align = dataclasses.replace(cfg.align, projector_dim=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugin = AlignPlugin(align, tiny_teacher(align.teacher) if align.enabled else None)
    freeze = FreezePlugin(cfg.freeze)
    freeze.setup(cfg)
    extra = plugin.on_model_ready(model) + freeze.on_model_ready(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params}] + ([{"params": extra}] if extra else []), lr=cfg.learning_rate)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    for step in range(2):
        batch = make_batch(tokenizer, 2, seed=step)
        out = model(**batch)
        term, metrics = plugin.loss(model, batch, out, step)
        loss = out.loss if term is None else out.loss + term
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    plugin.on_end()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # it trained
    if align.enabled:
        assert "align/loss" in metrics and (term is not None)
    if cfg.freeze.vision:
        assert not any("vision_backbone" in n for n in before)  # nothing of the vision backbone was trainable
    if not align.freeze_projector:
        assert extra  # a trainable projector joins the optimizer
