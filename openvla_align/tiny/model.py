"""Tiny random-weight models with OpenVLA's module layout and forward semantics: the demo's and the bench's models,
and a smoke test of any tool without a 7B download.

Layout (as upstream ``OpenVLAForActionPrediction``):
    vision_backbone.featurizer        timm ViT, DINOv2-like (patch 14, 4 registers, layer scale)
    vision_backbone.fused_featurizer  timm ViT, SigLIP-like (patch 14, no class token)
    projector.fc1/fc2/fc3             fused-backbone MLP (GELU), vision width -> LLM width
    language_model                    transformers LlamaForCausalLM (>= 18 blocks)
Semantics: each featurizer returns the patch tokens of its second-to-last block; features are concatenated on
the channel axis, projected, and inserted right after BOS; their label positions are IGNORE_INDEX.
With ``num_images_in_input`` set, the model takes OpenVLA-OFT's input layout instead: 6 channels per image, each image
featurized on its own and its tokens concatenated in camera order, the backbone answers
``get_num_images_in_input()`` (so ``vla.families`` sees an OFT model), and ``proprio`` + ``proprio_projector``
append one proprio token after the visual ones (part of ``projector_features``, as in OFT).
These are NOT OpenVLA-7B: widths are tiny and every weight is random.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from ..vla.actions import N_BINS
from ..vla.checkpoint import IGNORE_INDEX, action_prompt

# LlamaConfig's argument -> the tiny config's attribute
LLAMA_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "llm_dim",
    "intermediate_size": "llm_intermediate",
    "num_hidden_layers": "llm_layers",
    "num_attention_heads": "llm_heads",
    "num_key_value_heads": "llm_heads",
    "max_position_embeddings": "max_position_embeddings",
    "pad_token_id": "pad_token_id",
}


class TinyVLAConfig(PretrainedConfig):
    model_type = "tiny_openvla"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        dino_dim: int = 32,
        siglip_dim: int = 48,
        vision_depth: int = 4,
        vision_heads: int = 2,
        llm_dim: int = 64,
        llm_layers: int = 18,
        llm_heads: int = 4,
        llm_intermediate: int = 128,
        vocab_size: int = 768,
        pad_token_id: int = 0,
        attn_implementation_llm: str = "eager",
        lm_head_std: float = 0.25,
        num_images_in_input: Optional[int] = None,
        max_position_embeddings: int = 512,
        **kwargs,
    ):
        # Every argument is an attribute saved in config.json (num_images_in_input None: OpenVLA's layout; an int:
        # OpenVLA-OFT's); pad_token_id and the rest go to PretrainedConfig.
        own = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "pad_token_id", "__class__")}
        for name, value in own.items():
            setattr(self, name, value)
        kwargs.setdefault("tie_word_embeddings", False)  # Llama-2, like OpenVLA's LLM, has an untied output head
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def llama_config(self) -> LlamaConfig:
        cfg = LlamaConfig(
            **{theirs: getattr(self, ours) for theirs, ours in LLAMA_NAMES.items()},
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        cfg._attn_implementation = self.attn_implementation_llm
        return cfg


def _vit(dim: int, depth: int, heads: int, image_size: int, patch: int, siglip: bool) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    tower = dict(img_size=image_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, num_classes=0)
    if siglip:  # SigLIP towers: no class token, GELU(tanh), no layer scale
        vit = VisionTransformer(**tower, class_token=False, global_pool="avg")
    else:  # DINOv2 with registers: class token + 4 registers, layer scale
        vit = VisionTransformer(**tower, reg_tokens=4, no_embed_class=True, init_values=1.0)
        for block in vit.blocks:
            block.ls1, block.ls2 = _LayerScale(block.ls1.gamma), _LayerScale(block.ls2.gamma)
    return vit


class _LayerScale(nn.Module):
    """timm's LayerScale with its parameter named ``scale_factor`` instead of ``gamma``, as in upstream's HF model:
    transformers' loader renames every ``*gamma`` key to ``*weight``, so a trained ``gamma`` would not load back."""

    def __init__(self, gamma: torch.Tensor):
        super().__init__()
        self.scale_factor = nn.Parameter(gamma.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class TinyVisionBackbone(nn.Module):
    def __init__(self, cfg: TinyVLAConfig):
        super().__init__()
        self.featurizer = _vit(cfg.dino_dim, cfg.vision_depth, cfg.vision_heads, cfg.image_size, cfg.patch_size, False)
        self.fused_featurizer = _vit(
            cfg.siglip_dim, cfg.vision_depth, cfg.vision_heads, cfg.image_size, cfg.patch_size, True
        )
        self.embed_dim = cfg.dino_dim + cfg.siglip_dim
        self.use_fused_vision_backbone = True

    @staticmethod
    def _second_to_last(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return vit.get_intermediate_layers(x, n=[len(vit.blocks) - 2])[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat(
            [self._second_to_last(self.featurizer, img), self._second_to_last(self.fused_featurizer, img_fused)], dim=2
        )


class TinyMultiImageBackbone(TinyVisionBackbone):
    """OpenVLA-OFT's input layout: (B, 6 * num_images, H, W), one image at a time, tokens concatenated in order."""

    def __init__(self, cfg: TinyVLAConfig):
        super().__init__(cfg)
        self.num_images_in_input = int(cfg.num_images_in_input)

    def get_num_images_in_input(self) -> int:
        return self.num_images_in_input

    def set_num_images_in_input(self, num_images_in_input: int) -> None:
        self.num_images_in_input = int(num_images_in_input)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        images = torch.split(pixel_values, [6] * self.num_images_in_input, dim=1)
        return torch.cat([super(TinyMultiImageBackbone, self).forward(image) for image in images], dim=1)


class TinyProjector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


@dataclass
class TinyVLAOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    projector_features: Optional[torch.Tensor] = None
    past_key_values: Optional[object] = None  # transformers < 5
    cache: Optional[object] = None  # transformers >= 5 renames ModelOutput's past_key_values to cache


class TinyOpenVLA(PreTrainedModel):
    config_class = TinyVLAConfig
    base_model_prefix = "tiny_openvla"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: TinyVLAConfig):
        super().__init__(config)
        multi = config.num_images_in_input is not None
        self.vision_backbone = (TinyMultiImageBackbone if multi else TinyVisionBackbone)(config)
        self.projector = TinyProjector(self.vision_backbone.embed_dim, config.llm_dim)
        self.language_model = LlamaForCausalLM(config.llama_config())
        # PyTorch's default init bounds a width-64 head's logits to about +-4.6, so LoRA (which never touches the
        # output head, as in OpenVLA) could not make confident predictions; a pretrained head can.
        nn.init.normal_(self.language_model.lm_head.weight, std=config.lm_head_std)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Modules keep PyTorch's/timm's constructor init, drawn under the caller's torch.manual_seed.
        return

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def tie_weights(self, *args, **kwargs) -> None:
        # As upstream's Prismatic model: defer to the LLM (a no-op for Llama-2's untied head).
        self.language_model.tie_weights()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        proprio: Optional[torch.Tensor] = None,
        proprio_projector: Optional[nn.Module] = None,
        **kwargs,
    ) -> TinyVLAOutput:
        use_cache = bool(kwargs.get("use_cache", False))  # as upstream: the prefill may return the LLM's cache
        lm_kwargs = dict(
            output_hidden_states=output_hidden_states, output_attentions=output_attentions, use_cache=use_cache
        )
        if pixel_values is None:
            out = self.language_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **lm_kwargs)
            return self._output(out, None)
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError("input_ids and pixel_values must have the same batch size.")
        patches = self.projector(self.vision_backbone(pixel_values))
        if proprio is not None and proprio_projector is not None:  # OFT: one proprio token after the visual ones
            token = proprio_projector(proprio.reshape(patches.shape[0], -1).to(patches.dtype)).unsqueeze(1)
            patches = torch.cat([patches, token], dim=1)
        embeds = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds[:, :1], patches.to(embeds.dtype), embeds[:, 1:]], dim=1)
        b, n = patches.shape[:2]
        if attention_mask is not None:
            ones = torch.ones((b, n), dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        if labels is not None:
            ignore = torch.full((b, n), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **lm_kwargs)
        return self._output(out, patches)

    @staticmethod
    def _output(out, patches) -> TinyVLAOutput:
        return TinyVLAOutput(
            loss=out.loss,
            logits=out.logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            projector_features=patches,
            past_key_values=out.past_key_values,
        )


def build_tiny_vla(seed: int = 0, **overrides) -> TinyOpenVLA:
    """A tiny random-weight model; the same seed and overrides always give the same weights."""
    torch.manual_seed(seed)
    model = TinyOpenVLA(TinyVLAConfig(**overrides))
    return model.eval()


# --- tokenizer -----------------------------------------------------------------------------------------------

_WORDS = (
    "in out what action should the robot take to put pick place move push the a an on in into onto near left right "
    "center top bottom red green blue yellow cyan magenta white black orange purple carrot plate cup bottle knife "
    "square circle triangle cross board table block sponge spoon eggplant do you see answer yes or no if specify "
    "where of and it is with from up down"
).split()


def build_tokenizer(text_vocab: int = 480, corpus: Sequence[str] = ()):
    """A real byte-level BPE tokenizer, trained offline on a small corpus, with 256 action tokens appended at the
    end of the vocabulary (OpenVLA maps action bins onto the last 256 token ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    lines = list(corpus) + [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 3)]
    lines += [action_prompt(w) for w in _WORDS]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = _merges(bpe)
    start = len(vocab)
    for i in range(N_BINS):
        vocab[f"<act{i}>"] = start + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=512,
        clean_up_tokenization_spaces=False,  # a BPE tokenizer, as Llama's (OpenVLA's tokenizer config says false too)
    )
    return fast


def _merges(bpe) -> List[tuple]:
    import json

    model = json.loads(bpe.to_str())["model"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


# The built-in ViT teacher families at tiny width and depth (no download, milliseconds on CPU); the demo's teacher is
# tiny already and has no architecture to override.
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)
TINY_TEACHER_ARCH = {family: TINY_VIT for family in ("radio", "dinov2", "siglip", "theia", "vggt")}


def tiny_teacher(name: str, seed: int = 0, grid=(16, 16), **kwargs):
    """A registered teacher's real architecture at tiny width/depth with random weights (warns loudly)."""
    from ..teachers import teacher_spec
    from ..teachers.build import build_teacher

    torch.manual_seed(seed)
    arch = TINY_TEACHER_ARCH.get(teacher_spec(name).family)
    return build_teacher(name, allow_random=True, arch=arch, grid=grid, **kwargs)


def save_tiny_checkpoint(directory, model: "TinyOpenVLA", tokenizer) -> None:
    """Write a tiny model + tokenizer; ``openvla_align.vla.checkpoint.load_vla`` loads it like a real checkpoint
    (its config.json ``model_type`` is registered with the loader below: the ``openvla_align.checkpoint_loaders``
    entry point ``tiny_openvla`` in setup.py)."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_tiny_checkpoint(path, attn_implementation=None):
    """The registered loader of ``tiny_openvla`` checkpoints: (model, tokenizer, image_size)."""
    from transformers import PreTrainedTokenizerFast

    model = TinyOpenVLA.from_pretrained(path)
    if attn_implementation:
        model.language_model.config._attn_implementation = attn_implementation
    # the tiny tokenizer's own class: AutoTokenizer would read config.json and warn about its model type
    return model, PreTrainedTokenizerFast.from_pretrained(path), int(model.config.image_size)
