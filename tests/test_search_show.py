"""``rkd space show``: the tree puts every dim under its parent, and the sizes match a hand count."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

from rkd.errors import SpecError
from rkd.search.show import add_commands, discrete_configurations, method_combinations, show_space

SMALL = """\
student:
  model.backbone.width: {choices: [0.25, 0.5, 1.0]}
  model.neck.channels: 32
methods:
  hinton:
    enabled: [true, false]
    form: {choices: [sigmoid, softmax]}
    temperature: {low: 1.0, high: 4.0}
  fitnet:
    enabled: true
    weight: 0.5
  cid:
    feat: true
    head: default
    lightml: default
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def tree(text: str) -> dict[str, str]:
    """Each indented name of the printed tree -> the name of its parent (one level less indented)."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines()[1:]:
        if line == "size":
            break
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stack and not name.startswith("("):
            parents[name] = stack[-1][1]
        stack.append((indent, name))
    return parents


def test_every_dim_is_listed_under_its_parent(tmp_path):
    text = show_space(write(tmp_path, SMALL))
    assert tree(text) == {
        "model.backbone.width": "student",
        "model.neck.channels": "student",
        "hinton": "methods",
        "form": "hinton",
        "temperature": "hinton",
        "fitnet": "methods",
        "weight": "fitnet",
        "cid": "methods",
        "feat": "cid",
        "head": "cid",
        "lightml": "cid",
    }
    # ranges come from Dim.describe(); the switch of an always-on method is fixed
    assert "{0.25, 0.5, 1.0}" in text and "[1, 4] float" in text and "switch = True" in text
    # what the space leaves out keeps the method's declared defaults, and says so
    assert "(defaults: weight=1.0" in text  # hinton's weight
    assert "cls_weight=1.0" in text  # cid's
    # and where rkd's default is not the published value, both (fitnet's adapter init)
    assert "adapter_init='teacher_scale' (published 'plain')" in text


def test_sizes_match_a_hand_count(tmp_path):
    from rkd.search.space import load_space

    space = load_space(write(tmp_path, SMALL))
    # switches: hinton on/off (2), fitnet always on (1), cid on/off (2)
    assert method_combinations(space) == 4
    # width 3 x channels 1 x hinton (off 1 + on form 2 x temperature continuous) x fitnet (on: weight 1)
    # x cid (off 1 + on feat 1 x head 2 x lightml 2) = 3 * 3 * 1 * 5
    assert discrete_configurations(space) == 45
    text = show_space(write(tmp_path, SMALL))
    assert "method combinations:     4 (2 switchable of 3 methods)" in text
    assert "discrete configurations: 45 x continuous ranges = infinite" in text
    assert "continuous dims:         1 (infinite space)" in text


def test_a_finite_space_says_so(tmp_path):
    space = "student:\n  model.backbone.width: {choices: [0.5, 1.0]}\nmethods:\n  hinton:\n    form: default\n"
    text = show_space(write(tmp_path, space))
    # width 2 x hinton (off 1 + on 2)
    assert "discrete configurations: 6\n" in text + "\n"
    assert "(finite space)" in text and "infinite" not in text


def test_an_invalid_space_fails_with_file_and_line(tmp_path):
    path = write(tmp_path, SMALL.replace("    lightml: default", "    lightml: default\n    nope: 3"))
    with pytest.raises(SpecError) as err:
        show_space(path)
    assert str(err.value).startswith(f"{path}:16: methods.cid.nope: unknown parameter")


def test_the_space_show_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rkd")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["space", "show", str(write(tmp_path, SMALL))])
    assert args.func(args) == 0
    assert "method combinations:     4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["space"])  # the action is required
