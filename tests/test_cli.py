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
