"""The ``rkd data`` subcommands: ``stats`` (what is in a dataset), ``check`` (what is wrong with it), ``tile``.

``rkd.cli`` calls :func:`add_commands`. ``check`` exits 1 when it found
problems and 0 when the dataset is clean; bad input (no such folder, an unknown
format) is an :class:`~rkd.errors.RkdError`, exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMAT_HELP = "voc, dior, hrsc, coco, ucas, dota or scenes (classification folders)"


def _formats() -> list[str]:
    from rkd.data.dataset import READERS
    from rkd.data.inspect import SCENES

    return [*READERS, SCENES]


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
        items, names, report = read_split(root, args.format, split, on_error="raise")
        if args.format == SCENES:
            by_split[split] = scene_stats(items, names)
        else:
            by_split[split] = dataset_stats(items, names)
        print(format_stats(by_split[split], f"{root} split {split} ({args.format})", scenes=args.format == SCENES))
    if args.plot:
        from rkd.atomic import atomic_write_bytes

        png = stats_png(by_split, f"{root.name} ({args.format})")
        atomic_write_bytes(Path(args.plot), lambda fh: fh.write(png))
        print(f"plot written to {args.plot}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from rkd.data.inspect import check_dataset

    problems = check_dataset(Path(args.path), args.format, args.split)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {args.path}" if problems else f"{args.path}: no problems found")
    return 1 if problems else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect datasets: statistics, problems, tiling")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("stats", help="images, objects per class, box size and aspect-ratio histograms")
    p.add_argument("path", help="the dataset's root folder")
    p.add_argument("--format", required=True, choices=_formats(), help=FORMAT_HELP)
    p.add_argument("--split", action="append", help="split to describe; repeat for several (default: every split)")
    p.add_argument("--plot", metavar="OUT_PNG", help="also draw the histograms into this PNG")
    p.set_defaults(func=_cmd_stats)

    p = data_sub.add_parser("check", help="list every unreadable image or label (file:line and why); exit 1 if any")
    p.add_argument("path", help="the dataset's root folder")
    p.add_argument("--format", required=True, choices=_formats(), help=FORMAT_HELP)
    p.add_argument("--split", action="append", help="split to check; repeat for several (default: every split found)")
    p.set_defaults(func=_cmd_check)

    try:  # `rkd data tile` lives with the tiling code, which may not be installed in every tree
        from rkd.data.tiling import add_tile_command
    except ImportError:
        add_tile_command = None
    if add_tile_command is not None:
        add_tile_command(data_sub)
