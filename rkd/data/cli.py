"""The ``rkd data`` subcommands: ``stats`` (what is in a dataset), ``check`` (what is wrong with it), ``tile``.

``rkd.cli`` calls :func:`add_commands`. ``check`` exits 1 when it found
problems and 0 when the dataset is clean; bad input (no such folder, an unknown
format) is an :class:`~rkd.errors.RkdError`, exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMAT_HELP = "voc, dior, hrsc, coco, ucas, dota or scenes (classification folders)"
CLASSES_HELP = "class names, comma-separated, or a known list: dota-v1.0, dota-v1.5, dota-v2.0"


def class_list(text: str | None) -> list[str] | None:
    """``--classes``: a known list's name (``dota-v1.0``) or comma-separated names.

    >>> len(class_list("dota-v1.0")), class_list("car, plane")
    (15, ['car', 'plane'])
    """
    from rkd.data.dota import DOTA_CLASSES, named_classes

    if text is None:
        return None
    if text in DOTA_CLASSES:
        return named_classes(text)
    return [name.strip() for name in text.split(",") if name.strip()]


def _formats() -> list[str]:
    from rkd.data.formats import READERS
    from rkd.data.inspect import SCENES

    return [*READERS, SCENES]


def format_name(text: str) -> str:
    """``--format``'s check, run when the option is given (the readers import torch; building rkd's
    parser must not, as ``rkd predict`` runs without it)."""
    if text not in _formats():
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(_formats())})")
    return text


def _cmd_stats(args: argparse.Namespace) -> int:
    from rkd.data.inspect import (
        SCENES,
        available_splits,
        dataset_stats,
        format_stats,
        read_split,
        scene_stats,
        stats_png,
    )

    root = Path(args.path)
    splits = args.split or available_splits(root, args.format)
    by_split = {}
    for split in splits:
        # Statistics of what can be read; the lines left out are counted (rkd data check lists them).
        items, names, report = read_split(root, args.format, split, classes=args.classes, on_error="skip")
        if args.format == SCENES:
            by_split[split] = scene_stats(items, names)
        else:
            by_split[split] = dataset_stats(items, names)
        print(format_stats(by_split[split], f"{root} split {split} ({args.format})", scenes=args.format == SCENES))
        if report.skipped:
            print(f"  {len(report.skipped)} problem(s): lines or files left out (rkd data check lists them)")
    if args.plot:
        from rkd.atomic import atomic_write_bytes

        png = stats_png(by_split, f"{root.name} ({args.format})")
        atomic_write_bytes(Path(args.plot), lambda fh: fh.write(png))
        print(f"plot written to {args.plot}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from rkd.data.inspect import check_dataset

    problems = check_dataset(Path(args.path), args.format, args.split, args.classes)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {args.path}" if problems else f"{args.path}: no problems found")
    return 1 if problems else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect datasets: statistics, problems, tiling")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("stats", help="images, objects per class, box size and aspect-ratio histograms")
    p.add_argument("path", help="the dataset's root folder")
    p.add_argument("--format", required=True, type=format_name, help=FORMAT_HELP)
    p.add_argument("--split", action="append", help="split to describe; repeat for several (default: every split)")
    p.add_argument("--plot", metavar="OUT_PNG", help="also draw the histograms into this PNG")
    p.add_argument("--classes", type=class_list, help=CLASSES_HELP)
    p.set_defaults(func=_cmd_stats)

    p = data_sub.add_parser("check", help="list every unreadable image or label (file:line and why); exit 1 if any")
    p.add_argument("path", help="the dataset's root folder")
    p.add_argument("--format", required=True, type=format_name, help=FORMAT_HELP)
    p.add_argument("--split", action="append", help="split to check; repeat for several (default: every split found)")
    p.add_argument("--classes", type=class_list, help=CLASSES_HELP)
    p.set_defaults(func=_cmd_check)

    try:  # `rkd data tile` lives with the tiling code, which may not be installed in every tree
        from rkd.data.tiled_copy import add_tile_command
    except ImportError:
        add_tile_command = None
    if add_tile_command is not None:
        add_tile_command(data_sub)
