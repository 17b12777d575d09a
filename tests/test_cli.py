"""The CLI: every command is listed and parses; `--help` and `teachers` start without importing torch."""

import subprocess
import sys

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
    with pytest.raises(SystemExit):
        main(["mrege"])
    assert "invalid choice: 'mrege'" in capsys.readouterr().err


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
    """A file where a directory belongs, an image, a directory of images and a non-OpenVLA model directory."""
    import numpy as np
    from PIL import Image

    (tmp_path / "a-file").write_text("x")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "scene.png")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "images" / "0.png")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    return tmp_path


BAD_INPUT = {
    "unknown-teacher-pattern": (
        ["teachers", "radio-v9"],
        r"no registered teacher matches 'radio-v9'; known teachers: ",
    ),
    "demo-out-is-a-file": (["demo", "--out", "{t}/a-file"], r"--out .*a-file is a file; give a directory"),
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


def test_data_synth_checks_for_tensorflow_datasets_before_writing(tmp_path, monkeypatch, capsys):
    import importlib.util

    from conftest import cli_fails

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorflow_datasets" else real(n, *a))
    cli_fails(capsys, ["data", "synth", str(tmp_path / "s")], r"--no-rlds.*needs tensorflow-datasets")
    assert not (tmp_path / "s").exists()


def test_debug_lets_the_traceback_through(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        main(["--debug", "demo", "--out", str(tmp_path / "f")])
    monkeypatch.setenv("OPENVLA_ALIGN_DEBUG", "1")
    with pytest.raises(NotADirectoryError):
        main(["demo", "--out", str(tmp_path / "f")])
