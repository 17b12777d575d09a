"""A tiny random-weight OpenVLA built from a real OpenVLA checkout's own HF classes (``OPENVLA_SRC``).

:func:`build_tiny_openvla_checkpoint` writes a checkpoint of upstream's ``prismatic/extern/hf`` classes, loadable
with ``AutoModelForVision2Seq`` / ``AutoProcessor`` and ``trust_remote_code=True``: the bench's policy model and the
end-to-end tests' (which add a tiny RLDS build, ``tests/assets.py``).

Everything upstream is imported at call time; nothing from OpenVLA is vendored into this repository (the three
``prismatic/extern/hf/*.py`` files are copied next to the weights only, at runtime).
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ..norms import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD
from ..vla.actions import ACTION_DIM
from ..vla.checkpoint import action_prompt

HF_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
# The same shape as the released openvla/openvla-7b files.
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_prismatic.OpenVLAConfig",
    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
}
PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
    "AutoProcessor": "processing_prismatic.PrismaticProcessor",
}
# The tiny checkpoints' towers: a registered pico ViT/14 (timm's VisionTransformer in DINOv2's register-token layout,
# width 48, 2 blocks): the same 16x16 patch grid at 224 px and the same module paths as the 7B towers. OpenVLA's and
# OFT's scripts load in bf16, which CPUs without bf16 hardware run ~25x slower than fp32: one training step with two
# ViT-S/14 towers took ~90 s here, ~2 s with these. Registered in this process by `register_pico_vit` (the checkpoint
# builder calls it) and in a script's processes by a `sitecustomize` (`write_pico_sitecustomize`).
PICO_VIT = "vit_pico_patch14_reg4_openvla_test"
PICO_VIT_SOURCE = f"""
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


@register_model
def {PICO_VIT}(pretrained=False, **kwargs):
    args = dict(patch_size=14, embed_dim=48, depth=2, num_heads=2, init_values=1e-5, reg_tokens=4, no_embed_class=True)
    kwargs = {{k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}}
    model = VisionTransformer(**dict(args, **kwargs))
    model.pretrained_cfg = model.default_cfg = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return model
"""
TINY_TIMM_IDS = [PICO_VIT, PICO_VIT]
RARE_CHAR_START, N_RARE_CHARS = 0x4E00, 320  # CJK unified ideographs
LLAMA2_VOCAB_SIZE, LLAMA2_SPACE_ID = 32000, 29871  # Llama-2's vocabulary and its "▁" id (predict_action appends it)


def register_pico_vit() -> str:
    """Register the pico towers (``PICO_VIT``) with timm in this process; returns the model id."""
    import types

    import timm

    if PICO_VIT not in timm.list_models(PICO_VIT):
        module = types.ModuleType("openvla_pico_vit")  # timm's registry looks the function's module up in sys.modules
        sys.modules[module.__name__] = module
        exec(compile(PICO_VIT_SOURCE, "openvla_align.tiny.openvla.PICO_VIT_SOURCE", "exec"), module.__dict__)
    return PICO_VIT


def write_pico_sitecustomize(directory: os.PathLike) -> Path:
    """A ``sitecustomize.py`` in ``directory`` that registers the pico towers at interpreter start: put
    ``directory`` on a script's ``PYTHONPATH`` so its processes can build the tiny checkpoints' towers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(PICO_VIT_SOURCE)
    return directory


def openvla_src(src: Optional[os.PathLike] = None) -> Path:
    """The OpenVLA checkout (argument, else ``$OPENVLA_SRC``), put on ``sys.path`` so ``prismatic`` imports."""
    src = src if src is not None else os.environ.get("OPENVLA_SRC")
    if not src:
        raise RuntimeError("Set OPENVLA_SRC to an OpenVLA checkout (the directory holding `prismatic/`).")
    path = Path(src).resolve()
    if not (path / "prismatic" / "extern" / "hf").is_dir():
        raise FileNotFoundError(f"{path} is not an OpenVLA checkout: prismatic/extern/hf is missing")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


def _hf_module(name: str):
    return importlib.import_module(f"prismatic.extern.hf.{name}")


# --------------------------------------------------------------------------------------------------- tokenizer
def _corpus(rng: np.random.Generator, n_lines: int = 4000):
    words = (
        "pick place put the red blue green block cube bowl on in to open close drawer robot action should take "
        "what move left right In: Out: ? up down grasp push pull a of and with"
    ).split()
    letters = list("abcdefghijklmnopqrstuvwxyz")
    for _ in range(n_lines):
        parts = []
        for _ in range(int(rng.integers(4, 14))):
            if rng.random() < 0.6:
                parts.append(words[int(rng.integers(len(words)))])
            else:
                parts.append("".join(rng.choice(letters, size=int(rng.integers(2, 9)))))
        yield " ".join(parts)
    # Rare single characters, each seen twice: sentencepiece appends characters after the merges, least frequent
    # last, so these fill the top of the vocabulary -- like the CJK tail of Llama-2's -- and stay atomic when the
    # action string is re-tokenized inside a prompt.
    rare = [chr(RARE_CHAR_START + i) for i in range(N_RARE_CHARS)]
    for _ in range(2):
        yield " ".join(rare)


def build_tiny_llama_tokenizer(
    out_dir: os.PathLike, vocab_size: int = 1024, seed: int = 0, id_space: int = LLAMA2_VOCAB_SIZE
):
    """Train a Llama-style sentencepiece BPE offline (unk=0, bos=1, eos=2, byte fallback) and add ``<PAD>``.

    ``vocab_size`` pieces are trained; with ``id_space`` > ``vocab_size`` they are laid out in Llama-2's id space
    (see :func:`_llama_id_layout`), so upstream code that hard-codes Llama-2 ids (``predict_action`` appends
    29871, "▁") runs unchanged. ``id_space=None`` keeps the trained ids.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(np.random.default_rng(seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        split_digits=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    spm_path = out_dir / "tokenizer.model"
    spm_path.write_bytes(model.getvalue() if not id_space else _llama_id_layout(model.getvalue(), id_space))
    tokenizer = LlamaTokenizerFast(vocab_file=str(spm_path), legacy=True, add_bos_token=True, add_eos_token=False)
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})  # as OpenVLA: pad id == base vocab size
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = 2048
    _check_action_tail(tokenizer)
    return tokenizer


def _llama_id_layout(model_bytes: bytes, id_space: int) -> bytes:
    """Re-lay a trained sentencepiece model in Llama-2's id space: the trained pieces keep their order (and scores,
    which decide BPE merges), "▁" moves to id 29871 as in Llama-2, the rare single characters stay at the very top
    (OpenVLA's 256 action bins), and UNUSED filler pieces (never produced by encoding) take the ids in between."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # sentencepiece releases without the bundled proto module
        from transformers.utils import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    pieces = list(proto.pieces)
    if id_space <= len(pieces) or id_space <= LLAMA2_SPACE_ID:
        raise ValueError(f"id_space={id_space} must exceed the {len(pieces)} trained pieces and id {LLAMA2_SPACE_ID}")
    rare = {chr(RARE_CHAR_START + i) for i in range(N_RARE_CHARS)}
    top = [p for p in pieces if p.piece in rare]
    space = [p for p in pieces if p.piece == "\u2581"]
    head = [p for p in pieces if p.piece not in rare and p.piece != "\u2581"]
    if len(space) != 1 or len(top) != N_RARE_CHARS:
        raise RuntimeError("tiny tokenizer: the trained model lacks the '\u2581' piece or the rare-character tail")

    def fillers(n: int, start: int):
        out = []
        for i in range(n):
            filler = pb.ModelProto.SentencePiece()
            filler.piece, filler.score, filler.type = f"<unused{start + i}>", 0.0, pb.ModelProto.SentencePiece.UNUSED
            out.append(filler)
        return out

    layout = head + fillers(LLAMA2_SPACE_ID - len(head), 0)
    layout += space + fillers(id_space - len(top) - len(layout) - 1, LLAMA2_SPACE_ID - len(head))
    layout += top
    del proto.pieces[:]
    proto.pieces.extend(layout)
    assert len(proto.pieces) == id_space and proto.pieces[LLAMA2_SPACE_ID].piece == "\u2581"
    return proto.SerializeToString()


def _check_action_tail(tokenizer, n_bins: int = 256) -> None:
    """The top ``n_bins`` base ids must survive decode -> re-encode inside a prompt (as RLDSBatchTransform does)."""
    top = tokenizer.vocab_size
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(top - n_bins, top, ACTION_DIM).tolist()
        text = action_prompt("pick up the block") + " " + tokenizer.decode(ids)
        encoded = tokenizer(text, add_special_tokens=False).input_ids
        if encoded[-ACTION_DIM:] != ids:
            raise RuntimeError(f"tiny tokenizer: action ids {ids} re-tokenize as {encoded[-ACTION_DIM:]}")


# --------------------------------------------------------------------------------------------------- checkpoint
def bounds_stats(rng: np.random.Generator, dim: int) -> Dict:
    """Random per-dimension statistics in OpenVLA's format (mean, std, max, min, q01, q99) around [-0.5, 0.5]."""
    low = -np.abs(rng.normal(0.5, 0.1, dim))
    high = np.abs(rng.normal(0.5, 0.1, dim))
    return {
        "mean": ((low + high) / 2).tolist(),
        "std": ((high - low) / 4).tolist(),
        "max": (high * 1.1).tolist(),
        "min": (low * 1.1).tolist(),
        "q01": low.tolist(),
        "q99": high.tolist(),
    }


def _norm_stats(dataset: str, rng: np.random.Generator) -> Dict:
    action = {**bounds_stats(rng, ACTION_DIM), "mask": [True] * (ACTION_DIM - 1) + [False]}
    proprio = {k: [0.0] * ACTION_DIM for k in ("mean", "std", "max", "min", "q01", "q99")}
    return {dataset: {"action": action, "proprio": proprio, "num_transitions": 30, "num_trajectories": 6}}


def build_tiny_openvla_checkpoint(
    out_dir: os.PathLike,
    seed: int = 0,
    *,
    src: Optional[os.PathLike] = None,
    dataset: str = "sft",
    hidden_size: int = 64,
    num_layers: int = 18,
    vocab_size: int = 1024,
    norm_stats: Optional[Dict] = None,
    timm_model_ids: Sequence[str] = tuple(TINY_TIMM_IDS),
    intermediate_size: Optional[int] = None,
    num_heads: int = 4,
) -> Path:
    """Save a tiny random OpenVLA (upstream classes) + processor to ``out_dir``; returns ``out_dir``.

    Fused DINOv2/SigLIP-style backbone shape (two pico ViT/14 towers, ``PICO_VIT``, at 224 px => 256 patches; any
    timm ids via ``timm_model_ids``), an 18-layer Llama of width ``hidden_size`` (``intermediate_size`` default
    twice that, ``num_heads`` heads), 256 action bins, norm stats under ``dataset`` (random 7-d ones, or
    ``norm_stats`` as given: ``{dataset: {"action": ..., "proprio": ...}}``). Loads with the stock AutoClasses and
    ``trust_remote_code=True``. ``src`` is any checkout whose ``prismatic/extern/hf`` holds OpenVLA's three files
    (OpenVLA's, or OpenVLA-OFT's: the classes and copied files are the checkout's).
    """
    import torch
    from transformers import LlamaConfig

    src_path = openvla_src(src)
    if PICO_VIT in timm_model_ids:
        register_pico_vit()
    cfg_mod, model_mod, proc_mod = (_hf_module(n.removesuffix(".py")) for n in HF_FILES)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    tokenizer = build_tiny_llama_tokenizer(out_dir / "_spm", vocab_size=vocab_size, seed=seed)
    pad_id = tokenizer.pad_token_id
    pad_multiple = 64
    padded_vocab = ((len(tokenizer) + pad_multiple - 1) // pad_multiple) * pad_multiple

    text_config = LlamaConfig(
        vocab_size=padded_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        pad_token_id=pad_id,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    ).to_dict()
    config = cfg_mod.OpenVLAConfig(
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp",
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        text_config=text_config,
        llm_max_length=2048,
        pad_token_id=pad_id,
        pad_to_multiple_of=pad_multiple,
        norm_stats=norm_stats if norm_stats is not None else _norm_stats(dataset, rng),
        n_action_bins=256,
        # Extra kwargs land as attributes after the backbone-id lookup, so these override the 7B towers.
        timm_model_ids=list(timm_model_ids),
        timm_override_act_layers=[None, None],
        image_sizes=[224, 224],
        torch_dtype="float32",
    )
    assert config.timm_model_ids == list(timm_model_ids), config.timm_model_ids
    config.auto_map = dict(MODEL_AUTO_MAP)

    torch.manual_seed(seed)
    model = model_mod.OpenVLAForActionPrediction(config).float().eval()
    model.save_pretrained(out_dir, safe_serialization=True)

    image_processor = proc_mod.PrismaticImageProcessor(
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        input_sizes=[(3, 224, 224), (3, 224, 224)],
        interpolations=["bicubic", "bicubic"],
        means=[IMAGENET_MEAN, SIGLIP_MEAN],
        stds=[IMAGENET_STD, SIGLIP_STD],
    )
    processor = proc_mod.PrismaticProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # auto_map makes AutoProcessor/AutoImageProcessor resolve the remote code; register_for_auto_class writes it.
    image_processor.auto_map = dict(PROCESSOR_AUTO_MAP)
    processor.save_pretrained(out_dir)
    _patch_json(out_dir / "preprocessor_config.json", {"auto_map": dict(PROCESSOR_AUTO_MAP)})
    _patch_json(
        out_dir / "processor_config.json",
        {"auto_map": {"AutoProcessor": PROCESSOR_AUTO_MAP["AutoProcessor"]}, "processor_class": "PrismaticProcessor"},
        create=True,
    )
    _patch_json(
        out_dir / "tokenizer_config.json",
        {"processor_class": "PrismaticProcessor", "auto_map": {"AutoProcessor": PROCESSOR_AUTO_MAP["AutoProcessor"]}},
    )
    shutil.rmtree(out_dir / "_spm", ignore_errors=True)

    hf_dir = src_path / "prismatic" / "extern" / "hf"
    for name in HF_FILES:
        shutil.copyfile(hf_dir / name, out_dir / name)
    return out_dir


def _patch_json(path: Path, update: Dict, create: bool = False) -> None:
    import json

    if not path.exists() and not create:
        return
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(update)
    path.write_text(json.dumps(data, indent=2) + "\n")
