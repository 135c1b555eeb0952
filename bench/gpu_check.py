"""GPU check of the UCAS pair: precision and memory layout, the step's share of the chip's peak,
a Ray Train worker on one GPU, loader throughput. Writes its figures to a JSON and, with
``--docs``, appends them as a dated section of ``docs/benchmarks.md``.

Parts (each can be skipped):

1. **step**: one training step of the student of ``--spec`` (no KD), and of the student distilled
   from the spec's teacher architecture (``--methods``, default Hinton KD + FitNet: cheap terms,
   so the step is the models'), in four settings: fp32 / bf16 autocast x contiguous /
   channels_last. Real batches from the spec's train split. All settings are timed in one process
   and interleaved (one step of each per round), after ``--warmup`` rounds; each figure is the
   median over ``--steps`` rounds. The share of peak is the step's FLOPs (3x the student's forward
   for forward + backward, plus the teacher's forward when distilling; convolutions and linear
   layers as ``rkd.models.flops`` counts them) over the step's time and the chip's dense bf16
   peak (``--peak-tflops``, else a table of known chips).
2. **ddp**: ``rkd train`` of the spec on one GPU through Ray Train (``workers: 1,
   gpus_per_worker: 1``; a single-worker GPU trial goes through ``TorchTrainer`` and its process
   group), 1 teacher epoch and 1 student epoch: wall time and the val score it reached.
3. **loader**: ``bench/loader_throughput.py`` with 1 and 2 loader workers (its own output).

On a machine without a GPU it runs on the CPU (``--device cpu``) to check the script itself;
the CPU figures are not the point (no bf16 peak is known for a CPU: no share is given).

    .venv/bin/python bench/gpu_check.py --spec examples/ucas50.yaml --docs
    .venv/bin/python bench/gpu_check.py --device cpu --steps 2 --warmup 1 --skip ddp loader
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from rkd.atomic import atomic_write_text
from rkd.data.dataset import collate_detection
from rkd.distill import build_distiller
from rkd.models.flops import count_flops
from rkd.train.loop import StudentWithKD, trainable_parameters
from rkd.train.spec import load_spec
from rkd.train.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; SXM parts.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
SETTINGS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))  # (precision, channels_last)


def chip_peak(device: torch.device, given: float | None) -> float | None:
    """The bf16 peak of the chip in FLOP/s, or None when it is not known (a CPU, an unlisted GPU)."""
    if given is not None:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for chip, tflops in BF16_PEAK_TFLOPS.items() if chip in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_batches(spec: Any, count: int) -> list[tuple[torch.Tensor, Any]]:
    """``count`` training batches of the spec's train split, with its augmentations."""
    dataset = TASKS["detection"].dataset(spec.data, "train", train=True)
    size = spec.student.batch_size
    batches = []
    for i in range(count):
        items = [dataset[(i * size + j) % len(dataset)] for j in range(size)]
        images, targets, _ = collate_detection(items)
        batches.append((images, targets))
    return batches


class Setting:
    """One timed configuration: its model (student, or student + KD parts), optimiser and teacher."""

    def __init__(
        self,
        name: str,
        model: StudentWithKD,
        teacher: torch.nn.Module | None,
        precision: str,
        channels_last: bool,
        device: torch.device,
    ) -> None:
        self.name, self.precision, self.channels_last, self.device = name, precision, channels_last, device
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.format)
        self.teacher = teacher.to(device, memory_format=self.format) if teacher is not None else None
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.model), lr=1e-4)
        self.times: list[float] = []

    def step(self, images: torch.Tensor, targets: Any) -> None:
        images = images.to(self.device, memory_format=self.format)
        targets = targets.to(self.device)
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        sync(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            teacher_out = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_out = self.teacher(images)
            terms = self.model(images, targets, teacher_out, 1.0)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sync(self.device)
        self.times.append(time.perf_counter() - start)


def time_steps(spec: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Part 1: the interleaved step timings and each setting's share of the chip's peak."""
    task = TASKS["detection"]
    batches = real_batches(spec, args.batches)
    num_classes = len(task.class_names(spec.data))
    methods = {name: {} for name in args.methods}
    settings: list[Setting] = []
    for distilled in (False, True):
        for precision, channels_last in SETTINGS:
            torch.manual_seed(0)
            student = task.build_model(spec.student.model, num_classes)
            teacher, distiller = None, None
            if distilled:
                teacher = task.build_model(spec.teacher.model, num_classes).eval().requires_grad_(False)
                distiller = build_distiller(methods, student.info, teacher.info)
            name = f"{'distilled' if distilled else 'student'} {precision}{' channels_last' if channels_last else ''}"
            settings.append(Setting(name, StudentWithKD(student, distiller), teacher, precision, channels_last, device))
    size = spec.data.get("input_size", 512)
    student_flops = count_flops(task.build_model(spec.student.model, num_classes), size).gflops * 1e9
    teacher_flops = count_flops(task.build_model(spec.teacher.model, num_classes), size).gflops * 1e9
    rounds = args.warmup + args.steps
    for r in range(rounds):
        for k in range(len(settings)):  # rotate the order: drift on the machine hits every setting alike
            setting = settings[(r + k) % len(settings)]
            setting.step(*batches[r % len(batches)])
    peak = chip_peak(device, args.peak_tflops)
    rows = []
    batch = spec.student.batch_size
    for s in settings:
        median = statistics.median(s.times[args.warmup :])
        flops = batch * (3 * student_flops + (teacher_flops if s.teacher is not None else 0))
        rows.append(
            {
                "setting": s.name,
                "step_ms": 1e3 * median,
                "images_per_s": batch / median,
                "tflops_per_s": flops / median / 1e12,
                "share_of_bf16_peak": flops / median / peak if peak else None,
            }
        )
    return {
        "batch": batch,
        "input_size": size,
        "student_gflops": student_flops / 1e9,
        "teacher_gflops": teacher_flops / 1e9,
        "peak_tflops": peak / 1e12 if peak else None,
        "rows": rows,
    }


def train_on_one_gpu(spec_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: ``rkd train`` of the spec with one Ray Train worker holding one GPU, one epoch each."""
    raw = yaml.safe_load(spec_path.read_text())
    raw["data"]["root"] = str((spec_path.parent / raw["data"]["root"]).resolve())
    raw["teacher"]["epochs"] = 1
    raw["student"]["epochs"] = 1
    raw["teacher"]["min_map"] = 0.0  # one epoch cannot reach the floor; this part checks the worker, not the score
    raw["resources"] = {
        "workers": 1,
        "gpus_per_worker": 1 if args.device == "cuda" else 0,
        "cpus_per_worker": args.cpus,
    }
    raw.pop("search", None)
    with tempfile.TemporaryDirectory(prefix="rkd-gpu-check-") as tmp:
        spec_file = Path(tmp) / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(raw))
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "rkd.cli", "train", str(spec_file), "--output-dir", tmp],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        lines = (done.stdout + done.stderr).strip().splitlines()
        # the stages' progress lines (and an error's last lines): what happened, without the JSON summary
        tail = [line for line in lines if line.startswith(("[teacher]", "[student]", "rkd:"))][-15:] or lines[-15:]
    return {"exit_code": done.returncode, "wall_s": wall, "log_tail": tail}


def loader_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Part 3: the loader benchmark's own report (it builds DOTA-size scenes from the shared data)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loader_throughput.py"), "--scenes", "4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return {"exit_code": done.returncode, "report": (done.stdout + done.stderr).strip().splitlines()[-20:]}


def markdown(result: dict[str, Any]) -> str:
    """The dated docs/benchmarks.md section of one run of this script."""
    lines = [
        f"### GPU check ({result['device_name']}), {result['date']}",
        "",
        f"    {result['command']}",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}. Spec: `{result['spec']}`.",
        "",
    ]
    step = result.get("step")
    if step:
        lines += [
            f"Training step, batch {step['batch']} at {step['input_size']} px (student {step['student_gflops']:.2f} "
            f"GFLOPs, teacher {step['teacher_gflops']:.2f} GFLOPs per image; bf16 peak "
            f"{step['peak_tflops'] or 'unknown'} TFLOP/s), median of {result['steps']} interleaved rounds:",
            "",
            "| setting | step ms | images/s | TFLOP/s | share of bf16 peak |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in step["rows"]:
            share = f"{100 * row['share_of_bf16_peak']:.1f}%" if row["share_of_bf16_peak"] is not None else "-"
            lines.append(
                f"| {row['setting']} | {row['step_ms']:.1f} | {row['images_per_s']:.1f} | "
                f"{row['tflops_per_s']:.2f} | {share} |"
            )
        lines.append("")
    ddp = result.get("ddp")
    if ddp:
        where = "one GPU" if result["device"] == "cuda" else "the CPU"
        lines += (
            [
                f"`rkd train`, one Ray Train worker on {where}, 1 + 1 epochs: exit {ddp['exit_code']}, "
                f"{ddp['wall_s']:.0f} s. Last lines:",
                "",
            ]
            + [f"    {line}" for line in ddp["log_tail"][-6:]]
            + [""]
        )
    loader = result.get("loader")
    if loader:
        lines += [f"`bench/loader_throughput.py --scenes 4` (exit {loader['exit_code']}):", ""]
        lines += [f"    {line}" for line in loader["report"]] + [""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "ucas50.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--methods", nargs="+", default=["hinton", "fitnet"], help="KD methods of the distilled step")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every setting each)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="distinct real batches cycled through")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak (else looked up)")
    parser.add_argument(
        "--cpus", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="cpus_per_worker of part 2"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["step", "ddp", "loader"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    parser.add_argument("--docs", action="store_true", help="append the figures to docs/benchmarks.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu to check the script)")
    device = torch.device(args.device)
    spec = load_spec(args.spec)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "device": device.type,
        "spec": os.path.relpath(args.spec.resolve(), ROOT),
        "steps": args.steps,
    }
    if "step" not in args.skip:
        result["step"] = time_steps(spec, args, device)
    if "ddp" not in args.skip:
        result["ddp"] = train_on_one_gpu(args.spec.resolve(), args)
    if "loader" not in args.skip:
        result["loader"] = loader_throughput(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    print(section)
    if args.docs:
        docs = ROOT / "docs" / "benchmarks.md"
        atomic_write_text(docs, docs.read_text() + "\n" + section)


if __name__ == "__main__":
    main()
