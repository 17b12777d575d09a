"""The batched LIBERO policies (``eval.policies``) against OpenVLA-OFT's own evaluation code, one observation at a
time: ``experiments.robot.openvla_utils`` (``resize_image_for_policy`` as ``prepare_observation`` calls it, then
``get_vla_action``) with OFT's components built by its own loaders (``get_action_head``, ``get_proprio_projector``,
``get_noisy_action_projector``, ``_apply_film_to_vla``, ``_load_dataset_stats``) on a model loaded as its ``get_vla``
loads it (the stock auto class), minus the Hub query and the modeling-file sync.

The comparison runs in fp32 on the CPU. OFT's ``openvla_utils`` casts to ``torch.bfloat16`` in four places (the
processor's outputs, the components, FiLM's vision backbone); the test seam is that module's ``torch`` name: a proxy
of torch whose ``bfloat16`` is ``float32``, so every line of OFT's code runs unchanged, in fp32. The diffusion head's
starting noise: ``torch.randn`` returns row i's noise during OFT's query of row i (and is asserted to be drawn once).

The tiny checkpoint: OFT's own classes at width 64 (``oft_assets.build_tiny_oft_checkpoint``), a
``dataset_statistics.json`` unlike its config's statistics (OFT's loader puts the file over them), and random-weight
component files written with OFT's classes under OFT's names (``action_head--0_checkpoint.pt`` ..., DDP's ``module.``
prefix included, as OFT's finetune.py saves them). Opt-in like the other OFT tests (``OPENVLA_OFT_SRC`` and OFT's
transformers fork).
"""

from __future__ import annotations

import json
import shutil
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import oft_assets as A
import pytest
import torch

pytestmark = pytest.mark.skipif(A.oft_unavailable() is not None, reason=str(A.oft_unavailable()))

B = 3
TOL = 1e-5  # fp32, batched against one-at-a-time matrix products: measured 7e-8 to 9e-7 (0 for the discrete head)
# two instructions of different token lengths: a batch of B rows runs as two groups
INSTRUCTIONS = [A.LIBERO_INSTRUCTIONS[0], "Pick Up The Black Bowl next to the cookie box", A.LIBERO_INSTRUCTIONS[0]]

VARIANTS = {
    "l1-2img-proprio": (dict(), ["wrist_image"]),  # OFT's LIBERO defaults
    "l1-1img-nocrop": (dict(num_images_in_input=1, use_proprio=False, center_crop=False), []),
    "l1-3img-proprio": (dict(num_images_in_input=3), ["left_wrist_image", "right_wrist_image"]),
    "diffusion-2img-proprio": (
        dict(use_l1_regression=False, use_diffusion=True, num_diffusion_steps_inference=5),
        ["wrist_image"],
    ),
    "film-l1-2img-proprio": (dict(use_film=True, lora_rank=4), ["wrist_image"]),
    "discrete-1img": (dict(use_l1_regression=False, use_proprio=False, num_images_in_input=1), []),
}


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def U():
    A.oft_src()
    from experiments.robot import openvla_utils

    return openvla_utils


@pytest.fixture
def oft_fp32(U, monkeypatch):
    """OFT's openvla_utils as it is, except that its ``torch.bfloat16`` is float32 and no checkpoint is on the Hub."""
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.bfloat16 = torch.float32
    monkeypatch.setattr(U, "torch", proxy)
    monkeypatch.setattr(U, "model_is_on_hf_hub", lambda path: False)
    return U


@pytest.fixture(scope="module")
def base_checkpoint(U, tmp_path_factory):
    ckpt = A.build_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "tiny-oft", seed=0)
    stats = A.oft_norm_stats(seed=1)  # not the config's: OFT's loader uses this file
    (ckpt / "dataset_statistics.json").write_text(json.dumps(stats))
    return ckpt


def settings_of(name):
    from openvla_align.eval.policies import PolicySettings

    return PolicySettings(**VARIANTS[name][0])


def write_components(ckpt: Path, settings, seed: int = 0) -> None:
    """Random-weight components in OFT's classes and file names, for what ``settings`` use."""
    from prismatic.models.action_heads import DiffusionActionHead, L1RegressionActionHead
    from prismatic.models.projectors import NoisyActionProjector, ProprioProjector
    from prismatic.vla.constants import ACTION_DIM
    from transformers import AutoConfig

    llm_dim = AutoConfig.from_pretrained(ckpt, trust_remote_code=True).text_config.hidden_size
    torch.manual_seed(seed)

    def save(module, name):  # as OFT's finetune.py writes a DDP-wrapped component
        torch.save({f"module.{k}": v for k, v in module.state_dict().items()}, ckpt / f"{name}--0_checkpoint.pt")

    if settings.use_l1_regression:
        save(L1RegressionActionHead(input_dim=llm_dim, hidden_dim=llm_dim, action_dim=ACTION_DIM), "action_head")
    if settings.use_diffusion:
        steps = settings.num_diffusion_steps_train
        head = DiffusionActionHead(llm_dim, llm_dim, action_dim=ACTION_DIM, num_diffusion_steps_train=steps)
        save(head, "action_head")
        save(NoisyActionProjector(llm_dim=llm_dim), "noisy_action_projector")
    if settings.use_proprio:
        save(ProprioProjector(llm_dim=llm_dim, proprio_dim=A.LIBERO_PROPRIO_DIM), "proprio_projector")
    if settings.use_film:
        write_film_backbone(ckpt, settings.lora_rank)


def write_film_backbone(ckpt: Path, rank: int) -> None:
    """The FiLM vision backbone as OFT's finetune.py saves it: LoRA (``all-linear``, gaussian) on the model, the FiLM
    wrapper around the LoRA'd backbone, every LoRA B and FiLM layer random (trained, not at their initial zeros)."""
    from peft import LoraConfig, get_peft_model
    from prismatic.models.film_vit_wrapper import FiLMedPrismaticVisionBackbone
    from transformers import AutoModelForVision2Seq

    vla = AutoModelForVision2Seq.from_pretrained(ckpt, torch_dtype=torch.float32, trust_remote_code=True)
    config = LoraConfig(r=rank, lora_alpha=min(rank, 16), lora_dropout=0.0, target_modules="all-linear",
                        init_lora_weights="gaussian")  # fmt: skip
    vla = get_peft_model(vla, config)
    backbone = FiLMedPrismaticVisionBackbone(vision_backbone=vla.model.vision_backbone, llm_dim=vla.model.llm_dim)
    vla.model.vision_backbone = backbone
    with torch.no_grad():
        for name, p in vla.model.vision_backbone.named_parameters():
            if "lora_B" in name or ".scale." in name or ".shift." in name:
                p.normal_(0, 0.05)
    torch.save(vla.model.vision_backbone.state_dict(), ckpt / "vision_backbone--0_checkpoint.pt")


def sensitive_action_tokens(ckpt: Path) -> None:
    """Make the discrete path's argmax depend on each action slot's hidden state. OFT's discrete path takes the
    argmax over the whole vocabulary: a random model's lands below the action tokens everywhere (every slot then
    clips to the same bin), and its action slots' hidden states (their embeddings zeroed) vary in a few directions
    only, around one large shared component, so one action token wins nearly everywhere. Here the LM head keeps only
    the action tokens' rows, random combinations of the directions in which the slots' hidden states vary (measured
    with OFT's own ``predict_action``)."""
    from PIL import Image
    from prismatic.vla.constants import ACTION_TOKEN_BEGIN_IDX
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForVision2Seq, AutoProcessor

    vla = AutoModelForVision2Seq.from_pretrained(str(ckpt), torch_dtype=torch.float32, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(str(ckpt), trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    inputs = processor(f"In: What action should the robot take to {INSTRUCTIONS[1].lower()}?\nOut:", image)
    with torch.no_grad():
        _, hidden = vla.predict_action(**inputs, unnorm_key=A.LIBERO_DATASET, do_sample=False)
    varying = torch.linalg.svd(hidden[0] - hidden[0].mean(0), full_matrices=False).Vh[:3]
    state = load_file(str(ckpt / "model.safetensors"))
    head = state["language_model.lm_head.weight"]
    first, count = ACTION_TOKEN_BEGIN_IDX + 1, vla.vocab_size - ACTION_TOKEN_BEGIN_IDX - 1
    head[:] = 0
    head[first : first + count] = torch.randn((count, 3), generator=torch.Generator().manual_seed(0)) @ varying
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def variant_checkpoint(base: Path, root: Path, name: str) -> Path:
    ckpt = root / name
    if not ckpt.exists():
        shutil.copytree(base, ckpt)
        write_components(ckpt, settings_of(name))
        if name.startswith("discrete"):
            sensitive_action_tokens(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def checkpoints(base_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return lambda name: variant_checkpoint(base_checkpoint, root, name)


def observations(wrist_keys, seed=0, size=256):
    rng = np.random.default_rng(seed)
    obs = {"full_image": rng.integers(0, 256, (B, size, size, 3), dtype=np.uint8)}
    for key in wrist_keys:
        obs[key] = rng.integers(0, 256, (B, size, size, 3), dtype=np.uint8)
    obs["state"] = rng.normal(0, 0.4, (B, A.LIBERO_PROPRIO_DIM))  # some beyond q01/q99: clipped
    return obs


# ------------------------------------------------------------------------------------------------------ OFT's side
def oft_model(U, ckpt, cfg):
    """OFT's ``get_vla`` without its Hub query and modeling-file sync (fp32 through the seam)."""
    from transformers import AutoModelForVision2Seq

    vla = AutoModelForVision2Seq.from_pretrained(
        str(ckpt), torch_dtype=torch.float32, low_cpu_mem_usage=True, trust_remote_code=True
    )
    if cfg.use_film:
        vla = U._apply_film_to_vla(vla, cfg)
    vla.vision_backbone.set_num_images_in_input(cfg.num_images_in_input)
    vla.eval()
    U._load_dataset_stats(vla, str(ckpt))
    return vla


def oft_actions(U, ckpt, settings, obs, instructions, monkeypatch, noise=None) -> np.ndarray:
    """OFT's evaluation, one observation at a time: ``initialize_model``'s components, ``prepare_observation``'s
    resize, ``get_vla_action``."""
    from prismatic.vla.constants import ACTION_DIM, NUM_ACTIONS_CHUNK
    from transformers import AutoProcessor

    cfg = types.SimpleNamespace(pretrained_checkpoint=str(ckpt), unnorm_key=A.LIBERO_DATASET, **asdict(settings))
    vla = oft_model(U, ckpt, cfg)
    processor = AutoProcessor.from_pretrained(str(ckpt), trust_remote_code=True)
    parts = dict(use_film=cfg.use_film)
    if cfg.use_proprio:
        parts["proprio_projector"] = U.get_proprio_projector(cfg, vla.llm_dim, proprio_dim=A.LIBERO_PROPRIO_DIM)
    if cfg.use_l1_regression or cfg.use_diffusion:
        parts["action_head"] = U.get_action_head(cfg, vla.llm_dim)
    if cfg.use_diffusion:
        parts["noisy_action_projector"] = U.get_noisy_action_projector(cfg, vla.llm_dim)
    randn, draws, out = torch.randn, [], []
    for i, text in enumerate(instructions):
        one = {k: U.resize_image_for_policy(v[i], 224) for k, v in obs.items() if k != "state"}
        one["state"] = obs["state"][i].copy()
        if noise is not None:

            def row_noise(*args, size=None, device=None, dtype=None, _i=i, **kw):
                if size != (1, NUM_ACTIONS_CHUNK, ACTION_DIM):
                    return randn(*args, size=size, device=device, dtype=dtype, **kw)
                draws.append(_i)
                return torch.as_tensor(noise[_i : _i + 1]).to(device=device, dtype=dtype)

            monkeypatch.setattr(torch, "randn", row_noise)
        out.append(np.stack(U.get_vla_action(cfg, vla, processor, one, text, **parts)))
        monkeypatch.setattr(torch, "randn", randn)
    if noise is not None:
        assert draws == list(range(len(instructions)))  # one starting noise per query, row i's
    return np.stack(out)


def ours(ckpt, settings, **kw):
    from openvla_align.eval.policies import make_policy
    from openvla_align.vla.checkpoint import load_vla

    return make_policy(load_vla(ckpt, attn_implementation=None, **kw), settings, A.LIBERO_DATASET)


# ------------------------------------------------------------------------------------------------------ tests
def test_image_and_proprio_preparation_is_ofts(oft_fp32):
    """OFT's TF ops on the batch: the same bytes as its one-image functions; the proprio formula to the last bit."""
    from PIL import Image

    from openvla_align.eval.policies import center_crop, normalize_proprio, prepare_image, unnormalize_actions

    U = oft_fp32
    rng = np.random.default_rng(3)
    for shape in [(4, 256, 256, 3), (2, 128, 160, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        resized = prepare_image(images)
        assert resized.dtype == np.uint8 and resized.shape == (len(images), 224, 224, 3)
        np.testing.assert_array_equal(resized, np.stack([U.resize_image_for_policy(im, 224) for im in images]))
        cropped = center_crop(resized)
        want = np.stack([np.asarray(U.center_crop_image(Image.fromarray(im))) for im in resized])
        np.testing.assert_array_equal(cropped, want)
        assert (cropped != resized).any()
    stats = A.oft_norm_stats(seed=2)[A.LIBERO_DATASET]
    stats["proprio"]["mask"] = [True] * 7 + [False]
    states = rng.normal(0, 0.6, (5, A.LIBERO_PROPRIO_DIM))
    ours_ = normalize_proprio(states, stats["proprio"])
    np.testing.assert_array_equal(ours_, np.stack([U.normalize_proprio(s, stats["proprio"]) for s in states]))
    assert (np.abs(ours_) == 1).any() and ours_[:, -1].tolist() == np.clip(states[:, -1], -1, 1).tolist()
    from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction as OFT

    normalized = rng.uniform(-1, 1, (5, 8, 7)).astype(np.float32)
    model = types.SimpleNamespace(get_action_stats=lambda key: stats["action"])
    want = np.stack([OFT._unnormalize_actions(model, n, "k") for n in normalized])  # OFT's method, unbound
    np.testing.assert_array_equal(unnormalize_actions(normalized, stats["action"]), want)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_batched_policy_is_ofts_get_vla_action_row_by_row(oft_fp32, checkpoints, name, monkeypatch):
    from prismatic.vla.constants import ACTION_DIM, NUM_ACTIONS_CHUNK

    from openvla_align.eval.policies import OFTPolicy

    settings, wrist = settings_of(name), VARIANTS[name][1]
    ckpt = checkpoints(name)
    obs = observations(wrist)
    policy = ours(ckpt, settings)
    assert isinstance(policy, OFTPolicy) and policy.open_loop_steps == settings.num_open_loop_steps
    assert (policy.chunk, policy.action_dim) == (NUM_ACTIONS_CHUNK, ACTION_DIM)
    assert policy.loaded.num_images == settings.num_images_in_input
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())[A.LIBERO_DATASET]
    assert policy.stats == stats  # the file's, not the config's
    assert len({len(policy._prompt_ids(t)) for t in INSTRUCTIONS}) == 2, "two prompt lengths: two groups"

    calls = []
    decoder = policy.base.language_model.get_decoder()
    hook = decoder.register_forward_hook(lambda m, args, kw, out: calls.append(kw["inputs_embeds"].shape[0]),
                                         with_kwargs=True)  # fmt: skip
    noise = torch.randn((B, NUM_ACTIONS_CHUNK, ACTION_DIM), generator=torch.Generator().manual_seed(5))
    extra = dict(noise=noise) if settings.use_diffusion else {}
    got = policy(obs, INSTRUCTIONS, **extra)
    hook.remove()
    forwards = settings.num_diffusion_steps_inference if settings.use_diffusion else 1
    assert sorted(calls) == sorted([2, 1] * forwards)  # one forward per group (per DDIM step)

    want = oft_actions(oft_fp32, ckpt, settings, obs, INSTRUCTIONS, monkeypatch, noise if extra else None)
    assert got.shape == want.shape == (B, NUM_ACTIONS_CHUNK, ACTION_DIM) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the rows' observations differ, and so do their actions


def test_openvla_policy_is_batched_decoder_on_ofts_preparation(oft_fp32, tmp_path):
    """An OpenVLA (non-OFT) checkpoint: OFT's resize and centre crop, then ``run.BatchedPolicy``; (B, 1, 7), one
    action per query; its dataset_statistics.json over the config's, as OpenVLA's get_vla."""
    from PIL import Image

    from openvla_align.eval.policies import OpenVLALiberoPolicy, PolicySettings, make_policy
    from openvla_align.eval.run import BatchedPolicy
    from openvla_align.tiny import build_tiny_vla, build_tokenizer, save_tiny_checkpoint
    from openvla_align.vla.checkpoint import load_vla

    U = oft_fp32
    tokenizer = build_tokenizer()
    vla = build_tiny_vla(seed=0, vocab_size=len(tokenizer))
    action = {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}
    vla.config.norm_stats = {"libero_spatial": {"action": action}}
    save_tiny_checkpoint(tmp_path / "ckpt", vla, tokenizer)
    file_action = dict(action, q99=[0.25] * 6 + [1.0])
    (tmp_path / "ckpt" / "dataset_statistics.json").write_text(json.dumps({"libero_spatial": {"action": file_action}}))
    loaded = load_vla(tmp_path / "ckpt")
    obs = observations([])
    with pytest.raises(ValueError, match=r"policy settings use_l1_regression=True, num_images_in_input=2, "):
        make_policy(loaded, PolicySettings(), "libero_spatial")
    policy = make_policy(loaded, PolicySettings.for_openvla(), "libero_spatial")
    assert isinstance(policy, OpenVLALiberoPolicy) and policy.open_loop_steps == 1
    assert policy.policy.q99.tolist() == file_action["q99"]
    got = policy(obs, INSTRUCTIONS)
    images = [np.asarray(U.center_crop_image(Image.fromarray(U.resize_image_for_policy(im, 224)))) for im in
              obs["full_image"]]  # fmt: skip
    want = BatchedPolicy(loaded, "libero_spatial")(images, INSTRUCTIONS)
    assert got.shape == (B, 1, 7)
    np.testing.assert_array_equal(got[:, 0], want)


def test_bad_settings_and_checkpoints_stop_before_the_model_changes(checkpoints, base_checkpoint, tmp_path):
    """Each a one-line error saying what to do, raised before a component loads or the model is changed (camera
    count, LoRA/FiLM)."""
    from safetensors.torch import save_file

    from openvla_align.eval.policies import PolicySettings, make_policy, resolve_unnorm_key
    from openvla_align.vla.checkpoint import load_vla

    l1 = checkpoints("l1-2img-proprio")
    two = tmp_path / "two-heads"
    shutil.copytree(l1, two)
    shutil.copy(two / "action_head--0_checkpoint.pt", two / "action_head--1_checkpoint.pt")
    sidecar = tmp_path / "sidecar"
    shutil.copytree(l1, sidecar)
    (sidecar / "align").mkdir()
    meta = {"openvla-align": json.dumps({"format": 1, "num_images": 1, "teacher_width": 8})}
    save_file({"w": torch.zeros(1)}, str(sidecar / "align" / "projector.safetensors"), metadata=meta)
    assert resolve_unnorm_key(l1, "libero_spatial") == "libero_spatial_no_noops"  # OFT's check_unnorm_key

    missing = FileNotFoundError
    for ckpt, settings, key, error, match in [
        (l1, {}, "libero_spatial", ValueError,
         r"unnorm key 'libero_spatial' is not in .*\(has: \['libero_spatial_no_noops'\]\); name one of them"),
        (l1, dict(use_l1_regression=False, use_diffusion=True), None, missing,
         r"no \*noisy_action_projector\*checkpoint\* file, which use_diffusion=true needs; copy it from the training "
         r"run's checkpoint directory, or set use_diffusion false"),
        (l1, dict(use_film=True), None, missing, r"no \*vision_backbone\*checkpoint\* file, which use_film=true needs"),
        (l1, dict(num_open_loop_steps=9), None, ValueError,
         r"num_open_loop_steps: 9, but a query returns 8 actions \(NUM_ACTIONS_CHUNK\); set at most 8"),
        (l1, dict(use_l1_regression=False), None, ValueError,
         r"without an action head .* OFT's get_vla_action feeds the model neither proprio nor FiLM"),
        (base_checkpoint, {}, None, missing, r"no \*action_head\*checkpoint\* file, which use_l1_regression=true"),
        (two, {}, None, ValueError,
         r"has 2 \*action_head\*checkpoint\* files \(action_head--0_checkpoint.pt, action_head--1_checkpoint.pt\)"),
        (sidecar, {}, None, ValueError,
         r"trained with 1 camera\(s\) per sample \(align/projector.safetensors\), not num_images_in_input=2; set "
         r"num_images_in_input: 1"),
        (checkpoints("diffusion-2img-proprio"), {}, None, ValueError,
         r"action_head--0_checkpoint.pt does not fit OFT's L1RegressionActionHead here \(.*\); use_l1_regression/"
         r"use_diffusion must name the head the run trained"),
        (checkpoints("film-l1-2img-proprio"), dict(use_film=True, lora_rank=8), None, ValueError,
         r"LoRA weights of rank \[4\], not lora_rank=8; set lora_rank to the training run's"),
    ]:  # fmt: skip
        loaded = load_vla(ckpt, attn_implementation=None)
        with pytest.raises(error, match=match) as caught:
            make_policy(loaded, PolicySettings(**settings), key or A.LIBERO_DATASET)
        assert "\n" not in str(caught.value)
        assert loaded.num_images == 1 and loaded.model.vision_backbone.get_num_images_in_input() == 1
        assert not any("lora" in name for name, _ in loaded.model.named_modules())


def test_bad_observations_are_refused_before_the_forward(checkpoints):
    policy = ours(checkpoints("l1-2img-proprio"), settings_of("l1-2img-proprio"))
    obs = observations(["wrist_image"])
    for bad, match in [
        ({k: v for k, v in obs.items() if k != "wrist_image"}, r"num_images_in_input=2 needs 1 wrist image key"),
        (dict(obs, state=obs["state"][:, :7]), r"'state': expected \(3, 8\) proprio states, got \(3, 7\)"),
        (dict(obs, full_image=obs["full_image"].astype(np.float32)), r"'full_image': expected uint8 images"),
        (dict(obs, wrist_image=obs["wrist_image"][:2]), r"3 instructions but image batches of \[3, 2\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            policy(bad, INSTRUCTIONS)
    with pytest.raises(ValueError, match=r"noise: expected \(3, 8, 7\)"):
        policy(obs, INSTRUCTIONS, noise=torch.zeros(2, 8, 7))
