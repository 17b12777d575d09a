"""The CLI: every command is listed and parses; `--help` and `teachers` start without importing torch."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from openvla_align.cli import COMMANDS, build_parser, main

LEAVES = [
    (name, *([sub] if isinstance(target, dict) else []))
    for name, (_, target) in COMMANDS.items()
    for sub in (target if isinstance(target, dict) else [None])
]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["teachers"], ["teachers", "dinov2*"]], ids=" ".join)
def test_help_and_teachers_do_not_import_torch(argv):
    code = (
        "import sys\nfrom openvla_align.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)"
    )
    proc = _run(code)
    assert "torch imported: False" in proc.stderr, proc.stderr[-2000:]
    assert ("c-radio-v3-l" in proc.stdout) == (argv == ["teachers"])
    if argv == ["--help"]:
        assert all(name in proc.stdout for name in COMMANDS)


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_every_command_builds_its_own_parser_with_help(path, capsys):
    """Each (sub)command's module adds its parser when that command is named; `--help` prints its description."""
    with pytest.raises(SystemExit) as exit_:
        build_parser([*path, "--help"]).parse_args([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: openvla-align {' '.join(path)}")
    assert len(out.splitlines()) > 3


def test_an_unknown_command_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["mrege"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("openvla-align: argument command: invalid choice: 'mrege' (choose from 'teachers',")


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_every_option_has_help_and_shows_its_default(path):
    import argparse

    from openvla_align.cli import HelpFormatter, walk_parsers

    parser = build_parser(list(path))
    for name in path:  # down to the command's own parser
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    for sub in walk_parsers(parser):
        assert sub.description, f"{sub.prog} has no description"
        assert "example" in (sub.epilog or "").lower() or any(
            isinstance(a, argparse._SubParsersAction) for a in sub._actions
        ), f"{sub.prog} has no example"
        formatter = HelpFormatter(sub.prog)
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{sub.prog} {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in formatter._get_help_string(action).lower()


@pytest.fixture
def inputs(tmp_path):
    """A file where a directory belongs, an image, a directory of images, a non-OpenVLA model directory, a LoRA
    adapter directory and a recipe that is not YAML."""
    import numpy as np
    from PIL import Image

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": null}')
    (tmp_path / "broken.yaml").write_text("suite: ood\nenvs: [a, b\nseeds: 0\n")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "scene.png")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "images" / "0.png")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    return tmp_path


BAD_INPUT = {
    "demo-one-seed": (["demo", "--seeds", "3", "--out", "{t}/o"], r"--seeds needs at least two seeds"),
    "demo-seed-twice": (["demo", "--seeds", "1", "1", "--out", "{t}/o"], r"--seeds names a seed twice"),
    "unknown-teacher-pattern": (
        ["teachers", "radio-v9"],
        r"no registered teacher matches 'radio-v9'; known teachers: ",
    ),
    "attention-empty-model": (
        ["probe", "attention", "--model", "", "--image", "{t}/scene.png", "--prompt", "x", "--out", "{t}/o/a.png"],
        r"write DIR or DIR::ADAPTER",
    ),
    "attention-missing-image": (
        [
            "probe",
            "attention",
            "--model",
            "{t}/bert",
            "--image",
            "{t}/none.png",
            "--prompt",
            "x",
            "--out",
            "{t}/o/a.png",
        ],
        r"Image .*none.png does not exist",
    ),
    "attention-not-openvla": (
        [
            "probe",
            "attention",
            "--model",
            "{t}/bert",
            "--image",
            "{t}/scene.png",
            "--prompt",
            "x",
            "--out",
            "{t}/o/a.png",
        ],
        r"is not an OpenVLA checkpoint",
    ),
    "attention-two-adapters": (
        ["probe", "attention", "--model", "{t}/bert::{t}/ad", "--adapter", "{t}/ad2", "--image", "{t}/scene.png"]
        + ["--prompt", "x", "--out", "{t}/o/a.png"],
        r"already names an adapter",
    ),
    "cache-build-without-weights": (
        ["cache", "build", "{t}/o/cache", "--images", "{t}/images", "--teacher", "c-radio-v3-l", "--device", "cpu"],
        r"needs weights.*--teacher-path \(openvla-align commands\)",
    ),
    "linear-teacher-model-with-teacher-path": (
        ["probe", "linear", "--data", "{t}/images", "--model", "teacher:c-radio-v3-l", "--teacher-path", "{t}/nope"]
        + ["--out", "{t}/o/r.json"],
        r"Teacher weights .*nope for teacher:c-radio-v3-l::.*nope do not exist",  # taken (was refused before)
    ),
    "merge-base-without-config": (
        ["merge", "{t}/adapter", "--base", "{t}/images", "--out", "{t}/o/m"],
        r"Base model .*images' has no config.json: not a checkpoint directory; pass --base",
    ),
    "cache-build-missing-data-root": (
        ["cache", "build", "{t}/o/cache", "--dataset", "sft", "--data-root", "{t}/nope", "--allow-random-teacher"]
        + ["--teacher", "demo-scenes"],
        r"--data-root \(the RLDS root holding the dataset\) '.*nope' does not exist",
    ),
    "cache-build-missing-dataset": (
        ["cache", "build", "{t}/o/cache", "--dataset", "sft", "--data-root", "{t}/images", "--allow-random-teacher"]
        + ["--teacher", "demo-scenes"],
        r"dataset 'sft' under --data-root '.*images/sft' does not exist",
    ),
    "eval-recipe-not-yaml": (
        ["eval", "run", "{t}/broken.yaml", "--vla-path", "{t}/bert"],
        r"broken.yaml:3:6: not valid YAML: expected .,. or .\]., but got .:. \(while parsing a flow sequence\)",
    ),
    "synth-holds-back-everything": (
        ["data", "synth", "{t}/o/synth", "--episodes", "2", "--held-back", "2"],
        r"--held-back 2 must leave at least one of --episodes 2|pip install tensorflow",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_1_and_writes_nothing(case, inputs, capsys):
    from conftest import cli_fails

    argv, message = BAD_INPUT[case]
    cli_fails(capsys, [a.replace("{t}", str(inputs)) for a in argv], message)
    assert not (inputs / "o").exists()


# Usage errors: a value argparse's types reject (exit status 2), named exactly, before any work or any write.
USAGE = {
    "batch-size-negative": (
        ["cache", "build", "{t}/o/cache", "--images", "{t}/images", "--batch-size", "-3"],
        r"argument --batch-size: must be a positive integer, got -3",
    ),
    "shard-rows-zero": (
        ["cache", "build", "{t}/o/cache", "--images", "{t}/images", "--shard-rows", "0"],
        r"argument --shard-rows: must be a positive integer, got 0",
    ),
    "demo-zero-steps": (["demo", "--steps", "0", "--out", "{t}/o"], r"argument --steps: must be a positive integer"),
    "demo-out-is-a-file": (["demo", "--out", "{t}/a-file"], r"argument --out: .*a-file' is a file, not a directory"),
    "demo-lr-not-a-number": (["demo", "--lr", "fast", "--out", "{t}/o"], r"argument --lr: 'fast' is not a number"),
    "demo-zero-threads": (
        ["demo", "--threads", "0", "--out", "{t}/o"],
        r"argument --threads: must be a positive integer",
    ),
    "demo-zero-workers": (
        ["demo", "--workers", "0", "--out", "{t}/o"],
        r"argument --workers: must be a positive integer",
    ),
    "linear-data-is-a-file": (
        ["probe", "linear", "--data", "{t}/a-file", "--model", "teacher:demo-scenes", "--out", "{t}/o/r.json"],
        r"argument --data: directory '.*a-file' is a file, not a directory",
    ),
    "linear-data-missing": (
        ["probe", "linear", "--data", "{t}/nope", "--model", "teacher:demo-scenes", "--out", "{t}/o/r.json"],
        r"argument --data: directory '.*nope' does not exist",
    ),
    "merge-missing-adapter": (
        ["merge", "/missing/path"],
        r"argument adapter: directory '/missing/path' does not exist",
    ),
    "data-build-missing-episodes": (
        ["data", "build", "{t}/missing", "{t}/o/rlds"],
        r"argument episodes_dir: directory '.*missing' does not exist",
    ),
    "data-synth-out-is-a-file": (
        ["data", "synth", "{t}/a-file", "--no-rlds"],
        r"argument out: output directory '.*a-file' is a file, not a directory",
    ),
    "data-synth-out-under-a-file": (
        ["data", "synth", "{t}/a-file/sub", "--no-rlds"],
        r"argument out: output directory '.*a-file/sub' cannot be made: '.*a-file' is a file",
    ),
    "eval-seeds-not-integers": (
        ["eval", "run", "{t}/broken.yaml", "--vla-path", "{t}/bert", "--seeds", "0,x"],
        r"argument --seeds: '0,x' is not a comma-separated list of integers \('x' is not one\)",
    ),
    "eval-seeds-twice": (
        ["eval", "run", "{t}/broken.yaml", "--vla-path", "{t}/bert", "--seeds", "2,2"],
        r"argument --seeds: '2,2' names a value twice",
    ),
    "eval-no-vla-path": (["eval", "run", "{t}/broken.yaml"], r"the following arguments are required: --vla-path"),
}


@pytest.mark.parametrize("case", USAGE, ids=list(USAGE))
def test_usage_errors_are_one_line_exit_2_and_write_nothing(case, inputs, capsys):
    from conftest import cli_fails

    argv, message = USAGE[case]
    before = sorted(inputs.rglob("*"))
    err = cli_fails(capsys, [a.replace("{t}", str(inputs)) for a in argv], message, status=2)
    assert err.endswith("--help)")  # and where to read more
    assert sorted(inputs.rglob("*")) == before


def test_data_synth_checks_for_tensorflow_datasets_before_writing(tmp_path, monkeypatch, capsys):
    import importlib.util

    from conftest import cli_fails

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorflow_datasets" else real(n, *a))
    cli_fails(capsys, ["data", "synth", str(tmp_path / "s")], r"--no-rlds.*needs tensorflow-datasets")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("where", ["first", "after-the-command", "last"])
def test_debug_anywhere_on_the_line_lets_the_traceback_through(where, monkeypatch):
    argv = {"first": ["--debug", "teachers", "radio-v9"], "after-the-command": ["teachers", "--debug", "radio-v9"]}
    argv["last"] = ["teachers", "radio-v9", "--debug"]
    with pytest.raises(LookupError, match="no registered teacher matches 'radio-v9'"):
        main(argv[where])


def test_debug_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENVLA_ALIGN_DEBUG", "1")
    with pytest.raises(LookupError):
        main(["teachers", "radio-v9"])


def test_the_installed_command_exits_1_and_2_with_one_line(tmp_path):
    """The console script itself (not only ``main``): an input error (1) and a usage error (2), one line each."""
    import shutil

    exe = shutil.which("openvla-align", path=str(Path(sys.executable).parent))
    assert exe, "the openvla-align console script is not installed beside this Python"
    error = subprocess.run([exe, "teachers", "radio-v9"], capture_output=True, text=True, timeout=120)
    assert error.returncode == 1 and error.stdout == ""
    assert error.stderr.startswith("openvla-align teachers: no registered teacher") and error.stderr.count("\n") == 1
    usage = subprocess.run([exe, "demo", "--steps", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert usage.returncode == 2 and usage.stdout == "" and usage.stderr.count("\n") == 1, usage.stderr
    assert "argument --steps: must be a positive integer, got 0" in usage.stderr and not list(tmp_path.iterdir())


def test_the_demo_teacher_loads_with_its_path_alone(tmp_path, capsys):
    """The teacher `openvla-align demo` saves (112 px, 8x8 grid) records its resolution: `cache build` and `probe
    linear` load it from --teacher-path alone, where their default grid (16x16) would otherwise mismatch."""
    import json

    import torch
    from assets import write_image_folder

    from openvla_align.teachers import teacher_spec
    from openvla_align.teachers.scenes import SceneTeacher, save_scene_teacher

    torch.manual_seed(0)
    weights = tmp_path / "demo" / "teacher" / "model.safetensors"
    save_scene_teacher(SceneTeacher(teacher_spec("demo-scenes"), grid=(8, 8)), weights)  # as the demo does
    data = write_image_folder(tmp_path / "data", size=64)  # 24 train, 12 val scenes
    teacher = ["--teacher", "demo-scenes", "--teacher-path", str(weights)]
    assert main(["cache", "build", str(tmp_path / "cache"), "--images", str(data), *teacher, "--device", "cpu"]) == 0
    assert "36 frames (36 computed now" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["spec"]["resolution"] == 112

    out = tmp_path / "probe" / "r.json"
    argv = ["probe", "linear", "--data", str(data), "--model", "teacher:demo-scenes", "--teacher-path", str(weights)]
    assert main([*argv, "--out", str(out), "--epochs", "3", "--device", "cpu"]) == 0
    assert 0.0 <= json.loads(out.read_text())["results"][f"teacher:demo-scenes::{weights}"]["top1"] <= 1.0

    # a resolution that contradicts the file: one line naming both, and the way out
    bad = ["cache", "build", str(tmp_path / "c2"), "--images", str(data), *teacher, "--teacher-resolution", "224"]
    from conftest import cli_fails

    cli_fails(capsys, bad, r"was trained at resolution 112, not 224; leave the teacher resolution unset")
    assert not (tmp_path / "c2").exists()


def test_loading_a_model_prints_no_warnings_the_user_cannot_act_on(tmp_path):
    """A model + LoRA adapter through the installed command: stderr holds no library deprecation warnings (torch.jit
    via timm, transformers' renamed cache argument, PEFT's gradient-checkpointing query) and no TensorFlow start-up
    logs (transformers would import TensorFlow where OpenVLA's data stack installed it)."""
    import shutil

    import numpy as np
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from openvla_align.tiny import build_tiny_vla, build_tokenizer, save_tiny_checkpoint

    tok = build_tokenizer()
    vla = build_tiny_vla(vocab_size=len(tok), llm_layers=2, image_size=112)
    save_tiny_checkpoint(tmp_path / "ckpt", vla, tok)
    get_peft_model(vla, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "scene.png")
    exe = shutil.which("openvla-align", path=str(Path(sys.executable).parent))
    argv = [exe, "probe", "attention", "--model", f"{tmp_path / 'ckpt'}::{tmp_path / 'adapter'}", "--layers", "1,2"]
    argv += ["--image", str(tmp_path / "scene.png"), "--prompt", "Is it there?", "--out", str(tmp_path / "a.png")]
    env = {k: v for k, v in os.environ.items() if k not in ("USE_TF", "PYTHONWARNINGS")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [
        line
        for line in proc.stderr.splitlines()
        if re.search(r"warn|deprecat|tensorflow|TensorRT|cuda drivers|cuDNN", line, re.IGNORECASE)
    ]
    assert noise == [], "\n".join(noise)
