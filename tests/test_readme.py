"""The README's command lines compose: every key exists, every value has its type, and nothing a
command requires is left out (files need not exist: composing reads none)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dpvae.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"

#: the command each README line starts with, and the configuration it composes
ROOTS = {"python train.py": "train.yaml", "python -m dpvae.predict": "predict.yaml"}


def _commands() -> list[tuple[str, str, list[str]]]:
    """(line, root file, arguments) of every train / predict command in the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    found = []
    for line in (ln.strip() for block in blocks for ln in block.splitlines()):
        for command, root in ROOTS.items():
            if line == command or line.startswith(command + " "):
                args = shlex.split(line[len(command) :], comments=True)
                found.append((line, root, args))
    return found


COMMANDS = _commands()


def test_the_readme_has_train_and_predict_commands() -> None:
    roots = [root for _, root, _ in COMMANDS]
    assert roots.count("train.yaml") >= 5 and roots.count("predict.yaml") >= 5, COMMANDS


@pytest.mark.parametrize(("line", "root", "args"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_each_readme_command_composes(line: str, root: str, args: list[str]) -> None:
    if "model.regularizer=mine" in args:  # the extension recipe's own option (test_extension)
        pytest.skip("the user-written regularizer of the README's recipe")
    load_config(args, root_file=root)  # a missing required key or an unknown one raises
