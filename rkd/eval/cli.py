"""``rkd evaluate``: mAP of prediction files against a dataset's labels.

Ground truth is read with the dataset format's reader; predictions are DOTA
Task1 files (a folder of ``Task1_<class>.txt``, or one such file) or a JSON
list (``.json``), see :mod:`rkd.eval.predictions`. Predictions on patches
(ids ``<scene>__1__<x0>___<y0>`` as ``rkd data tile`` names them) are put back
into their scenes and merged by class-wise rotated NMS first
(:mod:`rkd.eval.merge`), so the numbers are about whole scenes.

``mAP`` is VOC/DOTA AP at ``--iou`` averaged over classes with ground truth;
``mAP50`` and ``mAP75`` are the same at IoU 0.5 and 0.75. The protocol is the
DOTA devkit's (``dota_evaluation_task1.py``, the same as the VOC devkit's):
all-point AP, each detection judged against its best-overlapping ground truth
(matching ``"voc"``, :mod:`rkd.eval.matching`), difficult objects ignored. The IoU
is that of the polygons as written when the labels or the predictions are
polygons (DOTA, DIOR-R and UCAS-AOD labels, Task1 files, JSON ``poly``), else of
the rotated boxes; the output says which (``protocol``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rkd.data.cli import CLASSES_HELP, class_list
from rkd.errors import DataError

if TYPE_CHECKING:  # the evaluation itself imports torch when it runs, not when rkd's parser is built
    import torch


def read_predictions(source: Path, class_names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Task1 folder or file, or a ``.json`` list; labels index ``class_names``."""
    from rkd.eval.predictions import read_dota_task1, read_json_predictions

    if not source.exists():
        raise DataError(f"{source}: prediction file or folder not found")
    if source.is_file() and source.suffix.lower() == ".json":
        return read_json_predictions(source, class_names)
    if source.is_dir() and not any(source.glob("Task1_*.txt")):
        raise DataError(f"{source}: no Task1_<class>.txt files in this folder")
    return read_dota_task1(source, class_names)


AP_KIND = "all-point"  # VOC 2010+ / DOTA: area under the precision envelope
MATCHING = "voc"


def evaluate_files(
    gt_root: Path,
    gt_format: str,
    pred: Path,
    split: str | None = None,
    iou_threshold: float = 0.5,
    merge_iou: float | None = None,
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """``{"mAP", "mAP50", "mAP75", "per_class": {name: {"ap", "ap50", "ap75", "num_gt"}}, "protocol": {...}}``.

    ``split`` ``None``: the folder's only split, else ``val``. ``protocol`` says how it was
    measured: ``{"iou": "polygon" | "rotated-box", "ap": "all-point", "matching": "voc",
    "difficult": "ignored", "split", "skipped_lines"}`` (see module doc). Label lines the
    reader leaves out (degenerate polygons) are counted in ``skipped_lines`` and listed on stderr.
    """
    import torch

    from rkd.data.formats import READERS
    from rkd.data.inspect import default_split
    from rkd.eval.map import evaluate_detections
    from rkd.eval.merge import DEFAULT_MERGE_IOU, merge_patch_predictions

    merge_iou = DEFAULT_MERGE_IOU if merge_iou is None else merge_iou

    if gt_format not in READERS:
        raise DataError(f"--gt-format {gt_format!r}: expected one of {sorted(READERS)}")
    if not 0 < iou_threshold < 1:
        raise DataError(f"--iou {iou_threshold}: must be between 0 and 1")
    split = default_split(Path(gt_root), gt_format) if split is None else split
    records, names, report = READERS[gt_format](Path(gt_root), split, classes)
    for line in report.skipped:
        print(f"rkd: warning: {line}", file=sys.stderr)
    known = {r.image_id for r in records}
    predictions = read_predictions(Path(pred), names)
    # Only ids the split does not hold are patches to merge: a tiled dataset's own ids look like patch ids too.
    patches = {i: det for i, det in predictions.items() if i not in known}
    predictions = {i: det for i, det in predictions.items() if i in known}
    for scene, det in merge_patch_predictions(patches, merge_iou).items():
        if scene in predictions:
            raise DataError(f"{pred}: image {scene!r} has predictions both on the whole scene and on its patches")
        predictions[scene] = det
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise DataError(
            f"{pred}: predictions for image {unknown[0]!r} ({len(unknown)} unknown ids), "
            f"which is not in split {split!r} of {gt_root}"
        )
    empty = {"boxes": torch.zeros(0, 5), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    # Polygons as written on both sides where the files have them (DOTA's IoU); else the rotated boxes.
    detections = [_as_given(predictions.get(r.image_id, empty)) for r in records]
    truths = [{"boxes": _ground_truth_boxes(r), "labels": r.labels, "difficult": r.difficult} for r in records]
    results = {
        t: evaluate_detections(detections, truths, len(names), iou_threshold=t, matching=MATCHING)
        for t in dict.fromkeys([iou_threshold, 0.5, 0.75])
    }
    main, ap50, ap75 = results[iou_threshold], results[0.5], results[0.75]
    per_class = {
        names[c]: {"ap": main.per_class[c], "ap50": ap50.per_class[c], "ap75": ap75.per_class[c], "num_gt": n}
        for c, n in main.num_gt.items()
    }
    protocol = {
        "iou": main.iou,
        "ap": AP_KIND,
        "matching": MATCHING,
        "difficult": "ignored",
        "split": split,
        "skipped_lines": len(report.skipped),
    }
    return {"mAP": main.map, "mAP50": ap50.map, "mAP75": ap75.map, "per_class": per_class, "protocol": protocol}


def _ground_truth_boxes(record: Any) -> torch.Tensor:
    """The polygons as written when the reader kept them (:class:`rkd.data.parsing.PolygonRecord`), else the boxes."""
    polygons = getattr(record, "polygons", None)
    return record.boxes if polygons is None else polygons


def _as_given(det: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detections with their polygons as the IoU's input when the file gave them (Task1, JSON)."""
    return {**det, "boxes": det["polys"]} if "polys" in det else det


def format_report(result: dict[str, Any], iou_threshold: float) -> str:
    """The per-class table and the three means, as printed by ``rkd evaluate``."""
    rows = result["per_class"]
    width = max([len("class"), *(len(name) for name in rows)])
    lines = [f"{'class':<{width}}  {'num_gt':>6}  {f'AP@{iou_threshold:g}':>8}  {'AP50':>6}  {'AP75':>6}"]
    for name, row in rows.items():
        lines.append(
            f"{name:<{width}}  {row['num_gt']:>6d}  {row['ap']:>8.4f}  {row['ap50']:>6.4f}  {row['ap75']:>6.4f}"
        )
    lines.append(f"mAP@{iou_threshold:g} {result['mAP']:.4f}  mAP50 {result['mAP50']:.4f}  mAP75 {result['mAP75']:.4f}")
    if "protocol" in result:
        p = result["protocol"]
        lines.append(
            f"protocol: IoU {p['iou']}, {p['ap']} AP, {p['matching']} matching, difficult {p['difficult']}, "
            f"split {p['split']}, {p['skipped_lines']} label line(s) skipped"
        )
    return "\n".join(lines)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    result = evaluate_files(
        Path(args.gt), args.gt_format, Path(args.pred), args.split, args.iou, args.merge_iou, args.classes
    )
    print(json.dumps(result) if args.json else format_report(result, args.iou))
    return 0


def add_commands(sub: Any) -> None:
    """Register ``rkd evaluate`` on the top-level subparsers."""
    p = sub.add_parser("evaluate", help="mAP of DOTA Task1 / JSON predictions against a dataset's labels")
    p.add_argument("--gt", required=True, help="the dataset's root folder")
    p.add_argument("--gt-format", required=True, help="its format (a registered reader: ucas, dota, ...)")
    p.add_argument("--pred", required=True, help="a folder of Task1_<class>.txt files, one such file, or a .json list")
    p.add_argument("--split", help="the split to evaluate on (default: the folder's only split, else val)")
    p.add_argument("--classes", type=class_list, help=CLASSES_HELP)
    p.add_argument("--iou", type=float, default=0.5, help="IoU a match needs, for 'mAP' (default 0.5)")
    p.add_argument(
        "--merge-iou",
        type=float,
        help="NMS IoU when merging patch predictions into scenes (default: the DOTA devkit's merge IoU)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_cmd_evaluate)
