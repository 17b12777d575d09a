"""Spatial Forcing (arXiv 2510.12276) on OpenVLA-OFT's own model class, against the fork's own code: the plugin's
``teacher="vggt-1b"`` / ``teacher_input="spatial-forcing"`` / ``pooling="bilinear-corners"`` / ``projector=
"spatial-forcing"`` / ``loss="one-minus-cosine"`` configuration gives the loss ``finetune_align.py`` computes.

The reference is the fork's ``run_forward_pass`` (lines ~373-400), run line by line on the fork's files: its
``preprocess_normed_images``, its vendored ``VGGT(feature_only=True)`` (reduced width), its ``custom_pooling`` with
``use_vggt_pe`` and its ``AlignProjector(use_vlm_norm=True)``, imported from a writable temporary copy of
``spatial-forcing/openvla-SF`` in the shared upstream folder (``$OPENVLA_UPSTREAM``, default ``../shared/upstream``
beside the repository). The fork's ``prismatic`` is never imported as a package (OFT's stays the one the model class
uses): its two files are loaded by path; only its ``vggt`` package goes on ``sys.path`` (appended, after OFT's).

The model: OFT's class with OFT's transformers fork (bidirectional attention), 26 LLM layers of width 64, two cameras
per sample and proprio (OFT appends the proprio token to ``projector_features``), PEFT LoRA as OFT's finetune.py makes
it, fp32 on CPU. The fork's two ``torch.autocast("cuda", bfloat16)`` blocks, its ``torch.cuda.amp.autocast(enabled=
False)`` and the bf16 cast of the VLA's pixel_values are CUDA-only and are off (or left out) here; everything else is
the fork's lines.

Opt-in like the other OFT tests: needs ``OPENVLA_OFT_SRC`` and OFT's transformers fork (hash-checked).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import oft_assets as A
import pytest
import torch

from openvla_align.config import SPATIAL_FORCING

pytestmark = pytest.mark.skipif(A.oft_unavailable() is not None, reason=str(A.oft_unavailable()))

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = Path(os.environ.get("OPENVLA_UPSTREAM") or REPO.parent / "shared" / "upstream")
SF_SRC = UPSTREAM / "spatial-forcing" / "openvla-SF"

NUM_LAYERS, LAYER, HIDDEN = 26, 24, 64  # train.sh: --vla_layers_align 24; blocks 24 and 25 come after it
NUM_IMAGES, BATCH, COEFF = 2, 2, 0.5  # train.sh: --num_images_in_input 2 --use_proprio True --align_loss_coeff 0.5
PATCHES = 256  # per image (OFT's 224 px fused towers)
# Reduced VGGT (the fork's VGGT-1B is width 1024, 24 blocks, a ViT-L/14 patch embedding), 518 px as the fork feeds it.
WIDTH, DEPTH, HEADS, PE_DEPTH, PE_HEADS = 32, 2, 2, 1, 2
VGGT_ARCH = dict(
    embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, patch_embed_depth=PE_DEPTH, patch_embed_num_heads=PE_HEADS
)
TOL = 1e-5


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    A.oft_src()
    return A.build_tiny_oft_checkpoint(
        tmp_path_factory.mktemp("oft") / "tiny-oft", seed=0, num_layers=NUM_LAYERS, hidden_size=HIDDEN
    )


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fork(checkpoint, tmp_path_factory):
    """The fork's pieces, from a writable copy of ``openvla-SF``: ``vggt`` importable (appended to sys.path, after
    OFT's checkout), ``pooling_utils`` and ``projectors`` loaded by file path under private names."""
    if not (SF_SRC / "vggt" / "models" / "vggt.py").is_file():
        pytest.skip(f"the Spatial Forcing snapshot is not at {SF_SRC} (set OPENVLA_UPSTREAM)")
    import prismatic  # OFT's (oft_src put its checkout first): pinned before anything of the fork's is reachable

    oft_prismatic = Path(prismatic.__file__).resolve()
    root = tmp_path_factory.mktemp("sf") / "openvla-SF"
    shutil.copytree(SF_SRC, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert "vggt" not in sys.modules
    sys.path.append(str(root))
    names = ("sf_pooling_utils", "sf_projectors")
    try:
        vggt_model = importlib.import_module("vggt.models.vggt")
        ns = SimpleNamespace(
            root=root,
            VGGT=vggt_model.VGGT,
            Aggregator=importlib.import_module("vggt.models.aggregator").Aggregator,
            vision_transformer=importlib.import_module("vggt.layers.vision_transformer"),
            preprocess_normed_images=importlib.import_module("vggt.utils.load_fn").preprocess_normed_images,
            custom_pooling=_load_by_path(names[0], root / "prismatic/util/pooling_utils.py").custom_pooling,
            AlignProjector=_load_by_path(names[1], root / "prismatic/models/projectors.py").AlignProjector,
        )
        for module in [m for k, m in sys.modules.items() if k == "vggt" or k.startswith("vggt.")] + [
            sys.modules[n] for n in names
        ]:
            where = module.__file__ or next(iter(module.__path__))  # a namespace package (no __init__.py) has no file
            assert Path(where).resolve().is_relative_to(root.resolve()), module
        assert Path(sys.modules["prismatic"].__file__).resolve() == oft_prismatic  # OFT's, still
        yield ns
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "vggt" or m.startswith("vggt.") or m in names]:
            del sys.modules[name]


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights at scales that keep every part of VGGT visible in its output (as test_teacher_vggt does):
    LayerScale ~0.5, norms ~1, fan-in scaled matrices, distinct camera/register tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.2 * noise)
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith(("token", "tokens", "pos_embed")):
                p.copy_(0.5 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))
    return module


def fork_vggt(fork, seed: int = 0):
    """The fork's ``VGGT(enable_camera=False, enable_point=False, enable_depth=False, enable_track=False,
    feature_only=True)`` at the reduced size: built by its own code, only the sizes hard-coded in its patch-embedding
    factory (``vit_large``: width, depth, heads) replaced; the aggregator then rebuilt with the reduced depth/heads."""
    dino = fork.vision_transformer.DinoVisionTransformer

    def reduced_vit(**kwargs):
        kwargs.update(embed_dim=WIDTH, depth=PE_DEPTH, num_heads=PE_HEADS)
        return dino(**kwargs)

    with mock.patch.object(fork.vision_transformer, "DinoVisionTransformer", reduced_vit):
        vggt = fork.VGGT(
            embed_dim=WIDTH,
            enable_camera=False,
            enable_point=False,
            enable_depth=False,
            enable_track=False,
            feature_only=True,
        )
        vggt.aggregator = fork.Aggregator(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)  # img 518, patch 14
    assert vggt.embed_dim == WIDTH and vggt.patch_size == 14 and len(vggt.aggregator.frame_blocks) == DEPTH
    assert len(vggt.aggregator.patch_embed.blocks) == PE_DEPTH
    return randomize_(vggt, seed)


def load_vla(checkpoint):
    """OFT's model as its finetune.py prepares it: two images, LoRA all-linear (rank 4, alpha min(4, 16), gaussian
    init). LoRA's B matrices get small random values (as after some training), so A matrices see gradient too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForVision2Seq

    torch.manual_seed(0)
    vla = AutoModelForVision2Seq.from_pretrained(checkpoint, torch_dtype=torch.float32, trust_remote_code=True)
    vla.vision_backbone.set_num_images_in_input(NUM_IMAGES)
    config = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="gaussian")
    vla = get_peft_model(vla, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in vla.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return vla


def make_batch(processor, seed: int = 0):
    """A batch as OFT's RLDSBatchTransform + collator make it: per sample the primary and the wrist image each through
    the checkpoint's own PrismaticImageProcessor (``apply_transform``: DINOv2 then SigLIP normalisation, 6 channels),
    concatenated on channels (12); prompt ids, the chunk's action tokens, stop; labels masking the prompt; proprio."""
    from PIL import Image
    from prismatic.vla.constants import ACTION_DIM, ACTION_TOKEN_BEGIN_IDX, IGNORE_INDEX, NUM_ACTIONS_CHUNK

    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)

    def image():
        base = np.full((224, 224, 3), rng.integers(0, 256, 3), dtype=np.int64)
        for _ in range(4):
            y, x = rng.integers(0, 168, 2)
            h, w = rng.integers(24, 56, 2)
            base[y : y + h, x : x + w] = rng.integers(0, 256, 3)
        noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        return Image.fromarray(noisy)

    transform = processor.image_processor.apply_transform
    pixel_values = torch.stack([torch.cat([transform(image()), transform(image())], dim=0) for _ in range(BATCH)])
    prompt = processor.tokenizer("In: What action should the robot take to pick up the black bowl?\nOut:").input_ids
    n_actions = NUM_ACTIONS_CHUNK * ACTION_DIM
    actions = torch.randint(ACTION_TOKEN_BEGIN_IDX + 1, ACTION_TOKEN_BEGIN_IDX + 257, (BATCH, n_actions), generator=g)
    ids = torch.cat([torch.tensor([prompt] * BATCH), actions, torch.full((BATCH, 1), 2)], dim=1)
    labels = ids.clone()
    labels[:, : len(prompt)] = IGNORE_INDEX
    proprio = torch.randn(BATCH, A.LIBERO_PROPRIO_DIM, generator=g)
    return dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixel_values, proprio=proprio
    )


def fork_projector(fork):
    """``AlignProjector(llm_dim, vggt_dim, use_vlm_norm=True)`` as ``init_module`` builds it (xavier from the global
    RNG), its LayerNorm then moved off the identity so that the norm's mapping is tested too."""
    torch.manual_seed(3)
    proj = fork.AlignProjector(llm_dim=HIDDEN, vggt_dim=WIDTH, align_loss_type="cosine", use_vlm_norm=True)
    with torch.no_grad():
        proj.vlm_norm.weight.copy_(1 + 0.2 * torch.randn(HIDDEN))
        proj.vlm_norm.bias.copy_(0.1 * torch.randn(HIDDEN))
    return proj


FORK_TO_OURS = {"vlm_norm": "net.0", "fc1": "net.1", "fc2": "net.3"}


def fork_reference(fork, vggt, align_projector, processor, batch, output):
    """``run_forward_pass``'s alignment lines (finetune_align.py ~373-400) on ``output``, the VLA forward it makes.
    Returns the loss it adds (``align_loss * align_loss_coeff``) and the intermediate tensors."""
    layers_align, use_vggt_pe, pooling_func, num_images_in_input = (LAYER, -1), True, "bilinear", NUM_IMAGES
    use_proprio, gain_feat_1move, align_loss_coeff = True, False, COEFF
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast("cuda") without CUDA; torch.cuda.amp.autocast's deprecation
        # vla hidden states
        projected_embeddings = output.projector_features
        vision_length = projected_embeddings.shape[-2] - 1 if use_proprio else projected_embeddings.shape[-2]
        vla_hidden = output.hidden_states[layers_align[0]]  # 33 for total layers of VLA-7B
        boi_ids = 2 if gain_feat_1move else 1
        vision_hidden = vla_hidden[:, boi_ids : vision_length + boi_ids, :].clone()  # [bs, 512, 4096]

        # VGGT hidden states
        vggt.eval()
        unnorm_imgs = fork.preprocess_normed_images(
            batch["pixel_values"], processor.image_processor, num_images_in_input
        )
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            vggt_output = vggt(unnorm_imgs)
        agg_vggt_hidden = vggt_output["features"][layers_align[1]]  # 24 for total layers of VGGT
        patch_start_idx = vggt_output["patch_start_idx"]
        original_img = vggt_output["images"]
        vggt_hidden = agg_vggt_hidden[:, :, patch_start_idx:, :]

        # Resample VGGT hidden states to match the resolution of VLA hidden states
        H, W = original_img.shape[-2:]
        patch_h, patch_w = H // vggt.patch_size, W // vggt.patch_size
        pooled = fork.custom_pooling(vggt_hidden, (patch_h, patch_w), (H, W), vision_hidden, pooling_func, use_vggt_pe)

        # calculate align loss
        with torch.autocast("cuda", dtype=torch.bfloat16):
            align_loss = align_projector(vision_hidden, pooled)
    return align_loss * align_loss_coeff, SimpleNamespace(
        vision_length=vision_length,
        vision_hidden=vision_hidden,
        images=unnorm_imgs,
        features=vggt_hidden,
        patch_start_idx=patch_start_idx,
        pooled=pooled,
    )


# --------------------------------------------------------------------------------------------------------- test
def test_spatial_forcing_loss_equals_the_forks(checkpoint, fork):
    from prismatic.models.projectors import ProprioProjector
    from transformers import AutoProcessor

    from openvla_align.aligner import Aligner
    from openvla_align.config import AlignConfig
    from openvla_align.teachers import create_teacher
    from openvla_align.vla.pixels import split_images

    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)  # OFT's PrismaticProcessor
    assert type(processor.image_processor).__name__ == "PrismaticImageProcessor"
    vla = load_vla(checkpoint)
    torch.manual_seed(1)
    proprio_projector = ProprioProjector(llm_dim=HIDDEN, proprio_dim=A.LIBERO_PROPRIO_DIM)
    batch = make_batch(processor)
    assert batch["pixel_values"].shape == (BATCH, 6 * NUM_IMAGES, 224, 224)
    assert batch["pixel_values"].dtype == torch.float32

    # the fork's teacher and projector; ours, with the same weights
    vggt = fork_vggt(fork, seed=0)
    align_projector = fork_projector(fork)
    with pytest.warns(UserWarning, match="RANDOM"):
        teacher = create_teacher("vggt-1b", arch=VGGT_ARCH, allow_random=True)
    theirs = vggt.aggregator.state_dict()
    assert list(teacher.model.state_dict()) == list(theirs)  # same keys, same order
    teacher.model.load_state_dict(theirs, strict=True)
    config = AlignConfig(**{**SPATIAL_FORCING, "layers": (LAYER,), "coeff": COEFF}, enabled=True, images="all")
    aligner = Aligner(config, teacher).attach(vla)
    ours_projector = aligner.projectors[str(LAYER)]
    mapped = {
        f"{FORK_TO_OURS[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in align_projector.state_dict().items()
    }
    assert sorted(mapped) == sorted(ours_projector.state_dict())
    ours_projector.load_state_dict(mapped, strict=True)
    assert all(p.requires_grad for p in ours_projector.parameters())
    assert aligner.trainable_parameters() == list(ours_projector.parameters())

    # one VLA forward, as run_forward_pass makes it (L1 regression with proprio; fp32, no autocast)
    vla.train()
    output = vla(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=batch["labels"],
        output_hidden_states=True,
        proprio=batch["proprio"],
        proprio_projector=proprio_projector,
        noisy_actions=None,
        noisy_action_projector=None,
        diffusion_timestep_embeddings=None,
        use_film=False,
    )
    assert len(output.hidden_states) == NUM_LAYERS + 1
    fork_loss, ref = fork_reference(fork, vggt, align_projector, processor, batch, output)
    assert ref.vision_length == NUM_IMAGES * PATCHES  # projector_features = 2 x 256 patches + the proprio token
    assert output.projector_features.shape[1] == NUM_IMAGES * PATCHES + 1

    ours = aligner(pixel_values=batch["pixel_values"])

    # 1. the teacher's images: (B, V, 3, 518, 518), un-normalised DINOv2 halves, bicubic to 518, centre crop
    with torch.no_grad():
        rgb = aligner.source.input.rgb(split_images(batch["pixel_values"]))
        our_images = teacher.preprocess(rgb).view(BATCH, NUM_IMAGES, 3, 518, 518)
    assert ref.images.shape == (BATCH, NUM_IMAGES, 3, 518, 518)
    images_diff = (our_images - ref.images).abs().max().item()

    # 2. the raw VGGT features (last layer, patch tokens), all cameras of a sample together
    with torch.no_grad():
        raw = teacher.model(ref.images, -1)[:, :, teacher.model.patch_start_idx :]
    assert ref.patch_start_idx == teacher.model.patch_start_idx == 5
    assert ref.features.shape == raw.shape == (BATCH, NUM_IMAGES, 37 * 37, 2 * WIDTH)
    assert ref.features.abs().max() > 1.0  # a real signal
    features_diff = (raw - ref.features).abs().max().item()

    # 3. the pooled targets: (B, 2 x 256, 2 x WIDTH)
    targets = aligner.teacher_targets(batch["pixel_values"])
    assert ref.pooled.shape == targets.shape == (BATCH, NUM_IMAGES * PATCHES, 2 * WIDTH)
    targets_diff = (targets - ref.pooled).abs().max().item()

    # 4. the loss (train.sh's coeff 0.5 applied on both sides)
    loss_diff = abs(ours.loss.item() - fork_loss.item())
    print(
        f"\nSpatial Forcing vs the fork: loss ours {ours.loss.item():.8f} fork {fork_loss.item():.8f} "
        f"|diff| {loss_diff:.3g}; teacher images {images_diff:.3g}; raw VGGT features {features_diff:.3g}; "
        f"pooled targets {targets_diff:.3g}"
    )
    assert images_diff <= TOL
    assert features_diff <= TOL
    assert targets_diff <= TOL
    assert 0.25 < fork_loss.item() < 0.75 and torch.isfinite(ours.loss)  # 0.5 x (1 - cos), |cos| small at init
    assert loss_diff <= TOL, (ours.loss.item(), fork_loss.item())

    # 5. gradients: the fork's loss and ours give the same gradient to the projector and to the LoRA weights
    lora = {n: p for n, p in vla.named_parameters() if p.requires_grad and "lora_" in n}
    fork_params = dict(align_projector.named_parameters())
    wanted = list(fork_params.values()) + list(lora.values())
    fork_grads = torch.autograd.grad(fork_loss, wanted, retain_graph=True, allow_unused=True)
    fork_proj_grads = dict(zip(fork_params, fork_grads[: len(fork_params)]))
    fork_lora_grads = dict(zip(lora, fork_grads[len(fork_params) :]))
    vla.zero_grad(set_to_none=True)
    ours.loss.backward()

    grad_diff = 0.0
    for name, g_fork in fork_proj_grads.items():
        mine = ours_projector.get_parameter(f"{FORK_TO_OURS[name.split('.')[0]]}.{name.split('.', 1)[1]}").grad
        assert mine is not None and mine.abs().max() > 0, name
        grad_diff = max(grad_diff, ((mine - g_fork).abs().max() / g_fork.abs().max()).item())
    for name, g_fork in fork_lora_grads.items():
        mine = lora[name].grad
        if g_fork is None:
            assert mine is None or not mine.any(), name
            continue
        scale = g_fork.abs().max().item()
        if scale > 0:
            grad_diff = max(grad_diff, ((mine - g_fork).abs().max() / scale).item())
    print(f"max relative |grad ours - grad fork| (projector, LoRA): {grad_diff:.3g}")
    assert grad_diff <= 1e-4

    # 6. where our gradient goes: every LoRA weight of LLM blocks 0-23, the towers' LoRA, the projector; nothing of
    # blocks 24+ (their output is not in hidden_states[24]), not the final norm or the LM head
    reached = {n for n, p in lora.items() if p.grad is not None and p.grad.abs().sum() > 0}
    block_of = {n: int(n.split(".layers.")[1].split(".")[0]) for n in lora if ".language_model.model.layers." in n}
    assert {n for n in block_of if block_of[n] < LAYER} <= reached, sorted(
        n for n in block_of if block_of[n] < LAYER and n not in reached
    )[:5]
    late = [n for n in block_of if block_of[n] >= LAYER]
    assert late and all(lora[n].grad is None or not lora[n].grad.any() for n in late)
    assert {block_of[n] for n in reached if n in block_of} == set(range(LAYER))
    assert not [n for n in reached if "lm_head" in n or "language_model.model.norm" in n]
    towers = [n for n in reached if "vision_backbone" in n]
    assert any(".featurizer." in n for n in towers) and any(".fused_featurizer." in n for n in towers)
    assert any(".projector." in n and "language_model" not in n for n in reached)  # OFT's vision projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours_projector.parameters())
    # bidirectional attention: the visual tokens at layer 24 see the proprio token
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proprio_projector.parameters())
    assert not any(p.grad is not None for p in teacher.parameters())
    print(
        f"gradient reached {len(reached)} LoRA tensors: LLM blocks 0-{LAYER - 1} ({sum(n in block_of for n in reached)}"
        f"), towers ({len(towers)}), vision projector; test body {time.perf_counter() - start:.1f} s"
    )
    aligner.remove()
