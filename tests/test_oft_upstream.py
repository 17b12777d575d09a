"""OpenVLA-OFT's own stack on CPU: a tiny OFT checkpoint and the fork's bidirectional attention (the STOCK
``vla-scripts/finetune.py`` end to end is in ``test_oft_finetune.py``, where its run also serves as the reference for
the patched script).

Opt-in: needs ``OPENVLA_OFT_SRC`` (an OpenVLA-OFT checkout), transformers 4.40.1 patched into OFT's fork
(``transformers-openvla-oft.patch``: ``modeling_llama.py`` hashes to ``FORK_MODELING_LLAMA_SHA256``), tensorflow,
tensorflow_datasets, dlimp and diffusers, and ``OPENVLA_SRC`` unset: OpenVLA and OFT both ship a top-level
``prismatic`` package, so OFT's tests run in a pytest process of their own (``scripts/test.sh``, second phase of
openvla-pins). Nothing is patched: the script, OFT's classes and its RLDS pipeline are the checkout's, over assets
from ``oft_assets``.
"""

import os
import shutil

import pytest
from oft_assets import (
    FORK_MODELING_LLAMA_SHA256,
    LIBERO_DATASET,
    LIBERO_PROPRIO_DIM,
    STOCK_MODELING_LLAMA_SHA256,
    build_tiny_oft_checkpoint,
    modeling_llama_sha256,
    write_tiny_libero_rlds,
)

from conftest import first_missing

NUM_LAYERS, HIDDEN, CHUNK, ACTION_DIM = 18, 64, 8, 7
PATCHES_PER_IMAGE = 256  # two ViT/14 towers (oft_assets.PICO_VIT) at 224 px, fused along channels


def _oft_stack():
    src = os.environ.get("OPENVLA_OFT_SRC")
    if not src:
        return False, "OPENVLA_OFT_SRC is unset (an OpenVLA-OFT checkout); scripts/test.sh sets it in its OFT phase"
    if os.environ.get("OPENVLA_SRC"):
        return False, "OPENVLA_SRC is set: OpenVLA's and OFT's `prismatic` cannot share a process; unset it for OFT"
    digest = modeling_llama_sha256()
    if digest != FORK_MODELING_LLAMA_SHA256:
        kind = "stock 4.40.1" if digest == STOCK_MODELING_LLAMA_SHA256 else f"sha256 {str(digest)[:12]}…"
        return False, (
            f"transformers' modeling_llama.py is not OFT's fork ({kind}): install transformers==4.40.1 and apply "
            "transformers-openvla-oft.patch in its models/llama/"
        )
    missing = first_missing(("tensorflow", "tensorflow_datasets", "dlimp", "diffusers", "timm", "peft", "draccus"))
    if missing:
        return False, f"`{missing}` is not importable (OpenVLA-OFT's stack)"
    return True, ""


_OK, _WHY = _oft_stack()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)


@pytest.fixture(scope="module")
def oft(tmp_path_factory):
    """A writable copy of the checkout (on sys.path), a tiny OFT checkpoint and a tiny LIBERO RLDS build."""
    root = tmp_path_factory.mktemp("oft")
    checkout = root / "openvla-oft"
    shutil.copytree(
        os.environ["OPENVLA_OFT_SRC"], checkout, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc")
    )
    ckpt = build_tiny_oft_checkpoint(root / "tiny-oft", seed=0, src=checkout, num_layers=NUM_LAYERS)
    write_tiny_libero_rlds(root / "data", LIBERO_DATASET, episodes=6, steps=10, seed=0)
    return dict(root=root, checkout=checkout, ckpt=ckpt, data=root / "data")


@pytest.fixture(scope="module")
def model(oft):
    import torch
    from transformers import AutoModelForVision2Seq, AutoProcessor

    processor = AutoProcessor.from_pretrained(oft["ckpt"], trust_remote_code=True)
    vla = AutoModelForVision2Seq.from_pretrained(oft["ckpt"], torch_dtype=torch.float32, trust_remote_code=True)
    vla.vision_backbone.set_num_images_in_input(2)
    return vla.eval(), processor


@pytest.fixture(scope="module")
def batch(oft, model):
    """Two training samples through OFT's own RLDS pipeline, batch transform (wrist image, proprio) and collator."""
    from prismatic.models.backbones.llm.prompting import PurePromptBuilder
    from prismatic.util.data_utils import PaddedCollatorForActionPrediction
    from prismatic.vla.action_tokenizer import ActionTokenizer
    from prismatic.vla.datasets import RLDSBatchTransform, RLDSDataset

    _, processor = model
    tokenizer = processor.tokenizer
    transform = RLDSBatchTransform(
        ActionTokenizer(tokenizer),
        tokenizer,
        image_transform=processor.image_processor.apply_transform,
        prompt_builder_fn=PurePromptBuilder,
        use_wrist_image=True,
        use_proprio=True,
    )
    dataset = RLDSDataset(
        oft["data"], LIBERO_DATASET, transform, resize_resolution=(224, 224), shuffle_buffer_size=64, image_aug=False
    )
    samples = [s for s, _ in zip(dataset, range(2))]
    collate = PaddedCollatorForActionPrediction(tokenizer.model_max_length, tokenizer.pad_token_id, "right")
    return collate(samples)


def _forward(vla, batch, **text):
    """The forward `run_forward_pass` makes for L1 regression with proprio (fp32 here, no autocast); ``text``
    (input_ids, attention_mask, labels) replaces the batch's."""
    import torch
    from prismatic.models.projectors import ProprioProjector

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "proprio") if k in batch}
    inputs.update(text)
    torch.manual_seed(0)
    projector = ProprioProjector(llm_dim=vla.llm_dim, proprio_dim=LIBERO_PROPRIO_DIM)
    with torch.no_grad():
        return vla(**inputs, output_hidden_states=True, proprio_projector=projector)


def test_tiny_checkpoint_two_images_proprio_l1_forward(oft, model, batch):
    """OFT's classes load the tiny checkpoint (SDPA Llama: the fork's attention); OFT's pipeline yields 12-channel
    pixels, 8-d proprio and an 8x7 chunk; the forward's hidden states are BOS + 2x256 patches + proprio + text, and
    OFT's L1 head reads the 56 action positions the way `run_forward_pass` does."""
    import torch
    from prismatic.models.action_heads import L1RegressionActionHead
    from prismatic.training.train_utils import get_current_action_mask, get_next_actions_mask
    from prismatic.vla import constants

    vla, processor = model
    assert (constants.NUM_ACTIONS_CHUNK, constants.ACTION_DIM, constants.PROPRIO_DIM) == (CHUNK, ACTION_DIM, 8)
    assert type(vla).__name__ == "OpenVLAForActionPrediction"
    assert type(vla).__module__.startswith("transformers_modules.")  # the remote code copied beside the weights
    attention = {type(layer.self_attn).__name__ for layer in vla.language_model.model.layers}
    assert attention == {"LlamaSdpaAttention"} and vla.language_model.config._attn_implementation == "sdpa"
    assert vla.vision_backbone.get_num_patches() == PATCHES_PER_IMAGE
    assert processor.tokenizer.vocab_size == 32000 and vla.vocab_size == 32000
    stats = vla.norm_stats[LIBERO_DATASET]
    assert len(stats["action"]["q01"]) == ACTION_DIM and len(stats["proprio"]["q99"]) == LIBERO_PROPRIO_DIM

    input_ids, labels = batch["input_ids"], batch["labels"]
    assert batch["pixel_values"].shape == (2, 12, 224, 224)  # (primary, wrist) x (DINOv2, SigLIP) x RGB
    assert batch["proprio"].shape == (2, LIBERO_PROPRIO_DIM) and batch["actions"].shape == (2, CHUNK, ACTION_DIM)
    assert ((labels > constants.ACTION_TOKEN_BEGIN_IDX).sum(1) == CHUNK * ACTION_DIM).all()

    out = _forward(vla, batch)
    num_patches = 2 * PATCHES_PER_IMAGE + 1  # + the proprio token
    assert len(out.hidden_states) == NUM_LAYERS + 1
    assert {h.shape for h in out.hidden_states} == {(2, input_ids.shape[1] + num_patches, HIDDEN)}

    targets = labels[:, 1:]
    mask = get_current_action_mask(targets) | get_next_actions_mask(targets)
    actions_hidden = out.hidden_states[-1][:, num_patches:-1][mask].reshape(2, CHUNK * ACTION_DIM, -1)
    head = L1RegressionActionHead(input_dim=HIDDEN, hidden_dim=HIDDEN, action_dim=ACTION_DIM)
    predicted = head.predict_action(actions_hidden)
    assert predicted.shape == (2, CHUNK, ACTION_DIM) and torch.isfinite(predicted).all()
    assert torch.isfinite(torch.nn.L1Loss()(batch["actions"], predicted))


def test_fork_attention_is_bidirectional(oft, model, batch):
    """Changing the last token (the stop token) changes the first layer's output at BOS and at the patches: the
    fork's LlamaSdpaAttention attends both ways. The eager (stock, causal) attention of the same weights does not;
    right padding is masked as keys, so padded rows equal unpadded ones."""
    import torch
    from transformers import AutoModelForVision2Seq

    vla, _ = model
    length = int(batch["attention_mask"][0].sum())
    row = {k: batch[k][:1, :length] for k in ("input_ids", "attention_mask", "labels")}
    changed = dict(row, input_ids=row["input_ids"].clone())
    changed["input_ids"][0, -1] = 1  # </s> -> <s>
    one = {k: batch[k][:1] for k in ("pixel_values", "proprio")}

    def first_layer(model, inputs):
        return _forward(model, one, **inputs).hidden_states[1][0]

    base, moved = first_layer(vla, row), first_layer(vla, changed)
    delta = (base - moved).abs().amax(-1)
    assert delta[0] > 1e-4 and delta[1 : 1 + 2 * PATCHES_PER_IMAGE].min() > 0, "an earlier position ignored a later one"

    eager = AutoModelForVision2Seq.from_pretrained(
        oft["ckpt"], torch_dtype=torch.float32, trust_remote_code=True, attn_implementation="eager"
    ).eval()
    eager.vision_backbone.set_num_images_in_input(2)
    causal = (first_layer(eager, row) - first_layer(eager, changed)).abs().amax(-1)
    assert causal[:-1].max() < 1e-6 and causal[-1] > 1e-4

    pad = 3
    padded = {
        "input_ids": torch.cat([row["input_ids"], torch.full((1, pad), vla.pad_token_id)], 1),
        "attention_mask": torch.cat([row["attention_mask"], torch.zeros(1, pad, dtype=torch.bool)], 1),
        "labels": torch.cat([row["labels"], torch.full((1, pad), -100)], 1),
    }
    assert torch.allclose(first_layer(vla, padded)[:-pad], base, atol=1e-5)
