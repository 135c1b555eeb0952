"""UCAS-AOD (ucas50) baseline: an oriented RetinaNet trained directly for a fixed CPU wall-clock budget.

Plain PyTorch loop in one process (no Ray, no KD): AdamW, linear warmup then a
constant learning rate, gradient clipping, val mAP50 (oriented IoU) with
``rkd.train.evaluate.evaluate`` every few epochs and at the end. Each
configuration gets the same budget of training wall-clock seconds (evaluation
time is not charged to it). Prints the curve and the final number per config.

    .venv/bin/python bench/ucas_baseline.py --budget 720 --threads 2 [--configs lite0_pretrained convnet_scratch]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from rkd.data.dataset import build_dataset, collate_detection, validate_data_spec
from rkd.models import build_detector, count_flops
from rkd.train.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ucas50"
CONFIGS = {
    "lite0_pretrained": {
        "kind": "retinanet",
        "boxes": "obb",
        "backbone": {"name": "efficientnet_lite0", "pretrained": True},
        "neck": {"channels": 64},
    },
    "convnet_scratch": {
        "kind": "retinanet",
        "boxes": "obb",
        "backbone": {"name": "convnet", "width": 1.0},
        "neck": {"channels": 64},
    },
}


def run(name: str, model_spec: dict, data_spec: dict, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    train_set = build_dataset(data_spec, "train", train=True)
    val_set = build_dataset(data_spec, "val", train=False)
    model = build_detector(model_spec, num_classes=len(data_spec["classes"]))
    flops = count_flops(model, data_spec["input_size"])
    print(
        f"== {name}: {flops.gflops:.2f} GFLOPs at {data_spec['input_size']} px, {flops.params / 1e6:.2f} M params; "
        f"{len(train_set)} train / {len(val_set)} val images; budget {args.budget} s",
        flush=True,
    )
    loader = DataLoader(
        train_set,
        batch_size=args.batch,
        shuffle=True,
        collate_fn=collate_detection,
        generator=torch.Generator().manual_seed(0),
        drop_last=True,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    print("epoch  train_s  loss     val_mAP50", flush=True)
    trained, step, epoch, result = 0.0, 0, 0, None
    while trained < args.budget:
        epoch += 1
        model.train()
        start, losses = time.time(), []
        for images, targets, _ in loader:
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            out = model(images, targets)
            loss = sum(out.losses.values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            step += 1
            if math.isfinite(loss.item()):
                losses.append(loss.item())
            if trained + time.time() - start >= args.budget:
                break
        trained += time.time() - start
        last = trained >= args.budget
        line = f"{epoch:5d}  {trained:7.0f}  {sum(losses) / max(len(losses), 1):.4f}"
        if epoch % args.eval_every == 0 or last:
            result = evaluate(model, val_set, num_classes=len(data_spec["classes"]), batch_size=4).result
            line += f"   {result.map:.4f}  per class {dict((k, round(v, 3)) for k, v in result.per_class.items())}"
        print(line, flush=True)
    print(f"final {name}: val mAP50 {result.map:.4f} after {epoch} epochs ({step} steps, {trained:.0f} s)", flush=True)
    return result.map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=720.0, help="training seconds per config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=50, help="steps of linear warmup")
    parser.add_argument("--eval-every", type=int, default=3, help="epochs")
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_spec = validate_data_spec(
        {"format": "ucas", "root": str(ROOT), "classes": ["plane", "car"], "input_size": args.input_size}
    )
    for name in args.configs:
        run(name, CONFIGS[name], data_spec, args)


if __name__ == "__main__":
    main()
