"""Every `openvla-align` example in README.md, so the README cannot drift from the CLI.

Examples that need no outside data run, with tiny inputs substituted for their paths (`teachers`, `data synth`,
`patch` on a copy of OPENVLA_SRC when it is set); every other one is parsed exactly as the CLI parses it.
"""

import importlib.util
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from openvla_align.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
SEPARATORS = {"&&", "||", ";", "|"}


def readme_examples():
    """(line, argv after `openvla-align`) for every command in the README's bash blocks (comments ignored)."""
    examples = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            for i, token in enumerate(tokens):
                at_start = i == 0 or tokens[i - 1] in SEPARATORS  # not `pip install openvla-align`
                if (token == "openvla-align" and at_start) or token.endswith("/openvla-align"):
                    rest = tokens[i + 1 :]
                    end = next((j for j, t in enumerate(rest) if t in SEPARATORS), len(rest))
                    examples.append((" ".join(tokens[i : i + 1 + end]), rest[:end]))
    return examples


EXAMPLES = readme_examples()


def test_the_readme_has_examples_of_every_command():
    commands = {argv[0] for _, argv in EXAMPLES}
    assert {"demo", "teachers", "patch", "merge", "data", "eval", "probe", "cache", "bench"} <= commands


@pytest.mark.parametrize("argv", [argv for _, argv in EXAMPLES], ids=[line for line, _ in EXAMPLES])
def test_every_readme_example_parses(argv, monkeypatch):
    from openvla_align import argtypes

    for check in ("need_dir", "need_file", "need_output_dir"):  # the examples' paths are not on this machine
        monkeypatch.setattr(argtypes, check, lambda path, *args, **kwargs: Path(path))
    argv = [a.replace("$SLURM_ARRAY_TASK_ID", "3") for a in argv]  # what SLURM puts there, in an array job
    args = build_parser(argv).parse_args(argv)
    assert callable(args.func)


def _example(prefix):
    (argv,) = [argv for _, argv in EXAMPLES if argv[: len(prefix)] == prefix]
    return argv


def test_teachers_example_runs(capsys):
    assert main(_example(["teachers"])) == 0
    assert "c-radio-v3-l" in capsys.readouterr().out


def test_data_synth_example_runs_or_says_what_to_install(tmp_path, capsys):
    argv = [str(tmp_path / "tiny-data") if a == "/tmp/tiny-data" else a for a in _example(["data", "synth"])]
    code = main(argv)
    if importlib.util.find_spec("tensorflow_datasets") is None:
        assert code == 1 and "pip install tensorflow==2.15.0 tensorflow_datasets==4.9.3" in capsys.readouterr().err
        assert not (tmp_path / "tiny-data").exists()  # nothing written before the check
        return
    assert code == 0
    assert len(list((tmp_path / "tiny-data" / "episodes").glob("*.npz"))) == 8
    assert list((tmp_path / "tiny-data" / "rlds").rglob("dataset_info.json"))


@pytest.mark.skipif(not os.environ.get("OPENVLA_SRC"), reason="OPENVLA_SRC is unset: the patch example is parsed only")
def test_patch_example_runs_on_a_copy_of_upstream(tmp_path, capsys):
    checkout = tmp_path / "openvla"
    shutil.copytree(os.environ["OPENVLA_SRC"], checkout, ignore=shutil.ignore_patterns(".git", "*.orig"))
    argv = [str(checkout) if a == "/path/to/openvla" else a for a in _example(["patch", "/path/to/openvla"])]
    assert main(argv) == 0
    assert main(["patch", "--check", str(checkout)]) == 0
    assert "patched" in capsys.readouterr().out
