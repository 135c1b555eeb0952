"""No import cycles between modules (read from the source: see tests/import_graph.py)."""

from __future__ import annotations

from pathlib import Path

from import_graph import import_cycles, import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "rkd"


def test_rkd_has_no_import_cycle() -> None:
    """Between any two modules of rkd/, lazy imports inside functions included: a cycle means two
    modules that cannot be read (or changed) one without the other."""
    graph = import_graph(PACKAGE)
    # the graph is read, not empty: a known edge of each layer is there
    assert "rkd.distill.base" in graph["rkd.distill.detection.fitnet"]
    assert "rkd.train.checkpoint" in graph["rkd.train.tasks.base"]
    assert len(graph) > 100
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in rkd/:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_a_cycle_is_found(tmp_path: Path) -> None:
    """The checker itself, on a made-up package: a lazy import closing a cycle counts, TYPE_CHECKING does not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg import a\n")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n")
    (package / "d.py").write_text("import pkg.c\n")
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.c"] == set()
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]
