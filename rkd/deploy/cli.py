"""The deployment subcommands of ``rkd``: export, predict, submit, status, logs.

``rkd.cli`` calls :func:`add_commands`; each handler returns an exit code and
raises :class:`~rkd.errors.RkdError` for bad input (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rkd import storage
from rkd.errors import RkdError
from rkd.schema import ALLOW_CODE_ENV


def metric_of(metrics: dict) -> str:
    return "top1" if "top1" in metrics else "map50"


def _cmd_export(args: argparse.Namespace) -> int:
    from rkd.deploy.export import export_student, parse_formats
    from rkd.metrics import metric_label

    result = export_student(
        storage.local_run(args.run),
        Path(args.out),
        pick=args.pick,
        formats=parse_formats(args.format),
        min_map=args.min_map,
        max_gflops=args.max_gflops,
        latency_runs=args.latency_runs,
        raw=args.raw,
        int8_images=args.int8_images if args.int8 else None,
    )
    m = result.card["metrics"]
    timed = "onnxruntime CPU" if "onnxruntime_cpu_batch1" in m["latency"] else "eager torch CPU"
    accuracy = f"{metric_label(metric_of(m))} {m[metric_of(m)]:.3f}"
    print(
        f"exported trial {result.trial['trial_id']} ({accuracy}, {m['gflops']:.3f} GFLOPs, "
        f"{m['params'] / 1e6:.3f} M params, {m['latency_ms']:.1f} ms {timed}, batch 1) to {result.out}: "
        + ", ".join(sorted(result.card["files"].values()))
    )
    if "int8" in m:
        metric = m["int8"]["metric"]
        scores = m["int8"][metric]
        print(
            f"val {metric_label(metric)} in onnxruntime: {scores['float_onnx']:.3f} float, "
            f"{scores['int8_onnx']:.3f} INT8 ({m['int8']['file']}, {scores['val_images']} val images)"
        )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    # no torch here: with --backend onnxruntime (auto where torch is absent) none is needed
    from rkd.deploy.files import exported_kind
    from rkd.deploy.predict import CLASS_PREDICTIONS_FILE, classify_files, predict_files

    if exported_kind(Path(args.exported)) == "classifier":
        if args.tile is not None:
            raise RkdError(f"--tile: {args.exported} holds a scene classifier, which sees each image whole")
        classes = classify_files(
            Path(args.exported), Path(args.images), Path(args.out), backend=args.backend, int8=args.int8
        )
        print(f"{len(classes)} images classified, written to {Path(args.out) / CLASS_PREDICTIONS_FILE}")
        return 0
    counts, skipped = predict_files(
        Path(args.exported),
        Path(args.images),
        Path(args.out),
        score=args.score,
        tile=args.tile,
        overlap=args.overlap,
        nms_iou=args.nms_iou,
        backend=args.backend,
        int8=args.int8,
    )
    print(f"{sum(counts.values())} detections in {len(counts)} images, written to {args.out}")
    if skipped:
        # The others are written; the exit code tells a script that not every image was read.
        print(f"rkd: {len(skipped)} image(s) skipped, not readable:", file=sys.stderr)
        for name, why in skipped.items():
            print(f"  {name}: {why}", file=sys.stderr)
        return 1
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from rkd.deploy.submit import submit

    submit(
        Path(args.spec),
        args.address,
        storage=args.storage,
        wait=not args.no_wait,
        runtime_env_file=Path(args.runtime_env) if args.runtime_env else None,
        allow_code=args.allow_code,
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from rkd.deploy.submit import job_status

    status = job_status(args.address, args.job)
    print(
        json.dumps(status, indent=2)
        if args.json
        else f"{status['job_id']}: {status['status']}" + (f" ({status['message']})" if status["message"] else "")
    )
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from rkd.deploy.submit import finish, follow_logs, job_logs

    if args.follow:
        follow_logs(args.address, args.job)
        finish(args.address, args.job)
    else:
        print(job_logs(args.address, args.job), end="")
    return 0


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="the Ray job server (dashboard) of the head, http://HEAD:8265")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export one student of a finished search (safetensors, ONNX, torch.export)")
    p.add_argument("run", help="the run folder, runs/<name>, or its storage URI (s3://..., gs://...)")
    p.add_argument(
        "--pick",
        default="best",
        help="best (highest val accuracy on the front: mAP50, or top-1 for a classification run; "
        "where the search confirmed points (search.confirm), the confirmed point with the highest "
        "mean over the confirm seeds), knee, or a trial id",
    )
    p.add_argument(
        "--min-map",
        type=float,
        help="only trials with at least this val mAP50 (top-1 accuracy for a classification run)",
    )
    p.add_argument("--max-gflops", type=float, help="only trials with at most this many GFLOPs")
    p.add_argument(
        "--format",
        default="safetensors,onnx,pt2",
        help="comma-separated formats to write: safetensors, onnx, pt2 (torch.export), "
        "torchscript (only when named: PyTorch is retiring it)",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="detector graphs end at the raw head maps (for your own decoder), not at detections",
    )
    p.add_argument("--out", required=True, help="the export folder to create (must not exist, or be empty)")
    p.add_argument("--latency-runs", type=int, default=20, help="runs of each latency median (default 20)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx (onnxruntime static quantisation of the network, calibrated "
        "on the run's training images) and score it and model.onnx on val (mAP50 or top-1)",
    )
    p.add_argument("--int8-images", type=int, default=32, help="training images the INT8 calibration sees (default 32)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "predict",
        help="run an exported student on an image or a folder; DOTA-format detections "
        "or, for a classifier, one 'image_id class probability' line per image",
    )
    p.add_argument("exported", help="a folder written by rkd export (model.safetensors, or an end-to-end model.onnx)")
    p.add_argument("images", help="an image file or a folder of images")
    p.add_argument(
        "--out",
        default="predictions",
        help="output folder (default: predictions): <image_id>.txt per image for a detector, "
        "predictions.txt for a classifier",
    )
    p.add_argument("--score", type=float, default=0.3, help="minimum score (default 0.3; detectors)")
    p.add_argument("--tile", type=int, help="cut images larger than this into windows of this many pixels (detectors)")
    p.add_argument("--overlap", type=int, default=200, help="pixels shared by neighbouring windows (default 200)")
    p.add_argument("--nms-iou", type=float, default=0.1, help="rotated IoU of class-wise NMS (default 0.1)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime"],
        help="torch (model.safetensors) or onnxruntime (model.onnx, end-to-end for detectors); auto: "
        "torch where it is installed and the export has its weights, else onnxruntime",
    )
    p.add_argument(
        "--int8", action="store_true", help="run model.int8.onnx (written by rkd export --int8) in onnxruntime"
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("submit", help="run 'rkd search SPEC' as a Ray Job on a cluster")
    p.add_argument("spec", help="the run spec (YAML); it and its search space are uploaded")
    _address(p)
    p.add_argument(
        "--storage",
        help="the run's output_dir, reachable from every node: a storage URI "
        "(s3://bucket/runs, gs://...) or a shared absolute path (required if >1 node)",
    )
    p.add_argument("--runtime-env", help="runtime_env YAML (default: clusters/runtime_env.yaml if present)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of streaming logs")
    p.add_argument(
        "--allow-code",
        action="store_true",
        help="let the spec import and run the Python it names (a prior's `target`), here and on the "
        f"cluster (the job gets {ALLOW_CODE_ENV}=1); same as {ALLOW_CODE_ENV}=1 here",
    )
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("status", help="status of a submitted job")
    p.add_argument("job", help="the job id printed by rkd submit")
    _address(p)
    p.add_argument("--json", action="store_true", help="print status, message, entrypoint and metadata as JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job", help="the job id printed by rkd submit")
    _address(p)
    p.add_argument("--follow", action="store_true", help="stream until the job ends (exit 1 if it fails)")
    p.set_defaults(func=_cmd_logs)
