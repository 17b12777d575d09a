import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from openvla_align.hooks import VisualTokenHook
from openvla_align.vla.layout import NotAnOpenVLAModel, check_layers

from conftest import make_batch


def lora(model):
    cfg = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="gaussian")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # make LoRA change the forward, so the hook must see the adapted states
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("wrap", [False, True])
def test_hook_equals_output_hidden_states(vla, tokenizer, batch_size, wrap):
    layers = (1, 8, 16, 17, 18)  # 18 = last block: HF returns the final-normed state there
    model = lora(vla) if wrap else vla
    batch = make_batch(tokenizer, batch_size, pad_to=40)  # right padding, as OpenVLA's collator
    assert (batch["attention_mask"] == 0).any()
    with VisualTokenHook(model, layers) as hook:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        captured = hook.pop()
    n = out.projector_features.shape[1]
    assert n == 256
    for layer in layers:
        expect = out.hidden_states[layer][:, 1 : 1 + n]
        assert captured[layer].shape == (batch_size, n, 64)
        torch.testing.assert_close(captured[layer], expect, atol=1e-6, rtol=0)


def test_pop_clears_and_remove_detaches(vla, batch):
    hook = VisualTokenHook(vla, (16,)).attach()
    with torch.no_grad():
        vla(**batch)
    assert set(hook.pop()) == {16}
    assert hook.pop() == {}  # nothing kept past the step
    hook.remove()
    with torch.no_grad():
        vla(**batch)
    assert hook.pop() == {} and not hook.attached


def test_text_only_forward_captures_nothing(vla, batch):
    with VisualTokenHook(vla, (16,)) as hook, torch.no_grad():
        vla(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert hook.pop() == {}


def test_encoder_target_captures_vision_backbone_output(vla, batch):
    with VisualTokenHook(vla, (16,), target="encoder") as hook, torch.no_grad():
        expect = vla.vision_backbone(batch["pixel_values"])
        vla(**batch)
        torch.testing.assert_close(hook.pop()[0], expect)


@pytest.mark.parametrize("layer", [0, 19, 40])
def test_layer_out_of_range(vla, layer):
    with pytest.raises(ValueError, match=r"out of range: this LLM has 18 decoder blocks, so layers run from 1 to 18"):
        check_layers(vla, (layer,))


def test_non_openvla_models_are_refused():
    with pytest.raises(NotAnOpenVLAModel, match="OpenVLA-style model with `vision_backbone`"):
        VisualTokenHook(nn.Linear(2, 2), (16,))

    class NoDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_backbone = nn.Identity()
            self.projector = nn.Identity()
            self.language_model = nn.Linear(2, 2)

    with pytest.raises(NotAnOpenVLAModel, match="has no decoder stack"):
        VisualTokenHook(NoDecoder(), (16,))

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(NotAnOpenVLAModel, match="vision_backbone"):
        VisualTokenHook(llama, (1,))
