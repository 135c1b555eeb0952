"""KD overhead per method: distilled training step / (student step alone + one teacher forward).

For each KD method (and all of them together) this times one training step of the distilled
student, teacher forward (no_grad) + student forward + KD terms + backward + AdamW step, and
divides it by what distillation cannot avoid: the same student's plain training step plus one
teacher forward. ``1.00`` means the KD terms themselves cost nothing; the targets are <= 1.10
per method and <= 1.30 for all methods at once.

All configurations are timed in one process and interleaved (one step of each per round, in a
rotating order), so load from other processes on a shared machine hits them alike; each
figure is the median over ``--steps`` rounds after ``--warmup`` rounds. DS2D2's
high-frequency amplifier gets a random frozen head (its prior stage changes its weights, not
its cost); IFKD uses the builtin prior encoder.

On Linux the script re-runs itself with glibc's allocator told to keep freed memory
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): by default every tensor over a few MB
is a fresh ``mmap`` whose pages fault in again on every step, which costs the distilled steps
(more and larger tensors) more than the plain one and made single steps vary by +-20%. A
CUDA caching allocator keeps memory the same way. ``--system-allocator`` keeps the default.

    .venv/bin/python bench/kd_overhead.py --size 512 --batch 4 --steps 9 [--cached]

``--cached`` also times every distilled step with the teacher's outputs read back from rkd's
teacher-output cache (:mod:`rkd.train.teacher_outputs`, issue 17): what a trial's step costs
once the cache holds its inputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from rkd.distill import KD_METHODS, build_distiller
from rkd.models import build_detector, validate_model_spec
from rkd.outputs import Targets

TEACHER = {"kind": "retinanet", "backbone": {"name": "resnet18"}, "neck": {"channels": 64}, "head": {"convs": 2}}
STUDENT = {
    "kind": "retinanet",
    "backbone": {"name": "mobilenet_v2", "width": 0.5},
    "neck": {"channels": 32},
    "head": {"convs": 1},
}
# Defaults everywhere, except where the pair needs it: these retinanets have no angle branch.
OPTIONS = {"nsd": {"angle": False}, "ds2d2": {"hf_amplifier": True}}
NUM_CLASSES = 3


def batch(size: int, n: int, boxes_per_image: int = 12) -> tuple[torch.Tensor, Targets]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=gen)
    boxes, labels = [], []
    for _ in range(n):
        centre = torch.rand(boxes_per_image, 2, generator=gen) * size * 0.8 + size * 0.1
        wh = torch.rand(boxes_per_image, 2, generator=gen) * size * 0.15 + 8.0
        wh = torch.stack([wh.max(1).values, wh.min(1).values], 1)  # le90: w >= h
        angle = (torch.rand(boxes_per_image, 1, generator=gen) - 0.5) * 3.14159
        boxes.append(torch.cat([centre, wh, angle], 1))
        labels.append(torch.randint(0, NUM_CLASSES, (boxes_per_image,), generator=gen))
    return images, Targets(boxes, labels, (size, size))


class Config:
    """One timed configuration: a student, optionally with a distiller, and its optimiser."""

    def __init__(self, name: str, methods: dict | None, teacher: torch.nn.Module) -> None:
        torch.manual_seed(0)
        self.name = name
        self.student = build_detector(validate_model_spec(STUDENT), NUM_CLASSES).train()
        self.distiller = None
        params = list(self.student.parameters())
        if methods:
            self.distiller = build_distiller(methods, self.student.info, teacher.info).train()
            for comp in self.distiller.prior_stage_components().values():
                comp.prior_stage_modules().requires_grad_(False)  # frozen, as after its prior stage
            params += [p for p in self.distiller.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.times: list[float] = []
        self.cached_times: list[float] = []  # the same step, teacher outputs read from the cache

    def step(self, teacher: torch.nn.Module, images: torch.Tensor, targets: Targets, cache=None) -> float:
        start = time.perf_counter()
        t_out = None
        if self.distiller is not None:
            # the teacher first, as rkd's training loop does: run after the student's forward,
            # with the student's graph alive, the same forward took 30-45 ms longer here
            with torch.no_grad():
                t_out = teacher(images) if cache is None else cache.outputs(teacher, images, KEYS[: len(images)])
        out = self.student(images, targets)
        loss = sum(out.losses.values())
        if self.distiller is not None:
            loss = loss + self.distiller.total(self.distiller(out, t_out, targets, epoch=5.0))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


# Tensors up to 32 MB (glibc's ceiling) come from the heap, and freed heap memory is kept.
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def reexec_with_steady_allocator() -> None:
    """Re-run this script with :data:`STEADY_ALLOCATOR` set (glibc reads it only at start-up)."""
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in STEADY_ALLOCATOR.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_ALLOCATOR})


KEYS = [f"{i:032x}" for i in range(64)]  # the cache keys of the bench's batch (its inputs never change)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=7, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=None, help="default: every detection method")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps ratios stable on a machine shared with other jobs",
    )
    ap.add_argument(
        "--system-allocator", action="store_true", help="keep glibc's default allocator settings (see the module doc)"
    )
    ap.add_argument(
        "--cached",
        action="store_true",
        help="also time each distilled step with the teacher's outputs read from rkd's teacher-output cache "
        "(a temporary folder): the cached step over the live one, target <= 0.6",
    )
    args = ap.parse_args()
    if not args.system_allocator:
        reexec_with_steady_allocator()
    torch.set_num_threads(args.threads)

    methods = args.methods or sorted(KD_METHODS)
    teacher = build_detector(validate_model_spec(TEACHER), NUM_CLASSES).eval().requires_grad_(False)
    images, targets = batch(args.size, args.batch)
    configs = [Config("student alone", None, teacher)]
    configs += [Config(m, {m: OPTIONS.get(m, {})}, teacher) for m in methods]
    configs.append(Config("all together", {m: OPTIONS.get(m, {}) for m in methods}, teacher))
    teacher_times: list[float] = []
    cache = None
    if args.cached:
        import tempfile

        from rkd.train.teacher_outputs import ENV, TeacherOutputCache

        os.environ[ENV] = tempfile.mkdtemp(prefix="rkd-kd-overhead-")
        cache = TeacherOutputCache("bench", args.size, limit_bytes=1e12)
        with torch.no_grad():
            cache.outputs(teacher, images, KEYS[: len(images)])  # kept: every timed step hits
    wall = time.perf_counter()
    for round_ in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.no_grad():
            teacher(images)
        t_teacher = time.perf_counter() - start
        shift = round_ % len(configs)
        for cfg in configs[shift:] + configs[:shift]:
            t = cfg.step(teacher, images, targets)
            if round_ >= args.warmup:
                cfg.times.append(t)
            if cache is not None and cfg.distiller is not None:
                t = cfg.step(teacher, images, targets, cache)
                if round_ >= args.warmup:
                    cfg.cached_times.append(t)
        if round_ >= args.warmup:
            teacher_times.append(t_teacher)

    teacher_s = statistics.median(teacher_times)
    alone_s = statistics.median(configs[0].times)
    base = alone_s + teacher_s
    print(
        f"teacher {TEACHER['backbone']['name']} retinanet, student {STUDENT['backbone']['name']} "
        f"x{STUDENT['backbone']['width']} retinanet, input {args.size}, batch {args.batch}, "
        f"{args.steps} timed rounds after {args.warmup} warm-up, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{'system' if args.system_allocator else 'steady'} allocator; "
        f"total {time.perf_counter() - wall:.0f}s\n"
    )
    print(f"student step alone {alone_s * 1e3:.0f} ms, teacher forward {teacher_s * 1e3:.0f} ms\n")
    cached = " cached step (ms) | cached / live step (target <= 0.6) |" if cache is not None else ""
    print(
        "| method | step (ms, median) | KD terms (ms) | ratio to student + teacher fwd | overhead | target |" + cached
    )
    print("|---|---:|---:|---:|---:|---|" + ("---:|---:|" if cache is not None else ""))
    for cfg in configs[1:]:
        step_s = statistics.median(cfg.times)
        ratio = step_s / base
        target = 1.30 if cfg.name == "all together" else 1.10
        verdict = "within" if ratio <= target else "over"
        row = (
            f"| {cfg.name} | {step_s * 1e3:.0f} | {(step_s - base) * 1e3:+.0f} | {ratio:.2f} | "
            f"{(ratio - 1) * 100:+.0f}% | {verdict} (<= {(target - 1) * 100:.0f}%) |"
        )
        if cfg.cached_times:
            cached_s = statistics.median(cfg.cached_times)
            row += f" {cached_s * 1e3:.0f} | {cached_s / step_s:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
