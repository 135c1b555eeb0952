"""Linear probe of EfficientNet-Lite0 features on the full AID subset: pretrained vs random init.

All 30 classes, 60 train / 20 val images each at their native 150 px,
ImageNet-normalised like rkd's data pipeline. Features are the global average
of the last backbone stage (320 channels); a closed-form ridge regression to
one-hot labels (float64, standardised features) is the classifier, with lambda
picked on a 5-fold split of the train images only. A third row runs the
pretrained weights without the backbone's [-1, 1] input conversion, to show
what that conversion is worth.

    OMP_NUM_THREADS=1 .venv/bin/python bench/linear_probe_aid.py [--size 150] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rkd.data.dataset import MEAN, STD
from rkd.data.images import read_image
from rkd.models import BACKBONES

AID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aid150"
LAMBDAS = (1.0, 10.0, 100.0, 1000.0)


def load_split(split: str, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((AID / split / name).glob("*.jpg")):
            images.append(read_image(path))
            labels.append(label)
    x = torch.stack(images).float().div(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), torch.tensor(labels)


@torch.no_grad()
def features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    return torch.cat([net(chunk)[-1].mean(dim=(2, 3)) for chunk in x.split(64)]).double()


def ridge_scores(tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, lam: float) -> torch.Tensor:
    mu, sd = tx.mean(0), tx.std(0) + 1e-6
    a, b = F.pad((tx - mu) / sd, (0, 1), value=1.0), F.pad((vx - mu) / sd, (0, 1), value=1.0)
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=a.dtype), a.T @ F.one_hot(ty).double())
    return b @ w


def pick_lambda(tx: torch.Tensor, ty: torch.Tensor, folds: int = 5) -> float:
    order = torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))
    best = (-1.0, LAMBDAS[0])
    for lam in LAMBDAS:
        correct = 0
        for f in range(folds):
            held = order[f::folds]
            keep = torch.ones(len(ty), dtype=torch.bool)
            keep[held] = False
            correct += (ridge_scores(tx[keep], ty[keep], tx[held], lam).argmax(1) == ty[held]).sum().item()
        best = max(best, (correct / len(ty), lam))
    return best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classes = sorted(p.name for p in (AID / "train").iterdir())
    start = time.time()
    tx_img, ty = load_split("train", classes, args.size)
    vx_img, vy = load_split("val", classes, args.size)
    print(
        f"AID: {len(classes)} classes, {len(ty)} train / {len(vy)} val images at {args.size} px "
        f"(loaded in {time.time() - start:.0f} s)"
    )
    rows = [("pretrained", True, True), ("random init", False, True), ("pretrained, no [-1,1] conversion", True, False)]
    for name, pretrained, convert in rows:
        torch.manual_seed(0)
        net = BACKBONES["efficientnet_lite0"](pretrained=pretrained)
        if not convert:
            net.input_scale.fill_(1.0)
            net.input_shift.zero_()
        t = time.time()
        tx, vx = features(net, tx_img), features(net, vx_img)
        lam = pick_lambda(tx, ty)
        acc = (ridge_scores(tx, ty, vx, lam).argmax(1) == vy).double().mean().item()
        print(f"{name:34s} val accuracy {acc:.3f}  (lambda {lam:g}, features {time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
