"""Scene classification folders: ``root/<split>/<Class>/<image>`` (as AID ships).

Not a detection format (no boxes), so it is not in ``READERS``: the
classification task calls :func:`read_scenes` directly. Class names are the
sub-folder names, sorted, unless given: then labels follow the given order,
folders of other classes are left out (training on a subset of the classes is
the point of listing them) and a listed class without a folder is a problem (a
typo would otherwise train without that class). Any other file under the split (a stray
file next to the class folders, a non-image in a class folder) is a problem
too, so nothing is skipped silently. Pixels are not read here; ``rkd data
check`` decodes every image.

>>> import tempfile
>>> from PIL import Image
>>> with tempfile.TemporaryDirectory() as d:
...     for cls in ("Beach", "Airport"):
...         (Path(d) / "train" / cls).mkdir(parents=True)
...         Image.new("RGB", (8, 8)).save(Path(d) / "train" / cls / "a.jpg")
...     items, names, report = read_scenes(Path(d), "train")
...     names, [(p.parent.name, label) for p, label in items], report.images
(['Airport', 'Beach'], [('Airport', 0), ('Beach', 1)], 2)
"""

from __future__ import annotations

from pathlib import Path

from rkd.data.images import IMAGE_SUFFIXES, require_dir
from rkd.data.sample import OnError, ReadReport


def read_scenes(
    root: Path, split: str, classes: list[str] | None = None, on_error: OnError = "raise"
) -> tuple[list[tuple[Path, int]], list[str], ReadReport]:
    """``([(image path, label)], class names, report)`` of one split, sorted by class then file name."""
    report = ReadReport(on_error=on_error)
    split_dir = require_dir(Path(root) / split, f"scene split {split!r}")
    folders = []
    for path in sorted(split_dir.iterdir()):
        if path.is_dir():
            folders.append(path)
        else:
            report.problem(str(path), "a file next to the class folders (expected <split>/<Class>/<image>)")
    if classes is None:
        names = [f.name for f in folders]
    else:
        names = list(classes)
        found = {f.name for f in folders}
        for name in names:
            if name not in found:
                report.problem(str(split_dir / name), f"no folder for the listed class {name!r} in split {split!r}")
        folders = [f for f in folders if f.name in set(names)]
        folders.sort(key=lambda f: names.index(f.name))
    label_of = {name: i for i, name in enumerate(names)}
    items: list[tuple[Path, int]] = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append((path, label_of[folder.name]))
            else:
                report.problem(str(path), f"not an image file ({', '.join(IMAGE_SUFFIXES)})")
    report.images = len(items)
    return items, names, report
