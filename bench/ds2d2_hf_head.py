"""How well DS2D2's high-frequency amplifier head fits the teacher, by width and prior-stage length.

The HF head is trained in DS2D2's prior stage to reproduce a trained teacher's outputs from the
teacher's high wavelet bands (``DS2D2.prior_stage_loss``). This trains one head per
``--channels`` value on a spec's train split, in the prior stage's own way (Adam, one image
batch at a time, the teacher frozen), and prints the same loss on the val split after each
epoch in ``--report``: the lower, the more faithfully the amplifier maps high-frequency feature
differences to the teacher's prediction differences. Teacher outputs are computed once and
reused, as nothing in the prior stage changes them.

    .venv/bin/python bench/ds2d2_hf_head.py --spec examples/ucas50.yaml \\
        --teacher runs/ucas50/teacher/teacher.pt --channels 8 16 32 64
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from rkd.data.dataset import build_dataset, collate_detection
from rkd.distill import build_distiller
from rkd.train.checkpoint import load_detector
from rkd.train.spec import load_spec


def teacher_batches(teacher: torch.nn.Module, data_spec: dict, split: str, batch_size: int) -> list:
    dataset = build_dataset(data_spec, split, train=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    out = []
    with torch.no_grad():
        for images, targets, _ in loader:
            out.append((teacher(images), targets))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="run spec whose data section gives the train/val splits")
    ap.add_argument("--teacher", required=True, help="a trained rkd teacher checkpoint (teacher.pt)")
    ap.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--report", type=int, nargs="+", default=[4, 8, 12], help="epochs after which to score val")
    ap.add_argument("--lr", type=float, default=1e-3, help="the prior stage's default prior_lr")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    spec = load_spec(args.spec)
    teacher, _ = load_detector(args.teacher)
    teacher.eval().requires_grad_(False)
    train = teacher_batches(teacher, spec.data, "train", args.batch)
    val = teacher_batches(teacher, spec.data, "val", args.batch)
    print(
        f"teacher {args.teacher}: {len(train)} train / {len(val)} val batches of {args.batch}; "
        f"lr {args.lr}, torch {torch.__version__}\n"
    )
    print("| hf_channels | " + " | ".join(f"val loss after {e} epochs" for e in args.report) + " | train s |")
    print("|---:|" + "---:|" * (len(args.report) + 1))
    for channels in args.channels:
        torch.manual_seed(0)
        component = build_distiller({"ds2d2": {"hf_channels": channels}}, teacher.info, teacher.info).components[
            "ds2d2"
        ]
        head = component.prior_stage_modules()
        head.train().requires_grad_(True)
        optimizer = torch.optim.Adam(head.parameters(), lr=args.lr)
        scores, start = [], time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
            for i in order.tolist():
                teacher_out, targets = train[i]
                loss = component.prior_stage_loss(teacher_out, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if epoch in args.report:
                with torch.no_grad():
                    scores.append(sum(float(component.prior_stage_loss(t, g)) for t, g in val) / len(val))
        print(f"| {channels} | " + " | ".join(f"{s:.4f}" for s in scores) + f" | {time.perf_counter() - start:.0f} |")


if __name__ == "__main__":
    main()
