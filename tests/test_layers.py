"""The layers point one way: cli -> search -> train -> {models, distill, data, eval} -> geometry.

Read from the source (every ``import`` statement, also those inside functions), so a lazy
import that crosses a layer is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rkd"

# Modules every layer may use: shared types, errors and I/O helpers with no rkd dependency
# beyond each other.
SHARED = {"rkd", "outputs", "inputs", "errors", "atomic", "storage", "schema", "yamlio", "metrics", "timeline"}
LEAVES = {"models", "distill", "data", "eval"}
ALLOWED = {
    "geometry": set(),
    **{leaf: {"geometry"} for leaf in LEAVES},
    "train": LEAVES | {"geometry"},
    "search": {"train"} | LEAVES | {"geometry"},
    "deploy": {"search", "train"} | LEAVES | {"geometry"},
}
# What KD methods may import besides the standard library and rkd's shared modules: they work
# with any detector framework.
DISTILL_THIRD_PARTY = {"torch", "pywt", "numpy"}


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every absolute import in ``path`` (``from rkd import x`` -> ``rkd.x``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "rkd":  # `from rkd import storage`; `__version__` is the package itself
                found += [(node.lineno, "rkd" if a.name.startswith("__") else f"rkd.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def layer_of(path: Path, package: Path) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    if parts[-1] == "cli" or parts[0] == "cli":
        return "cli"  # a package's cli.py wires its commands into `rkd`: it belongs to the cli layer
    return parts[0] if len(parts) > 1 else parts[0]


def rkd_target(module: str) -> str | None:
    if module == "rkd":
        return "rkd"
    if module.startswith("rkd."):
        return module.split(".")[1]
    return None


def crossings(package: Path) -> list[str]:
    """``file:line: layer imports module`` for every import of ``package`` against the layer order."""
    found = []
    for path in sorted(package.rglob("*.py")):
        layer = layer_of(path, package)
        if layer == "cli":
            continue
        allowed = SHARED | {layer} | ALLOWED.get(layer, set())
        if layer in SHARED:  # shared modules use each other only
            allowed = SHARED
        for line, module in imports(path):
            target = rkd_target(module)
            if target is not None and target not in allowed:
                found.append(f"{path.relative_to(package.parent)}:{line}: {layer} imports {module}")
    return found


def test_layers_point_one_way() -> None:
    found = crossings(PACKAGE)
    assert not found, "imports against the layer order:\n" + "\n".join(found)


def test_distill_needs_only_torch_and_wavelets() -> None:
    outside = []
    for path in sorted((PACKAGE / "distill").rglob("*.py")):
        for line, module in imports(path):
            top = module.split(".")[0]
            if top == "rkd" or top in sys.stdlib_module_names or top in DISTILL_THIRD_PARTY:
                continue
            outside.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module}")
    assert not outside, "rkd.distill imports beyond torch/pywt:\n" + "\n".join(outside)


def test_importing_distill_needs_torch_alone_and_ds2d2_names_pywavelets_when_it_is_missing() -> None:
    import subprocess

    code = (
        "import sys; sys.modules['pywt'] = None; import rkd.distill\n"
        "from rkd.distill.wavelets import check_wavelet\n"
        "try:\n    check_wavelet('haar')\nexcept ImportError as e:\n    print(e)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "needs PyWavelets: pip install PyWavelets" in run.stdout


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        ("models", "from rkd.data.dataset import MEAN", "models imports rkd.data.dataset"),
        ("distill", "import rkd.models", "distill imports rkd.models"),
        ("train", "    from rkd.search import runner", "train imports rkd.search"),
        ("storage.py", "from rkd.train import spec", "storage imports rkd.train"),
    ],
)
def test_a_crossing_is_reported_with_file_and_line(tmp_path: Path, layer: str, source: str, expected: str) -> None:
    """The checker itself, on a made-up package: an upward import is named with its file and line."""
    package = tmp_path / "rkd"
    probe = package / layer if layer.endswith(".py") else package / layer / "probe.py"
    probe.parent.mkdir(parents=True, exist_ok=True)
    body = f"def f():\n{source}\n" if source.startswith(" ") else f"{source}\n"
    header = '"""probe"""\nimport torch\n' + ("" if layer.endswith(".py") else "from rkd.geometry import boxes\n")
    probe.write_text(header + body)
    line = header.count("\n") + (2 if source.startswith(" ") else 1)
    assert crossings(package) == [f"{probe.relative_to(tmp_path)}:{line}: {expected}"]
    # the same imports from the cli layer are fine
    (package / "cli.py").write_text(source.strip() + "\n")
    assert len(crossings(package)) == 1
