"""``rkd data tile``: a dataset's splits cut into patches (:mod:`rkd.data.tiling`) and written as a
DOTA-format copy, ``<out>/<split>/images/*.png`` + ``labelTxt/*.txt``, with the source's class list.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rkd.atomic import atomic_write_bytes
from rkd.data.tiling import DEFAULT_MIN_AREA_FRACTION, DEFAULT_OVERLAP, DEFAULT_SIZE, check_tiling, tile_sample
from rkd.errors import DataError
from rkd.geometry.boxes import obb_to_poly


def dota_label_text(boxes: Tensor, labels: Tensor, difficult: Tensor, class_names: list[str]) -> str:
    """DOTA ``labelTxt`` lines ``x1 y1 .. x4 y4 class difficult`` of le90 boxes.

    >>> dota_label_text(torch.tensor([[10.0, 20, 4, 2, 0]]), torch.tensor([1]), torch.tensor([True]), ["a", "b"])
    '12.0 21.0 8.0 21.0 8.0 19.0 12.0 19.0 b 1\\n'
    """
    polys = obb_to_poly(boxes.to(torch.float64)).tolist()
    lines = []
    for poly, label, hard in zip(polys, labels.tolist(), difficult.tolist()):
        coords = " ".join(f"{round(c, 2)!r}" for c in poly)
        lines.append(f"{coords} {class_names[label]} {int(hard)}\n")
    return "".join(lines)


@dataclass
class TileReport:
    """What :func:`tile_dataset` wrote."""

    images: int
    patches: int
    objects: int
    image_dir: Path
    label_dir: Path


def tile_dataset(
    root: str | Path,
    fmt: str,
    split: str,
    out_dir: str | Path,
    size: int = DEFAULT_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
) -> TileReport:
    """Write the patches of one split as DOTA: ``out_dir/<split>/images/*.png`` + ``labelTxt/*.txt``."""
    from PIL import Image

    from rkd.data.dota import CLASS_LIST_FILE
    from rkd.data.formats import READERS

    if fmt not in READERS:
        raise DataError(f"unknown dataset format {fmt!r}; expected one of {sorted(READERS)}")
    check_tiling(size, overlap, min_area_fraction)
    records, names, _ = READERS[fmt](Path(root), split)
    bad = [n for n in names if not n or any(ch.isspace() for ch in n)]
    if bad:
        raise DataError(f"{root}: class name {bad[0]!r} cannot be written to a DOTA label line (whitespace)")
    # The class order of the source, so class indices (and a teacher's head) stay the same.
    atomic_write_bytes(Path(out_dir) / CLASS_LIST_FILE, lambda fh: fh.write("".join(f"{n}\n" for n in names).encode()))
    image_dir = Path(out_dir) / split / "images"
    label_dir = Path(out_dir) / split / "labelTxt"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    patches = objects = 0
    for record in records:
        sample = record.load()
        for _, patch in tile_sample(sample, size, overlap, min_area_fraction):
            pixels = Image.fromarray(patch.image.permute(1, 2, 0).numpy())
            atomic_write_bytes(image_dir / f"{patch.image_id}.png", lambda fh, im=pixels: im.save(fh, format="PNG"))
            text = dota_label_text(patch.boxes, patch.labels, patch.difficult, names)
            atomic_write_bytes(label_dir / f"{patch.image_id}.txt", lambda fh, t=text: fh.write(t.encode("utf-8")))
            patches += 1
            objects += len(patch.labels)
    return TileReport(len(records), patches, objects, image_dir, label_dir)


def default_splits(root: Path, fmt: str) -> list[str]:
    """What ``rkd data tile`` cuts without ``--split``: train and val where the folder has them, else
    every split it holds (a flat DOTA folder, ``images/`` + ``labelTxt/``, is the one split ``all``)."""
    from rkd.data.inspect import available_splits  # inspect reads whole datasets; only the CLI needs it

    found = available_splits(Path(root), fmt)
    return [s for s in ("train", "val") if s in found] or found


def _cmd_tile(args: argparse.Namespace) -> int:
    for split in args.split or default_splits(args.path, args.format):
        report = tile_dataset(args.path, args.format, split, args.out, args.size, args.overlap, args.min_area)
        print(
            f"{split}: {report.images} images -> {report.patches} patches, {report.objects} objects "
            f"in {report.image_dir.parent}"
        )
    return 0


def add_tile_command(data_subparsers: Any) -> None:
    """Register ``tile PATH --format F --out DIR [--split S] [--size --overlap --min-area]`` on ``rkd data``."""
    p = data_subparsers.add_parser("tile", help="cut a dataset's images into overlapping patches (DOTA labelTxt)")
    p.add_argument("path", help="the dataset's root folder")
    p.add_argument("--format", required=True, help="its format (a registered reader: ucas, dota, ...)")
    p.add_argument("--out", required=True, help="folder for the DOTA-format copy (<out>/<split>/images, labelTxt)")
    p.add_argument(
        "--split",
        action="append",
        help="split to tile; repeat for several (default: train and val, or the folder's only split)",
    )
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"patch size in pixels (default {DEFAULT_SIZE})")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help=f"pixels shared (default {DEFAULT_OVERLAP})")
    p.add_argument(
        "--min-area",
        type=float,
        default=DEFAULT_MIN_AREA_FRACTION,
        help="keep an object in a patch when this fraction of its area is inside (default 0.7)",
    )
    p.set_defaults(func=_cmd_tile)
