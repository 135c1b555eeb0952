"""``rkd space show FILE``: a search space as a tree, with how large it is.

The tree lists the searched student paths, then each KD method with its on/off
switch and the parameters sampled only while it is on. Sizes:

* method combinations: how many on/off patterns the switches allow;
* discrete configurations: distinct settings of the finite dims (choices, ints,
  fixed values), counted with the conditions, i.e. a method's parameters only
  multiply the count of the combinations where it is on;
* whether continuous (float) ranges exist, which make the space infinite.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the space module needs torch (the KD registry); building rkd's parser must not
    from rkd.search.space import Dim, SearchSpace


def method_combinations(space: SearchSpace) -> int:
    """Number of on/off patterns of the method switches (fixed switches count once)."""
    return math.prod(_switch(space, m).size() for m in space.methods())


def discrete_configurations(space: SearchSpace) -> int:
    """Distinct settings of the finite dims, respecting the method switches.

    Each method contributes ``(1 if it can be off) + (product of its params' finite sizes
    if it can be on)``; continuous dims are left out (see :func:`has_continuous`).
    """
    total = math.prod(_finite(d) for d in space.dims if d.condition is None and not _is_switch(d))
    for method in space.methods():
        switch = _switch(space, method)
        values = (switch.value,) if switch.kind == "fixed" else switch.choices
        on = math.prod(_finite(d) for d in _params(space, method))
        total *= (1 if False in values else 0) + (on if True in values else 0)
    return total


def has_continuous(space: SearchSpace) -> bool:
    return any(math.isinf(d.size()) for d in space.dims)


def format_space(space: SearchSpace) -> str:
    student = [d for d in space.dims if d.name.startswith("student.")]
    lines = [f"search space {space.file}"]
    rows: list[tuple[str, str, str]] = []  # (label, range, size) before aligning
    rows.append(("student", "", ""))
    if not student:
        rows.append(("  (the spec's student, unchanged)", "", ""))
    for d in student:
        rows.append((f"  {d.name[len('student.') :]}", d.describe(), _size(d)))
    rows.append(("methods", "", ""))
    if not space.methods():
        rows.append(("  (none: the student trains without KD)", "", ""))
    for method in space.methods():
        switch = _switch(space, method)
        rows.append((f"  {method}", "switch " + switch.describe(), _size(switch)))
        params = _params(space, method)
        for d in params:
            rows.append((f"    {d.name.rsplit('.', 1)[1]}", d.describe(), _size(d)))
        # Parameters the space leaves out keep the method's defaults: show them so the
        # tree says everything the trial will run with.
        named = {d.name.rsplit(".", 1)[1] for d in params}
        rest = [
            f"{p}={v.default!r}" + ("" if v.published is None else f" (published {v.published!r})")
            for p, v in space.declared_params(method).items()
            if p not in named
        ]
        if rest:
            rows.append((f"    (defaults: {', '.join(rest)})", "", ""))
    width = max(len(label) for label, r, _ in rows if r) if any(r for _, r, _ in rows) else 0
    rwidth = max((len(r) for _, r, _ in rows), default=0)
    for label, rng, size in rows:
        lines.append(f"{label.ljust(width)}  {rng.ljust(rwidth)}  {size}".rstrip() if rng else label)
    switchable = sum(_switch(space, m).kind == "choice" and _switch(space, m).size() > 1 for m in space.methods())
    discrete = discrete_configurations(space)
    continuous = has_continuous(space)
    lines += [
        "size",
        f"  method combinations:     {method_combinations(space)} "
        f"({switchable} switchable of {len(space.methods())} methods)",
        f"  discrete configurations: {discrete}" + (" x continuous ranges = infinite" if continuous else ""),
        f"  continuous dims:         {sum(math.isinf(d.size()) for d in space.dims)}"
        + (" (infinite space)" if continuous else " (finite space)"),
    ]
    return "\n".join(lines)


def show_space(path: str | Path, task: str = "detection") -> str:
    """Load (and so validate) the space at ``path`` and format it; errors carry file:line."""
    from rkd.search.space import load_space
    from rkd.train.tasks import TASKS

    return format_space(load_space(path, registry=TASKS[task].method_registry()))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``rkd space show FILE`` (wired into the top-level parser by :mod:`rkd.cli`)."""
    p = sub.add_parser("space", help="inspect a search space file")
    actions = p.add_subparsers(dest="space_action", required=True)
    s = actions.add_parser("show", help="print a search space as a tree with its size")
    s.add_argument("file", help="the search space (YAML)")
    s.add_argument(
        "--task",
        choices=["detection", "classification"],
        default="detection",
        help="whose KD methods the space refers to (default: detection)",
    )
    s.set_defaults(func=_cmd_show)


def _cmd_show(args: argparse.Namespace) -> int:
    print(show_space(args.file, args.task))
    return 0


def _is_switch(d: Dim) -> bool:
    return d.name.startswith("methods.") and d.name.count(".") == 1


def _switch(space: SearchSpace, method: str) -> Dim:
    return next(d for d in space.dims if d.name == f"methods.{method}")


def _params(space: SearchSpace, method: str) -> list[Dim]:
    return [d for d in space.dims if d.condition == f"methods.{method}"]


def _finite(d: Dim) -> int:
    size = d.size()
    return 1 if math.isinf(size) else int(size)


def _size(d: Dim) -> str:
    size = d.size()
    return "(continuous)" if math.isinf(size) else f"({int(size)})"
