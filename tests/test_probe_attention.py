import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from openvla_align.cli import main
from openvla_align.probe import load_vla, vqa_prompt
from openvla_align.probe.attention import (
    AttentionMaps,
    AttentionWeightsUnavailable,
    add_parser,
    attention_maps,
    parse_layers,
    save_attention_grid,
)
from openvla_align.tiny import build_tiny_vla, save_tiny_checkpoint
from openvla_align.tiny.data import generate_scenes

N_VIS = 256
PROMPT = vqa_prompt("What action should the robot take to put the red cup on the plate?")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("attn_ckpt")
    save_tiny_checkpoint(path, build_tiny_vla(seed=0, vocab_size=len(tokenizer)), tokenizer)
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    scenes = generate_scenes(1, seed=5, size=224)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray((scenes.images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def vla(ckpt):
    return load_vla(ckpt)


def reference_rows(vla, image_path, prompt, seq_positions):
    """Attention rows computed independently: one plain forward, heads averaged, query rows averaged."""
    batch = vla.batch([prompt], [Image.open(image_path).convert("RGB")])
    with torch.no_grad():
        attns = vla.model(**batch, output_attentions=True).attentions
    return [a[0, :, seq_positions, :].float().mean(1) for a in attns]  # per block: (heads, S)


def test_last_token_maps_match_model_attentions(vla, image_path):
    layers = [1, 7, 18]
    res = attention_maps(vla, image_path, PROMPT, "1,7,18")
    n_ids = len(vla.tokenizer(PROMPT).input_ids)
    q = n_ids - 1 + N_VIS  # last prompt token, after BOS + 256 visual tokens
    assert res.maps.shape == (3, 16, 16) and res.maps.dtype == torch.float32
    assert res.query_positions == [n_ids - 1] and res.sequence_positions == [q]
    assert res.layers == layers
    rows = reference_rows(vla, image_path, PROMPT, [q])
    for i, layer in enumerate(layers):
        expected = rows[layer - 1][:, 1 : 1 + N_VIS].mean(0).reshape(16, 16)
        torch.testing.assert_close(res.maps[i], expected, rtol=1e-5, atol=1e-7)
        total = float(res.bos_mass[i] + res.visual_mass[i] + res.text_mass[i])
        assert total == pytest.approx(1.0, abs=1e-5)
        assert float(res.visual_mass[i]) == pytest.approx(float(expected.sum()), rel=1e-5)
        assert float(res.bos_mass[i]) == pytest.approx(float(rows[layer - 1][:, 0].mean()), rel=1e-5)


def test_word_tokens_select_the_right_positions(vla, image_path, tokenizer):
    toks = tokenizer.convert_ids_to_tokens(tokenizer(PROMPT).input_ids)
    cup = [i for i, t in enumerate(toks) if t.lstrip("Ġ") == "cup"]
    assert len(cup) == 1
    res = attention_maps(vla, image_path, PROMPT, 9, tokens="cup")
    assert res.query_positions == cup and res.sequence_positions == [cup[0] + N_VIS]
    assert res.query_text == "cup"
    rows = reference_rows(vla, image_path, PROMPT, [cup[0] + N_VIS])
    torch.testing.assert_close(res.maps[0], rows[8][:, 1 : 1 + N_VIS].mean(0).reshape(16, 16), rtol=1e-5, atol=1e-7)

    # "Do" is split into several tokens by this tokenizer: their attention rows are averaged.
    prompt = vqa_prompt("Do you see cup?")
    res = attention_maps(vla, image_path, prompt, [4], tokens="Do")
    assert len(res.query_positions) >= 2 and "".join(res.query_tokens).lstrip("Ġ") == "Do"
    seq = [p + N_VIS for p in res.query_positions]
    rows = reference_rows(vla, image_path, prompt, seq)
    torch.testing.assert_close(res.maps[0], rows[3][:, 1 : 1 + N_VIS].mean(0).reshape(16, 16), rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="does not occur"):
        attention_maps(vla, image_path, PROMPT, 9, tokens="bottle")


def test_keep_heads_rows_average_to_heads_mean(vla, image_path):
    avg = attention_maps(vla, image_path, PROMPT, "2-3")
    heads = attention_maps(vla, image_path, PROMPT, "2-3", keep_heads=True)
    assert heads.maps.shape == (2, 4, 16, 16)
    torch.testing.assert_close(heads.maps.mean(1), avg.maps)
    assert len(heads.summary()["layers"]["2"]["heads_visual_mass"]) == 4


def test_summary_entropy_and_peak_numbers():
    maps = torch.zeros(2, 16, 16)
    maps[0, 2, 12] = 0.8  # all visual attention on one patch
    maps[1] = 0.5 / 256  # uniform over the grid
    res = AttentionMaps(
        maps,
        [5, 6],
        "In: x\nOut:",
        ["x"],
        "x",
        [1],
        [257],
        torch.tensor([0.2, 0.1]),
        torch.tensor([0.8, 0.5]),
        torch.tensor([0.0, 0.4]),
        Image.new("RGB", (224, 224)),
        "synthetic",
    )
    s = res.summary()["layers"]
    assert s["5"]["entropy"] == 0.0 and s["5"]["peak"] == [2, 12]
    assert s["6"]["entropy"] == pytest.approx(math.log(256)) and s["6"]["entropy_normalized"] == pytest.approx(1.0)
    assert s["6"]["visual_mass"] == pytest.approx(0.5)


def test_cli_writes_png_and_json(ckpt, image_path, tmp_path, capsys):
    out = tmp_path / "maps" / "attn.png"
    argv = "probe attention --device cpu --dtype float32 --layers 10-12,16 --tokens cup".split()
    prompt = ["--prompt", "What action should the robot take to put the red cup on the plate?"]
    assert main([*argv, *prompt, "--model", str(ckpt), "--image", str(image_path), "--out", str(out)]) == 0
    assert out.stat().st_size > 20_000
    with Image.open(out) as im:
        assert im.width > 2 * im.height > 0  # four layer columns in one row
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["prompt"] == PROMPT and summary["query_text"] == "cup" and summary["grid"] == [16, 16]
    assert set(summary["layers"]) == {"10", "11", "12", "16"}
    assert {"visual_mass", "bos_mass", "text_mass", "entropy", "entropy_normalized", "peak"} <= set(
        summary["layers"]["16"]
    )
    assert "visual" in capsys.readouterr().out

    heads_png = save_attention_grid(
        attention_maps(load_vla(ckpt), image_path, PROMPT, "1,2", keep_heads=True),
        tmp_path / "heads.png",
        scale="minmax",
    )
    with Image.open(heads_png) as im:
        assert im.height > im.width  # 4 head rows, 2 layer columns


def test_sdpa_model_is_refused_with_instructions(ckpt, image_path):
    sdpa = load_vla(ckpt, attn_implementation="sdpa")
    with pytest.raises(AttentionWeightsUnavailable, match="attn_implementation='eager'"):
        attention_maps(sdpa, image_path, PROMPT, 4)


@pytest.mark.parametrize("attentions", [None, (), (None,) * 18])
def test_missing_attention_weights_are_refused(ckpt, image_path, monkeypatch, attentions):
    # A model that claims eager but returns no weights (e.g. a kernel swapped in under the config's back).
    vla = load_vla(ckpt)
    monkeypatch.setattr(vla.model, "forward", lambda **kw: SimpleNamespace(attentions=attentions))
    with pytest.raises(AttentionWeightsUnavailable, match="eager"):
        attention_maps(vla, image_path, PROMPT, 4)


def test_bad_layers_and_missing_image(vla, image_path, tmp_path):
    with pytest.raises(ValueError, match=r"out of range.*18 decoder blocks.*1 to 18"):
        attention_maps(vla, image_path, PROMPT, "16-20")
    with pytest.raises(ValueError, match="out of range"):
        attention_maps(vla, image_path, PROMPT, 0)
    with pytest.raises(ValueError, match="not an integer or a range"):
        parse_layers("14-x")
    with pytest.raises(ValueError, match="backwards"):
        parse_layers("24-14")
    assert parse_layers("14,16,20") == [14, 16, 20] and parse_layers("3") == [3] and parse_layers("1-3,2") == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attention_maps(vla, tmp_path / "nope.png", PROMPT, 4)

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    with pytest.raises(SystemExit):  # argparse usage error for a malformed --layers
        parser.parse_args(
            ["attention", "--model", "m", "--image", "i", "--prompt", "p", "--layers", "a-b", "--out", "o.png"]
        )
    args = parser.parse_args(
        [
            "attention",
            "--model",
            str(tmp_path / "no_model"),
            "--image",
            str(tmp_path / "no.png"),
            "--prompt",
            "p",
            "--out",
            str(tmp_path / "o.png"),
        ]
    )
    with pytest.raises(FileNotFoundError, match="no.png"):  # the image is checked before loading any model
        args.func(args)


def test_lora_adapter_is_applied(ckpt, vla, image_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from openvla_align.tiny.model import TinyOpenVLA

    lora = get_peft_model(
        TinyOpenVLA.from_pretrained(ckpt), LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    adapted = load_vla(ckpt, tmp_path / "adapter")
    base = attention_maps(vla, image_path, PROMPT, "3,12", tokens="cup")
    res = attention_maps(adapted, image_path, PROMPT, "3,12", tokens="cup")
    assert res.maps.shape == (2, 16, 16) and res.model_name == str(tmp_path / "adapter")
    assert (res.maps - base.maps).abs().max() > 1e-6  # the LoRA's q/k changes where the word looks


def test_cli_takes_the_adapter_either_way(ckpt, image_path, tmp_path):
    """`--model DIR --adapter A` and `--model DIR::A` are one model: the same maps."""
    import json

    from peft import LoraConfig, get_peft_model

    from openvla_align.cli import main
    from openvla_align.tiny.model import TinyOpenVLA

    lora = get_peft_model(
        TinyOpenVLA.from_pretrained(ckpt), LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    common = ["--image", str(image_path), "--prompt", PROMPT, "--raw-prompt", "--tokens", "cup", "--layers", "3"]
    common += ["--dtype", "float32", "--device", "cpu"]
    spellings = {
        "flag": ["--model", str(ckpt), "--adapter", str(tmp_path / "adapter")],
        "inline": ["--model", f"{ckpt}::{tmp_path / 'adapter'}"],
    }
    for name, model in spellings.items():
        assert main(["probe", "attention", *model, *common, "--out", str(tmp_path / f"{name}.png")]) == 0
    flag, inline = (json.loads((tmp_path / f"{n}.json").read_text()) for n in spellings)
    assert flag == inline and flag["model"] == str(tmp_path / "adapter")
