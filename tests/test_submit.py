"""`rkd submit / status / logs` against a real two-node Ray cluster started on 127.0.0.1 by the test.

The cluster is a head (with the dashboard's job server) and a second node with a
``node2`` resource, each a ``ray start --block`` process of its own session; both
are stopped by the fixture (SIGTERM to the ``ray start`` processes, which stop
what they started). Ports and the temp dir are fresh, so an embedded Ray of
another test cannot collide with it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import rkd_main
from ray_cluster import free_port

from rkd.deploy.submit import alive_nodes, client, finish, follow_logs, start_job
from rkd.errors import RkdError

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(two_node_ray):
    return two_node_ray[0]  # the job server's URL


PROBE = """\
import json, sys, ray
ray.init(address="auto")

@ray.remote(num_cpus=0, resources={"node2": 1})
def node_of_task():
    return ray.get_runtime_context().get_node_id()

here = ray.get_runtime_context().get_node_id()
there = ray.get(node_of_task.remote())
with open(sys.argv[1], "w") as fh:
    json.dump({"nodes": len([n for n in ray.nodes() if n["Alive"]]), "driver": here, "task": there}, fh)
print("probe done on", len(ray.nodes()), "nodes")
"""


def test_cluster_has_two_nodes(cluster):
    assert alive_nodes(cluster) == 2


def test_a_job_runs_across_both_nodes_and_status_and_logs_report_it(cluster, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "probe.py").write_text(PROBE)
    result = tmp_path / "storage" / "probe.json"
    result.parent.mkdir()
    job = start_job(client(cluster), f"python probe.py {result}", work, {}, "rkd-test-probe", {"who": "test"})
    follow_logs(cluster, job)
    assert finish(cluster, job) == "SUCCEEDED"
    out = json.loads(result.read_text())
    assert out["nodes"] == 2 and out["driver"] != out["task"]  # the task ran on the second node
    assert "probe done on 2 nodes" in capsys.readouterr().out

    assert rkd_main(["status", job, "--address", cluster]) == 0
    assert capsys.readouterr().out.startswith(f"{job}: SUCCEEDED")
    assert rkd_main(["status", job, "--address", cluster, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"] == {"who": "test"}
    assert rkd_main(["logs", job, "--address", cluster]) == 0
    assert "probe done on 2 nodes" in capsys.readouterr().out


def test_a_failed_job_exits_1_with_its_status(cluster, tmp_path, capsys):
    (tmp_path / "fail.py").write_text("import sys\nprint('about to fail')\nsys.exit(3)\n")
    job = start_job(client(cluster), "python fail.py", tmp_path, {}, "rkd-test-fail", {})
    assert rkd_main(["logs", job, "--address", cluster, "--follow"]) == 1
    captured = capsys.readouterr()
    assert "about to fail" in captured.out and f"job {job} FAILED" in captured.err


def test_unknown_job_and_unreachable_server_are_clear_errors(cluster, capsys):
    assert rkd_main(["status", "no-such-job", "--address", cluster]) == 2
    assert "no-such-job" in capsys.readouterr().err
    assert rkd_main(["status", "x", "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the Ray job server" in capsys.readouterr().err


@pytest.mark.parametrize(
    "storage, message",
    [
        (None, "the cluster has more than one node: pass --storage"),
        ("nosuch://bucket/runs", "not a storage location pyarrow can open"),
        ("relative/runs", "give an absolute path"),
    ],
)
def test_submit_checks_storage_before_submitting(cluster, tmp_path, capsys, storage, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**tiny_spec(), "name": "never"}))
    argv = ["submit", str(spec), "--address", cluster] + (["--storage", storage] if storage else [])
    assert rkd_main(argv) == 2
    assert message in capsys.readouterr().err
    assert all((j.metadata or {}).get("rkd_run") != "never" for j in client(cluster).list_jobs())


def test_submit_reports_spec_errors_first(tmp_path, capsys):
    pytest.importorskip("rkd.data.dataset")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**tiny_spec(), "resources": {"workers": 0}}))
    # no cluster at this address: the spec is checked before anything is contacted
    assert rkd_main(["submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "resources.workers" in err and "spec.yaml" in err


def code_spec(tmp_path: Path) -> Path:
    """The tiny spec with a prior that names Python to import (``target:``)."""
    doc = tiny_spec()
    prior = {"kind": "module", "target": "rkd.distill.priors:EdgeSaliencyPrior"}
    doc["student"]["methods"] = {"ifkd": {"prior": prior}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return spec


def test_submit_refuses_a_spec_that_names_code_unless_allowed(tmp_path, capsys, monkeypatch):
    pytest.importorskip("rkd.data.dataset")
    monkeypatch.setenv("RKD_ALLOW_CODE", "0")  # restored after the test: --allow-code sets it to 1 below
    spec = code_spec(tmp_path)
    address = f"http://127.0.0.1:{free_port()}"  # no cluster: refusing must not need one
    assert rkd_main(["submit", str(spec), "--address", address]) == 2
    err = capsys.readouterr().err
    assert "student.methods.ifkd.prior.target: names Python code" in err and "--allow-code" in err, err
    assert "cannot reach" not in err  # refused before the cluster was contacted
    # with the flag the spec passes, says it runs code on the cluster, and only then looks for the server
    assert rkd_main(["submit", str(spec), "--address", address, "--allow-code"]) == 2
    captured = capsys.readouterr()
    assert "code allowed" in captured.out and "RKD_ALLOW_CODE=1 in the job's environment" in captured.out
    assert "cannot reach the Ray job server" in captured.err and "names Python code" not in captured.err


def test_allowed_code_reaches_the_jobs_environment():
    from rkd.deploy.submit import job_runtime_env

    env = {"pip": ["rkd"], "env_vars": {"OMP_NUM_THREADS": "1"}}
    assert job_runtime_env(env, False) == env
    assert job_runtime_env(env, True) == {"pip": ["rkd"], "env_vars": {"OMP_NUM_THREADS": "1", "RKD_ALLOW_CODE": "1"}}
    assert job_runtime_env({}, True) == {"env_vars": {"RKD_ALLOW_CODE": "1"}}
    with pytest.raises(RkdError, match="env_vars: expected a mapping"):
        job_runtime_env({"env_vars": ["A=1"]}, True)


def tiny_spec() -> dict:
    model = lambda width: {  # noqa: E731
        "kind": "retinanet",
        "boxes": "obb",
        "backbone": {"name": "convnet", "width": width, "depth": 1},
        "neck": {"channels": 16},
        "head": {"convs": 1},
    }
    return {
        "name": "submitted",
        "seed": 0,
        "data": {"format": "synthetic", "num_classes": 2, "num_train": 4, "num_val": 2, "input_size": 128, "seed": 3},
        "teacher": {"model": model(0.5), "epochs": 1, "batch_size": 2, "lr": 3e-3},
        "student": {"model": model(0.25), "epochs": 1, "batch_size": 2, "lr": 3e-3},
        "search": {
            "space": str(REPO / "search_spaces" / "skeleton.yaml"),  # a local absolute path: rewritten on upload
            "trials": 2,
            "initial_points": [
                {"student.model.backbone.width": 0.25, "methods.fitnet": False, "methods.hinton": False},
                {"student.model.backbone.width": 0.5, "methods.fitnet": False, "methods.hinton": True},
            ],
        },
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }


def test_working_dir_holds_the_rewritten_spec_and_space(tmp_path):
    pytest.importorskip("rkd.data.dataset")  # the spec loader needs the data layer
    from rkd.deploy.submit import SPACE_NAME, SPEC_NAME, prepare_working_dir

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec()))
    work = tmp_path / "work"
    work.mkdir()
    prepare_working_dir(spec, work, "/shared/runs")
    copy = yaml.safe_load((work / SPEC_NAME).read_text())
    assert copy["search"]["space"] == SPACE_NAME and copy["resources"]["ray_address"] == "auto"
    assert copy["output_dir"] == "/shared/runs" and copy["data"] == tiny_spec()["data"]
    assert (work / SPACE_NAME).read_text() == (REPO / "search_spaces" / "skeleton.yaml").read_text()
    # a local teacher checkpoint travels with the job
    (tmp_path / "t.pt").write_bytes(b"weights")
    spec.write_text(yaml.safe_dump({**tiny_spec(), "teacher": {**tiny_spec()["teacher"], "checkpoint": "t.pt"}}))
    copy = prepare_working_dir(spec, work, "/shared/runs")
    assert copy["teacher"]["checkpoint"] == "teacher.pt" and (work / "teacher.pt").read_bytes() == b"weights"
    # a data root relative to the local spec would resolve elsewhere on the cluster
    data = {"format": "ucas", "root": "data/ucas", "input_size": 128}
    spec.write_text(yaml.safe_dump({**tiny_spec(), "data": data}))
    with pytest.raises(RkdError, match="data.root: 'data/ucas' is relative"):
        prepare_working_dir(spec, work, "/shared/runs")


def test_submit_runs_a_search_on_s3_storage_whose_best_student_exports_and_predicts(
    cluster, s3, tmp_path, capsys, monkeypatch
):
    """The multi-node path: Ray, the trials and rkd all write to an S3 bucket (a local S3 server)."""
    pytest.importorskip("rkd.data.dataset")  # `rkd search` runs once the data layer has landed
    import io

    import pyarrow.parquet as pq

    from rkd import storage

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec()))
    bucket = s3.uri("runs")
    assert rkd_main(["submit", str(spec), "--address", cluster, "--storage", bucket, "--no-wait"]) == 0
    out = capsys.readouterr().out
    job = re.search(r"submitted job (rkd-submitted-[0-9a-f]{8})", out).group(1)
    assert rkd_main(["logs", job, "--address", cluster, "--follow"]) == 0  # waits for the search
    assert "Pareto front of submitted" in capsys.readouterr().out

    # everything the run made is in the bucket, read back through S3 only
    files = s3.files("runs", "submitted")
    trials = pq.read_table(io.BytesIO(files["trials.parquet"])).to_pylist()
    assert len(trials) == 2 and {t["status"] for t in trials} == {"complete"}
    assert json.loads(files["summary.json"])["name"] == "submitted"
    assert {"teacher/teacher.pt", "teacher/teacher.json", "pareto.parquet", "pareto.png"} <= set(files)
    for t in trials:  # Train wrote each trial's checkpoint into the bucket, and the table names it there
        assert t["checkpoint"].startswith("s3://")
        assert t["checkpoint"].partition("/runs/submitted/")[2].partition("?")[0] in files
    assert not [f for f in files if f.endswith(".tmp")]

    # the searched student, exported from the bucket (another machine: an empty local cache)
    monkeypatch.setenv("RKD_CACHE_DIR", str(tmp_path / "laptop-cache"))
    run = storage.join(bucket, "submitted")
    assert rkd_main(["results", run]) == 0 and "knee point" in capsys.readouterr().out
    assert rkd_main(["export", run, "--out", str(tmp_path / "model"), "--latency-runs", "2"]) == 0
    image = sorted(Path("/work/shared/data/ucas50/images/val").glob("*.png"))[0]
    assert (
        rkd_main(["predict", str(tmp_path / "model"), str(image), "--out", str(tmp_path / "dets"), "--score", "0.01"])
        == 0
    )
    assert (tmp_path / "dets" / f"{image.stem}.txt").is_file()
