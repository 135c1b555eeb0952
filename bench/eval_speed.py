"""Time rkd's oriented mAP evaluator against a straightforward shapely implementation.

Synthetic set: 1000 images of 1024 px, 10,000 oriented ground-truth boxes in
5 classes (10 per image) and 100,000 detections (jittered copies of the
ground truth, some with the wrong class, plus false positives scattered
over the image). Both evaluators use the same rule (per class, detections by
descending score, each takes the unmatched GT of its image with the highest
IoU >= 0.5; all-point AP), and must agree on the mAP.

With ``--polygons`` every box becomes a quadrilateral as DOTA labels and Task1
files give them: its corners each moved by up to 8% of the short side (no longer
a rectangle), and both evaluators take the IoU of the polygons as given.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_speed.py [--polygons]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import shapely

from rkd.eval import evaluate_detections


def make_data(num_images: int, gt_per_image: int, dets_per_image: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(num_images):
        g = np.stack(
            [
                rng.uniform(50, 974, gt_per_image),
                rng.uniform(50, 974, gt_per_image),
                rng.uniform(15, 120, gt_per_image),
                rng.uniform(6, 40, gt_per_image),
                rng.uniform(-math.pi / 2, math.pi / 2, gt_per_image),
            ],
            1,
        )
        g_labels = rng.integers(0, num_classes, gt_per_image)
        copies = dets_per_image * 3 // 10  # 30% near the objects, 70% false positives
        src = rng.integers(0, gt_per_image, copies)
        near = g[src] + rng.normal(0, 1, (copies, 5)) * np.r_[0.1, 0.1, 0.1, 0.1, 0][None] * g[src, 2:3]
        near[:, 4] = g[src, 4] + rng.normal(0, 0.15, copies)
        near[:, 2:4] = np.abs(near[:, 2:4])
        n_fp = dets_per_image - copies
        far = np.stack(
            [
                rng.uniform(0, 1024, n_fp),
                rng.uniform(0, 1024, n_fp),
                rng.uniform(15, 120, n_fp),
                rng.uniform(6, 40, n_fp),
                rng.uniform(-math.pi / 2, math.pi / 2, n_fp),
            ],
            1,
        )
        labels = np.r_[
            np.where(rng.uniform(size=copies) < 0.9, g_labels[src], rng.integers(0, num_classes, copies)),
            rng.integers(0, num_classes, n_fp),
        ]
        gts.append({"boxes": g, "labels": g_labels})
        dets.append(
            {
                "boxes": np.concatenate([near, far]),
                "labels": labels,
                "scores": np.r_[rng.uniform(0.3, 1, copies), rng.uniform(0, 0.7, n_fp)],
            }
        )
    return dets, gts


def corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 8) corners of (N, 5) oriented boxes."""
    cx, cy, w, h, a = boxes.T
    u = np.stack([np.cos(a), np.sin(a)], 1) * (w / 2)[:, None]
    v = np.stack([-np.sin(a), np.cos(a)], 1) * (h / 2)[:, None]
    c = np.stack([cx, cy], 1)
    return np.stack([c + u + v, c - u + v, c - u - v, c + u - v], 1).reshape(-1, 8)


def to_quadrilaterals(entries: list[dict], rng: np.random.Generator) -> None:
    """Replace each entry's (M, 5) boxes by (M, 8) quadrilaterals: corners moved by up to 8% of the short side."""
    for entry in entries:
        boxes = entry["boxes"]
        short = np.minimum(boxes[:, 2], boxes[:, 3])[:, None]
        entry["boxes"] = corners(boxes) + rng.uniform(-0.08, 0.08, (len(boxes), 8)) * short


def polygon(box: np.ndarray) -> shapely.Polygon:
    if len(box) == 8:
        return shapely.Polygon(box.reshape(4, 2))
    cx, cy, w, h, a = box
    c, s = math.cos(a), math.sin(a)
    corners = [
        (cx + sw * w / 2 * c - sh * h / 2 * s, cy + sw * w / 2 * s + sh * h / 2 * c)
        for sw, sh in ((1, 1), (-1, 1), (-1, -1), (1, -1))
    ]
    return shapely.Polygon(corners)


def reference_map(dets, gts, num_classes: int, thr: float = 0.5) -> float:
    """The textbook loop: per class, per detection, IoU with every GT of its image via shapely."""
    aps = []
    for c in range(num_classes):
        gt_polys = {i: [polygon(b) for b, lab in zip(g["boxes"], g["labels"]) if lab == c] for i, g in enumerate(gts)}
        npos = sum(len(p) for p in gt_polys.values())
        if npos == 0:
            continue
        taken = {i: [False] * len(p) for i, p in gt_polys.items()}
        ranked = [
            (s, i, b) for i, d in enumerate(dets) for b, s, lab in zip(d["boxes"], d["scores"], d["labels"]) if lab == c
        ]
        ranked.sort(key=lambda x: -x[0])
        tp = []
        for _, i, box in ranked:
            p = polygon(box)
            best, best_j = thr, -1
            for j, g in enumerate(gt_polys[i]):
                inter = p.intersection(g).area
                iou = inter / (p.area + g.area - inter)
                if not taken[i][j] and iou >= best:
                    best, best_j = iou, j
            if best_j >= 0:
                taken[i][best_j] = True
            tp.append(best_j >= 0)
        tp_cum = np.cumsum(tp)
        precision = tp_cum / np.arange(1, len(tp) + 1)
        recall = tp_cum / npos
        mrec = np.r_[0, recall, 1]
        mpre = np.r_[0, precision, 0]
        for k in range(len(mpre) - 2, -1, -1):
            mpre[k] = max(mpre[k], mpre[k + 1])
        aps.append(float(np.sum(np.diff(mrec) * mpre[1:])))
    return float(np.mean(aps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--gt-per-image", type=int, default=10)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--polygons", action="store_true", help="quadrilaterals as given (DOTA Task1) for both sides")
    args = parser.parse_args()
    dets, gts = make_data(args.images, args.gt_per_image, args.dets_per_image, args.classes)
    if args.polygons:
        rng = np.random.default_rng(1)
        to_quadrilaterals(gts, rng)
        to_quadrilaterals(dets, rng)
    kind = "quadrilaterals" if args.polygons else "oriented boxes"
    print(
        f"{args.images} images, {args.images * args.gt_per_image} GT, {args.images * args.dets_per_image} "
        f"detections ({kind}), {args.classes} classes"
    )

    # Warm both up (first calls pay one-off costs: lazy imports, allocator growth). The allocator only grows
    # to the full-size arrays on a full-size call, so rkd's first full call is timed on its own and reported.
    evaluate_detections(dets[:10], gts[:10], num_classes=args.classes)
    reference_map(dets[:10], gts[:10], args.classes)
    t0 = time.perf_counter()
    evaluate_detections(dets, gts, num_classes=args.classes, iou_threshold=0.5, oriented=True)
    t_first = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = evaluate_detections(dets, gts, num_classes=args.classes, iou_threshold=0.5, oriented=True).map
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_map(dets, gts, args.classes)
    t_ref = time.perf_counter() - t0

    print(f"rkd evaluate_detections: {t_ours:8.3f} s   mAP {ours:.6f}")
    print(f"shapely reference:       {t_ref:8.3f} s   mAP {ref:.6f}")
    print(f"rkd, first full-size call: {t_first:8.3f} s")
    print(f"speed-up: {t_ref / t_ours:.1f}x (first call: {t_ref / t_first:.1f}x)")
    assert abs(ours - ref) < 1e-6, f"mAP differs: {ours} vs {ref}"
    print("mAP agrees to 1e-6")


if __name__ == "__main__":
    main()
