import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from openvla_align import AlignConfig, Aligner
from openvla_align.losses import cosine_loss
from openvla_align.vla.pixels import rgb_from_pixel_values

from conftest import PatchTeacher


def lora_vla(vla):
    cfg = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="gaussian")
    return get_peft_model(vla, cfg)


def test_loss_is_coeff_times_cosine_of_projected_layer(vla, batch, teacher):
    aligner = Aligner(AlignConfig(enabled=True, layers=(8, 16), projector_dim=32), teacher).attach(vla)
    with torch.no_grad():
        out = vla(**batch, output_hidden_states=True)
        align = aligner(pixel_values=batch["pixel_values"])
    targets = teacher(rgb_from_pixel_values(batch["pixel_values"]))
    expect = 0.0
    for layer in (8, 16):
        student = aligner.projectors[str(layer)](out.hidden_states[layer][:, 1:257])
        expect += cosine_loss(student, targets)[0]
        assert align.metrics[f"align/cos_layer{layer}"] == pytest.approx(
            -cosine_loss(student, targets)[0].item(), abs=1e-5
        )
    assert align.loss.item() == pytest.approx(0.2 * expect.item(), abs=1e-5)
    # Precomputed targets give the same loss as the live teacher.
    with torch.no_grad():
        vla(**batch)
        assert aligner(targets=targets).loss.item() == pytest.approx(align.loss.item(), abs=1e-6)
    aligner.remove()


@pytest.mark.parametrize("frozen", [True, False])
def test_only_lora_and_trainable_projector_get_gradients(vla, batch, teacher, frozen):
    model = lora_vla(vla)
    aligner = Aligner(AlignConfig(enabled=True, projector_dim=32, freeze_projector=frozen), teacher).attach(model)
    model.train()
    aligner.train()
    out = model(**batch)
    (out.loss + aligner(pixel_values=batch["pixel_values"]).loss).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is None for p in teacher.parameters())
    proj_grads = [p.grad is not None for p in aligner.projectors.parameters()]
    assert all(proj_grads) if not frozen else not any(proj_grads)
    assert not aligner.projectors.training if frozen else aligner.projectors.training
    assert not teacher.training
    assert len(aligner.trainable_parameters()) == (0 if frozen else 8)


def test_alignment_gradient_reaches_only_blocks_up_to_the_layer(vla, batch, teacher):
    model = lora_vla(vla)
    aligner = Aligner(AlignConfig(enabled=True, layers=(4,), projector_dim=32), teacher).attach(model)
    model(**batch)
    aligner(pixel_values=batch["pixel_values"]).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("layers.3." in n for n in grads) and not any("layers.4." in n for n in grads)
    assert any("vision_backbone" in n for n in grads)


def test_trainable_projector_is_optimised(vla, batch, teacher):
    aligner = Aligner(AlignConfig(enabled=True, projector_dim=32, freeze_projector=False), teacher).attach(vla)
    opt = torch.optim.SGD(aligner.trainable_parameters(), lr=1.0)
    before = aligner.fingerprint()
    vla(**batch)
    aligner(pixel_values=batch["pixel_values"]).loss.backward()
    opt.step()
    assert aligner.fingerprint() != before


def test_save_load_round_trip(tmp_path, vla, batch, teacher):
    cfg = AlignConfig(enabled=True, layers=(8, 16), projector_dim=32, projector_seed=7)
    aligner = Aligner(cfg, teacher).attach(vla)
    aligner.save(tmp_path / "align")
    assert json.loads((tmp_path / "align" / "config.json").read_text())["layers"] == [8, 16]
    loaded = Aligner.load(tmp_path / "align", teacher=teacher)
    assert loaded.config == cfg and loaded.fingerprint() == aligner.fingerprint()
    first = (tmp_path / "align" / "projector.safetensors").read_bytes()
    for i in range(6):  # byte-identical files for identical projectors (safetensors keeps metadata in a hash map)
        loaded.save(tmp_path / f"again{i}")
        assert (tmp_path / f"again{i}" / "projector.safetensors").read_bytes() == first
    aligner.remove()
    loaded.attach(vla)
    with torch.no_grad():
        vla(**batch)
        assert loaded(pixel_values=batch["pixel_values"]).loss.item() != 0


def test_load_refuses_corrupt_or_mismatched_state(tmp_path, vla, teacher):
    Aligner(AlignConfig(enabled=True, projector_dim=32), teacher).attach(vla).save(tmp_path)
    with pytest.raises(ValueError, match="outputs width 24 but teacher patch-test has width 40"):
        Aligner.load(tmp_path, teacher=PatchTeacher(width=40))
    (tmp_path / "projector.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Aligner.load(tmp_path, teacher=teacher)
    (tmp_path / "projector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="projector.safetensors is missing"):
        Aligner.load(tmp_path, teacher=teacher)


def test_attach_checks_grid_and_steps_check_tokens(vla, batch):
    with pytest.raises(
        ValueError, match=r"Teacher patch-test gives targets on a \(8, 8\) grid but the VLA has a \(16, 16\)"
    ):
        Aligner(AlignConfig(enabled=True, projector_dim=32), PatchTeacher(grid=(8, 8))).attach(vla)
    aligner = Aligner(AlignConfig(enabled=True, projector_dim=32), PatchTeacher()).attach(vla)
    with torch.no_grad():
        vla(**batch)
        with pytest.raises(ValueError, match="256 visual tokens .* teacher targets have 64"):
            aligner(targets=torch.randn(2, 64, 24))
    with pytest.raises(RuntimeError, match="No visual-token states captured"):
        aligner(pixel_values=batch["pixel_values"])


def test_encoder_target_aligns_vision_output(vla, batch, teacher):
    aligner = Aligner(AlignConfig(enabled=True, target="encoder", projector_dim=32), teacher).attach(vla)
    with torch.no_grad():
        vla(**batch)
        out = aligner(pixel_values=batch["pixel_values"])
    assert set(out.metrics) == {"align/cos_encoder", "align/loss_encoder", "align/loss"}
    assert aligner.projectors["0"].net[1].in_features == vla.vision_backbone.embed_dim


def test_matches_the_reference_implementation_step(vla, batch):
    """Re-derive the reference's (BlindVLA finetune_align.py) alignment term step by step, as it computes it:
    all hidden states, the slice after BOS, resize the DINOv2 channels to 256 px *then* de-normalise with the
    bf16-rounded constants, the RADIO teacher's patch features, normalise / dot / negate / mean per layer, summed,
    times 0.2. Our hook-based Aligner must give the same number."""
    import torch.nn.functional as F

    from openvla_align.tiny import tiny_teacher

    with pytest.warns(UserWarning):
        teacher = tiny_teacher("c-radio-v3-l")
    aligner = Aligner(AlignConfig(enabled=True, layers=(8, 16), projector_dim=32), teacher).attach(vla)
    with torch.no_grad():
        out = vla(**batch, output_hidden_states=True)
        ours = aligner(pixel_values=batch["pixel_values"]).loss

        x = F.interpolate(batch["pixel_values"][:, :3], size=(256, 256), mode="bilinear")
        mean = torch.tensor([0.484375, 0.455078125, 0.40625]).view(1, 3, 1, 1)
        std = torch.tensor([0.228515625, 0.2236328125, 0.224609375]).view(1, 3, 1, 1)
        target = teacher.model(x * std + mean)  # RADIO normalises [0,1] input itself and drops its 8 prefix tokens
        n = out.projector_features.shape[1]
        ref = 0.0
        for layer in (8, 16):
            student = aligner.projectors[str(layer)](out.hidden_states[layer][:, 1 : 1 + n])
            cos = (F.normalize(target, dim=-1) * F.normalize(student, dim=-1)).sum(-1)
            ref += (-cos).mean()
        ref = 0.2 * ref
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


@pytest.mark.parametrize(
    "name, device, expect",
    [
        ("auto", "cuda", "bfloat16"),
        ("auto", "cpu", "float32"),
        ("bfloat16", "cpu", "bfloat16"),
        ("float16", "cuda", "float16"),
    ],
)
def test_teacher_dtype_auto_is_bf16_on_cuda_only(name, device, expect):
    assert AlignConfig(teacher_dtype=name).resolved_teacher_dtype(device) == expect


@pytest.mark.parametrize("name, expect", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_teacher_runs_in_the_resolved_dtype(vla, name, expect, caplog):
    """The default (auto) keeps a CPU teacher in float32 (CPUs without native bf16 run bf16 ~4x slower) and says so
    once; an explicit dtype keeps its meaning."""
    from openvla_align.tiny.model import TINY_VIT as TINY_ARCH

    config = AlignConfig(enabled=True, projector_dim=32, allow_random_teacher=True, teacher_dtype=name)
    with pytest.warns(UserWarning, match="RANDOM"), caplog.at_level("INFO", logger="openvla_align.aligner"):
        aligner = Aligner.from_config(config, arch=TINY_ARCH).attach(vla)
    assert {p.dtype for p in aligner.teacher.parameters()} == {expect}
    logged = [r.getMessage() for r in caplog.records if "teacher_dtype auto" in r.getMessage()]
    assert logged == (["teacher_dtype auto: the teacher runs in float32 on cpu"] if name == "auto" else [])
