"""openvla_align.vla.args: the model options every VLA command adds, read back and loaded on tiny checkpoints."""

import argparse
import json
import re

import pytest
import torch

from openvla_align.tiny import build_tiny_vla, save_tiny_checkpoint
from openvla_align.vla.args import ModelArgs
from openvla_align.vla.checkpoint import CameraView


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """A tiny OpenVLA checkpoint, one in OFT's 2-camera layout, and a directory that passes as a PEFT adapter."""
    root = tmp_path_factory.mktemp("args")
    for name, cameras in (("vla", None), ("oft", 2)):
        model = build_tiny_vla(vocab_size=len(tokenizer), llm_layers=2, image_size=56, num_images_in_input=cameras)
        save_tiny_checkpoint(root / name, model, tokenizer)
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return root


def parse(spelling: ModelArgs, argv):
    parser = argparse.ArgumentParser()
    spelling.add(parser)
    return parser.parse_args([str(a) for a in argv])


def test_parse_then_load_a_checkpoint(checkpoints):
    model = ModelArgs()
    args = parse(model, ["--model", checkpoints / "vla", "--device", "cpu", "--dtype", "fp32"])
    assert model.spec(args) == (str(checkpoints / "vla"), None)
    assert model.device_dtype(args) == ("cpu", "fp32")
    vla = model.load(args)
    assert (vla.path, vla.adapter, vla.num_images) == (str(checkpoints / "vla"), None, 1)
    assert vla.dtype == torch.float32 and vla.device.type == "cpu"
    assert vla.attn_implementation() == "eager"


def test_the_camera_options_reach_the_model(checkpoints):
    model = ModelArgs()
    args = parse(model, ["--model", checkpoints / "oft", "--device", "cpu", "--num-images", "2", "--images", "primary"])
    assert (model.view(args).num_images, model.view(args).images) == (2, "primary")
    assert model.load(args).num_images == 2
    with pytest.raises(SystemExit):
        parse(model, ["--model", checkpoints / "oft", "--num-images", "0"])


def test_defaults_without_options():
    args = parse(ModelArgs(), ["--model", "m"])
    assert (args.adapter, args.device, args.dtype, args.num_images, args.images) == (None, None, None, None, "all")
    cuda = torch.cuda.is_available()
    assert ModelArgs().device_dtype(args) == (("cuda", "bfloat16") if cuda else ("cpu", "float32"))


def test_options_for_entry_points_that_load_models_themselves():
    args = parse(ModelArgs(many=True), ["--device", "cpu", "--num-images", "2"])
    options = ModelArgs(many=True).options(args)
    assert options == {"device": "cpu", "dtype": "float32", "view": CameraView(2, "all")}
    assert ModelArgs(many=True, cameras=False).options(args) == {"device": "cpu", "dtype": "float32"}


def test_eval_spelling_names_its_flag_and_keeps_its_dtype(checkpoints, tmp_path):
    model = ModelArgs(flag="--vla-path", cameras=False, dtype="bfloat16", attn_implementation=None)
    args = parse(model, ["--vla-path", checkpoints / "vla", "--device", "cpu"])
    assert args.vla_path == str(checkpoints / "vla") and args.dtype == "bfloat16"
    assert not hasattr(args, "num_images") and model.view(args).is_default
    assert model.load(args, device="cpu").dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        parse(model, [])  # required


def test_an_adapter_either_way_is_one_model(checkpoints):
    model, vla, adapter = ModelArgs(), str(checkpoints / "vla"), str(checkpoints / "adapter")
    by_flag = parse(model, ["--model", vla, "--adapter", adapter])
    inline = parse(model, ["--model", f"{vla}::{adapter}"])
    assert model.spec(by_flag) == model.spec(inline) == (vla, adapter)
    both = parse(model, ["--model", f"{vla}::{adapter}", "--adapter", adapter])
    with pytest.raises(ValueError, match="already names an adapter; drop --adapter"):
        model.spec(both)


def test_bad_models_fail_before_loading_naming_the_flag(checkpoints, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(f"--model {str(missing)!r} does not exist")):
        ModelArgs().load(parse(ModelArgs(), ["--model", missing]))
    eval_run = ModelArgs(flag="--vla-path", cameras=False)
    with pytest.raises(FileNotFoundError, match=re.escape(f"--vla-path {str(tmp_path)!r} has no config.json")):
        eval_run.spec(parse(eval_run, ["--vla-path", tmp_path]))
    no_adapter = parse(ModelArgs(), ["--model", checkpoints / "vla", "--adapter", checkpoints / "oft"])
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json: not a PEFT adapter"):
        ModelArgs().spec(no_adapter)
    with pytest.raises(ValueError, match=re.escape("--vla-path 'm::': write DIR or DIR::ADAPTER")):
        eval_run.spec(parse(eval_run, ["--vla-path", "m::"]))


def test_several_models_take_the_adapter_on_the_single_vla():
    models = ModelArgs(many=True, others=("teacher:",))
    assert models.models(parse(models, [])) == []
    args = parse(models, ["--model", "teacher:t", "--model", "base", "--adapter", "lora"])
    assert models.models(args) == ["teacher:t", "base::lora"]
    args = parse(models, ["--model", "a", "--model", "b::c", "--adapter", "lora"])
    message = "--adapter lora with 2 VLA --model: write each model as DIR::ADAPTER instead."
    with pytest.raises(ValueError, match=re.escape(message)):
        models.models(args)
    with pytest.raises(ValueError, match="--model 'b::': write DIR or DIR::ADAPTER"):
        models.models(parse(models, ["--model", "a", "--model", "b::"]))
