"""README stays true: its settings table is the generated one, and every `rvr` command it shows exists
with the flags it uses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from server.cli import TRAINING_COMMANDS, build_parser, run_training_command
from server.settings import settings_table_markdown

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_settings_table_is_current():
    assert settings_table_markdown().strip() in README


def _rvr_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("rvr "):
                lines.append(line)
    return lines


@pytest.mark.parametrize("line", _rvr_lines())
def test_readme_commands_parse(line, capsys):
    argv = shlex.split(line.replace('"$POD_NAME"', "pod-0").replace("[--model DIR]", ""))[1:]
    if argv[0] in TRAINING_COMMANDS:  # parsed by their own module: every flag shown must be in its --help
        assert run_training_command(argv[0], ["--help"]) == 0
        usage = capsys.readouterr().out
        assert all(a in usage for a in argv[1:] if a.startswith("--"))
        return
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown command or flag


@pytest.mark.slow
def test_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, run against a tiny checkpoint (path and output size substituted)."""
    from PIL import Image

    from engine import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "tiny", "tiny")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (96, 64), (200, 40, 40)).save("in.png")
    [block] = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    code = block.replace('"models/RvR-7B-MoT"', repr(str(ckpt))).replace(
        "height=512, width=768", "height=64, width=96"
    )
    code = code.replace("seed=42)", "seed=42, steps=4)")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    with Image.open("refined.png") as refined:
        assert refined.size == (96, 64)
    assert [im.size for im in namespace["images"]] == [(96, 64), (96, 64)]
