"""Alignment on OpenVLA-OFT's own model class (``prismatic/extern/hf`` of ``OPENVLA_OFT_SRC``), in this process, with
the fork's bidirectional attention: the plugin's loss is BlindVLA's formula on OFT's tokens, and its gradient reaches
exactly what it should.

Opt-in like the other OFT tests: needs ``OPENVLA_OFT_SRC``, OFT's transformers fork (hash-checked) and OFT's stack;
``scripts/test.sh`` runs it in its OFT phase. The reference below is re-derived from ``finetune_align.py``: all hidden
states, the slice after BOS (256 tokens per image here), each image's DINOv2 channels resized to 256 px *then*
de-normalised with the bf16-rounded constants, the teacher's patch features of each image concatenated in the token
order, normalise / dot / negate / mean, times 0.2.
"""

import os

import oft_assets as A
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(A.oft_unavailable() is not None, reason=str(A.oft_unavailable()))

LAYER = 16
BLINDVLA_DINO_MEAN = torch.tensor([0.484375, 0.455078125, 0.40625]).view(1, 3, 1, 1)
BLINDVLA_DINO_STD = torch.tensor([0.228515625, 0.2236328125, 0.224609375]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    A.oft_src()
    return A.build_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "tiny-oft", seed=0)


def load(checkpoint, num_images: int, film: bool):
    """OFT's model as its finetune.py prepares it: images set, LoRA all-linear (gaussian init), optionally FiLM."""
    from peft import LoraConfig, get_peft_model
    from prismatic.models.film_vit_wrapper import FiLMedPrismaticVisionBackbone
    from transformers import AutoModelForVision2Seq

    torch.manual_seed(0)
    vla = AutoModelForVision2Seq.from_pretrained(checkpoint, torch_dtype=torch.float32, trust_remote_code=True)
    vla.vision_backbone.set_num_images_in_input(num_images)
    config = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="gaussian")
    vla = get_peft_model(vla, config)
    if film:
        vla.model.vision_backbone = FiLMedPrismaticVisionBackbone(vla.model.vision_backbone, llm_dim=vla.llm_dim)
    return vla


def make_batch(checkpoint, num_images: int, batch_size: int = 2, seed: int = 0):
    """Token ids as OFT's RLDSBatchTransform lays them out (prompt, the chunk's action tokens, stop) and OFT-style
    pixel values: per image, ImageNet-normalised then SigLIP-normalised channels, images stacked on the channels."""
    from prismatic.vla.constants import ACTION_DIM, ACTION_TOKEN_BEGIN_IDX, IGNORE_INDEX, NUM_ACTIONS_CHUNK
    from transformers import AutoProcessor

    from openvla_align.vla.pixels import normalize_fused

    g = torch.Generator().manual_seed(seed)
    tokenizer = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True).tokenizer
    prompt = tokenizer("In: What action should the robot take to pick up the black bowl?\nOut:").input_ids
    n_actions = NUM_ACTIONS_CHUNK * ACTION_DIM
    actions = torch.randint(
        ACTION_TOKEN_BEGIN_IDX + 1, ACTION_TOKEN_BEGIN_IDX + 257, (batch_size, n_actions), generator=g
    )
    ids = torch.cat([torch.tensor([prompt] * batch_size), actions, torch.full((batch_size, 1), 2)], dim=1)
    labels = ids.clone()
    labels[:, : len(prompt)] = IGNORE_INDEX
    rgb = torch.rand(batch_size * num_images, 3, 224, 224, generator=g)
    pixel_values = normalize_fused(rgb).reshape(batch_size, 6 * num_images, 224, 224)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixel_values)


def reference_loss(out, pixel_values, teacher, projector, num_images: int):
    targets = []
    for i in range(num_images):
        x = F.interpolate(pixel_values[:, 6 * i : 6 * i + 3], size=(256, 256), mode="bilinear")
        targets.append(teacher.model(x * BLINDVLA_DINO_STD + BLINDVLA_DINO_MEAN))
    target = torch.cat(targets, dim=1)
    student = projector(out.hidden_states[LAYER][:, 1 : 1 + 256 * num_images])
    cos = (F.normalize(target, dim=-1) * F.normalize(student, dim=-1)).sum(-1)
    return 0.2 * (-cos).mean()


def tiny_radio():
    from openvla_align.tiny import tiny_teacher

    with pytest.warns(UserWarning):  # random weights, said out loud
        return tiny_teacher("c-radio-v3-l")


@pytest.mark.parametrize("num_images, film, proprio", [(1, False, False), (2, False, True), (2, True, True)])
def test_loss_is_blindvla_formula_on_oft_tokens(checkpoint, num_images, film, proprio):
    from prismatic.models.projectors import ProprioProjector

    from openvla_align.config import AlignConfig
    from openvla_align.openvla.plugins import AlignPlugin

    vla = load(checkpoint, num_images, film)
    teacher = tiny_radio()
    plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=32), teacher)
    plugin.on_model_ready(vla)
    batch = make_batch(checkpoint, num_images)
    extra = {}
    if proprio:
        torch.manual_seed(1)
        extra = dict(proprio=torch.randn(2, A.LIBERO_PROPRIO_DIM), proprio_projector=ProprioProjector(64, 8))
    vla.train()
    out = vla(**batch, output_hidden_states=True, use_film=film, **extra)
    # OFT's projector_features also hold the proprio token: the visual span must come from the vision projector
    assert out.projector_features.shape[1] == 256 * num_images + int(proprio)
    term, metrics = plugin.loss(vla, batch, out, 0)
    with torch.no_grad():
        ref = reference_loss(out, batch["pixel_values"], teacher, plugin.aligner.projectors[str(LAYER)], num_images)
    assert abs(term.item() - ref.item()) <= 1e-6, (term.item(), ref.item())
    assert metrics["align/loss"].item() == pytest.approx(term.item())

    term.backward()
    reached = {name for name, p in vla.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    blocks = {int(n.split(".layers.")[1].split(".")[0]) for n in reached if ".language_model.model.layers." in n}
    assert blocks == set(range(LAYER)), sorted(blocks)  # LoRA of blocks 0-15, nothing after block 15
    assert all("lora_" in n or ".scale." in n or ".shift." in n for n in reached), sorted(reached)[:5]
    assert not [n for n in reached if "lm_head" in n or "language_model.model.norm" in n]
    assert any("vision_backbone" in n and "featurizer" in n and "lora_" in n for n in reached)  # the towers
    film_reached = [n for n in reached if ".scale." in n or ".shift." in n]
    assert bool(film_reached) == film  # FiLM's layers, when FiLM is on
    if proprio:  # bidirectional attention: the visual tokens at layer 16 see the proprio token (and the text)
        assert all(p.grad is not None for p in extra["proprio_projector"].parameters())


def test_primary_image_only(checkpoint):
    from openvla_align.config import AlignConfig
    from openvla_align.openvla.plugins import AlignPlugin

    vla = load(checkpoint, 2, film=False)
    teacher = tiny_radio()
    plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=32, images="primary"), teacher)
    plugin.on_model_ready(vla)
    batch = make_batch(checkpoint, 2)
    out = vla(**batch, output_hidden_states=True)
    term, _ = plugin.loss(vla, batch, out, 0)
    with torch.no_grad():
        x = F.interpolate(batch["pixel_values"][:, :3], size=(256, 256), mode="bilinear")
        target = teacher.model(x * BLINDVLA_DINO_STD + BLINDVLA_DINO_MEAN)
        student = plugin.aligner.projectors[str(LAYER)](out.hidden_states[LAYER][:, 1:257])
        ref = 0.2 * (-(F.normalize(target, dim=-1) * F.normalize(student, dim=-1)).sum(-1)).mean()
    assert abs(term.item() - ref.item()) <= 1e-6


def test_family_grad_free_forwards_and_freeze(checkpoint):
    """The OFT family sees through FiLM; a forward without autograd (validation, diffusion sampling) neither aligns
    nor replaces the training forward's capture; the Freeze baseline keeps FiLM's layers trainable."""
    from openvla_align.config import AlignConfig
    from openvla_align.openvla.plugins import AlignPlugin, freeze_vision
    from openvla_align.vla import layout

    vla = load(checkpoint, 2, film=True)
    assert layout.family(vla).name == "openvla-oft" and layout.num_images(vla) == 2
    assert layout.student_grid(vla) == (16, 16) and hasattr(layout.vision_backbone(vla), "fused_featurizer")
    plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=32), tiny_radio())
    plugin.on_model_ready(vla)
    batch = make_batch(checkpoint, 2)
    out = vla(**batch, output_hidden_states=True, use_film=True)
    kept = out.hidden_states[LAYER][:, 1:513].detach().clone()
    with torch.no_grad():
        other = make_batch(checkpoint, 2, seed=1)
        vla(**other, output_hidden_states=True, use_film=True)
    captured = plugin.aligner._hook.pop()
    assert torch.equal(captured[LAYER].detach(), kept)

    film = {id(p) for p in layout.family(vla).conditioning_parameters(layout.unwrap(vla))}
    assert film
    assert freeze_vision(vla) > 0
    backbone = layout.unwrap(vla).vision_backbone
    assert all(p.requires_grad == (id(p) in film) for p in backbone.parameters())


def test_oft_attention_check_names_the_fork():
    from openvla_align.openvla.env import oft_attention_problem
    from openvla_align.vla.families.openvla_oft import OFT_FORK_LLAMA_SHA256, STOCK_LLAMA_SHA256

    assert oft_attention_problem() is None  # this venv runs the fork
    assert "stock transformers 4.40.1" in oft_attention_problem(STOCK_LLAMA_SHA256)
    assert "transformers-openvla-oft" in oft_attention_problem("0" * 64)
    assert OFT_FORK_LLAMA_SHA256 == A.FORK_MODELING_LLAMA_SHA256 and os.environ.get("OPENVLA_SRC") is None
