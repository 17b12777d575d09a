"""Tiny upstream assets: a random OpenVLA built from upstream's HF classes and a tfds RLDS build.

Runs only against a real OpenVLA stack: set OPENVLA_SRC to an OpenVLA checkout and use a Python environment
with OpenVLA's requirements (torch, transformers 4.40.1, timm 0.9.x, tensorflow, tensorflow_datasets, dlimp).
"""

import os
import sys

import pytest

from conftest import first_missing

SKIP_MESSAGE = (
    "upstream end-to-end assets need a real OpenVLA stack: set OPENVLA_SRC to an OpenVLA checkout and install "
    "OpenVLA's requirements (tensorflow, tensorflow_datasets, dlimp, timm 0.9.x, transformers 4.40.1)"
)


def _stack_available():
    src = os.environ.get("OPENVLA_SRC")
    if not src:
        return False, f"OPENVLA_SRC is unset; {SKIP_MESSAGE}"
    if src not in sys.path:
        sys.path.insert(0, src)
    missing = first_missing(("tensorflow", "tensorflow_datasets", "timm", "prismatic"))
    if missing:
        return False, f"`{missing}` is not importable; {SKIP_MESSAGE}"
    return True, ""


_OK, _WHY = _stack_available()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from assets import write_tiny_rlds

    from openvla_align.tiny.openvla import build_tiny_openvla_checkpoint

    root = tmp_path_factory.mktemp("upstream")
    ckpt = build_tiny_openvla_checkpoint(root / "ckpt", seed=0)
    rlds = write_tiny_rlds(root / "data", name="sft", episodes=6, steps=5, seed=0)
    return ckpt, root / "data", rlds


def test_rlds_build_layout(assets):
    _, _, rlds = assets
    assert (rlds / "dataset_info.json").is_file()
    assert (rlds / "features.json").is_file()
    assert list(rlds.glob("sft-train.tfrecord*"))


def test_checkpoint_loads_with_stock_autoclasses(assets):
    import json

    from transformers import AutoModelForVision2Seq, AutoProcessor

    ckpt, _, _ = assets
    config = json.loads((ckpt / "config.json").read_text())
    assert config["auto_map"]["AutoModelForVision2Seq"] == "modeling_prismatic.OpenVLAForActionPrediction"
    vla = AutoModelForVision2Seq.from_pretrained(ckpt, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    assert type(vla).__name__ == "OpenVLAForActionPrediction"
    assert type(processor).__name__ == "PrismaticProcessor"
    assert vla.config.text_config.num_hidden_layers == 18
    assert vla.config.text_config.hidden_size == 64
    assert vla.config.n_action_bins == 256
    assert "sft" in vla.config.norm_stats
    tok = processor.tokenizer
    assert tok.pad_token == "<PAD>" and tok.pad_token_id == tok.vocab_size
    assert tok.vocab_size > 256 + 100  # the top 256 ids serve as action tokens, with room for text below
    assert vla.config.text_config.vocab_size % 64 == 0 and vla.config.text_config.vocab_size >= len(tok)


def test_forward_on_one_rlds_sample(assets):
    import torch
    from assets import tiny_rlds_dataset
    from transformers import AutoModelForVision2Seq, AutoProcessor

    ckpt, data_root, _ = assets
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    vla = AutoModelForVision2Seq.from_pretrained(ckpt, trust_remote_code=True).eval()

    dataset = tiny_rlds_dataset(data_root, processor, name="sft", shuffle_buffer_size=100)
    sample = next(iter(dataset))
    assert sample["pixel_values"].shape == (6, 224, 224)
    input_ids, labels = sample["input_ids"], sample["labels"]
    assert input_ids.shape == labels.shape
    supervised = labels[labels != -100]
    assert supervised.numel() == 7 + 1  # 7 action tokens + </s>
    action_ids, top = supervised[:-1], processor.tokenizer.vocab_size
    assert bool(((action_ids >= top - 256) & (action_ids < top)).all())

    with torch.no_grad():
        out = vla(
            input_ids=input_ids[None],
            attention_mask=torch.ones_like(input_ids)[None],
            pixel_values=sample["pixel_values"][None].float(),
            labels=labels[None],
            output_projector_features=True,
        )
    n_visual = out.projector_features.shape[1]
    assert n_visual == 256
    assert out.logits.shape == (1, input_ids.shape[0] + n_visual, vla.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)


def test_teacher_cache_over_the_rlds_pipeline_matches_training_batches(assets, tmp_path):
    """`cache build --dataset` reads frames through OpenVLA's pipeline; every training sample's key is in it."""
    import warnings

    import torch
    from assets import tiny_rlds_dataset
    from transformers import AutoProcessor

    from openvla_align.cache.build import build_cache, rlds_frames
    from openvla_align.targets.cache import TeacherCache
    from openvla_align.targets.frame_keys import keys_from_pixel_values
    from openvla_align.tiny import tiny_teacher

    ckpt, data_root, _ = assets
    frames, source = rlds_frames(data_root, "sft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = tiny_teacher("c-radio-v3-l")
    summary = build_cache(tmp_path / "c", teacher, frames, source=source, teacher_name="c-radio-v3-l", progress=False)
    assert summary["stored"] == 30 and source["dataset"] == "sft" and source["version"] == "1.0.0"
    cache = TeacherCache(tmp_path / "c")
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    dataset = tiny_rlds_dataset(data_root, processor, name="sft", shuffle_buffer_size=8)
    samples = [s for s, _ in zip(dataset, range(12))]
    pixel_values = torch.stack([s["pixel_values"] for s in samples])
    assert all(k in cache for k in keys_from_pixel_values(pixel_values))  # the processor's exact output keys


def test_batched_kv_cached_policy_equals_predict_action_one_sample_at_a_time(assets):
    """`eval run`'s policy on upstream's OpenVLAForActionPrediction: a batch of prompts of three lengths, decoded with
    the KV cache and the 256-action-token restriction, gives exactly the actions of upstream `predict_action` run on
    each sample alone (greedy, with the reference's AllowedTokensLogitsProcessor restriction)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList

    from openvla_align.eval.run import BatchedPolicy
    from openvla_align.vla.checkpoint import action_prompt, load_vla

    ckpt = assets[0]
    loaded = load_vla(ckpt, dtype="float32", attn_implementation=None)
    policy = BatchedPolicy(loaded, "sft")
    vocab_size = policy.decoder.vocab_size
    assert vocab_size == 32000

    class ActionTokensOnly(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, : vocab_size - 256] = -torch.inf
            scores[:, vocab_size:] = -torch.inf
            return scores

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    instructions = ["put the carrot on the plate", "pick up the red block and put it in the bowl", "open the drawer"]
    rows, _ = policy.prompts(images, instructions)
    assert len({len(r) for r in rows}) == 3 and all(r[-1] == 29871 for r in rows)
    batched = policy(images, instructions)
    assert len(np.unique(batched[:, :6])) > 3  # not one bin everywhere: the comparison discriminates
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    for i, text in enumerate(instructions):
        inputs = processor(action_prompt(text), Image.fromarray(images[i]))
        inputs["pixel_values"] = inputs["pixel_values"].float()
        with torch.no_grad():
            alone = loaded.model.predict_action(
                **inputs, unnorm_key="sft", do_sample=False, logits_processor=LogitsProcessorList([ActionTokensOnly()])
            )
        np.testing.assert_array_equal(batched[i], alone)
