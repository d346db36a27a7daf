"""Ray Jobs submission against a real Ray head that this module starts and stops itself.

Why not `ray stop` at teardown: it stops EVERY Ray process of the machine, including the in-process
cluster of the `ray_session` fixture and Ray sessions of anything else running here. Instead the head runs
as `ray start --head --block` in its own session, with its own temp dir and ports: SIGTERM to that one
process shuts down exactly the processes it started (Ray's own shutdown hook), and a final sweep kills any
leftover process whose command line names our temp dir. Its address file lives in that temp dir too, so
a plain `ray.init()` elsewhere never connects to it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from cluster import free_ports  # never hands a port out twice in this process
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.jobs import submit as jobs

VENV_BIN = Path(sys.executable).parent


def _kill_leftovers(marker: str) -> None:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@contextlib.contextmanager
def _ray_head(auth_token: str | None = None) -> Iterator[str]:
    """A real Ray head on 127.0.0.1 (2 CPUs, dashboard on a free port); yields the dashboard address.

    Token authentication is off unless ``auth_token`` is given: set explicitly, because Ray 2.60 turns it
    on by itself when ~/.ray/auth_token exists (a plain `ray.init()` writes one).
    """
    ray_bin = VENV_BIN / "ray" if (VENV_BIN / "ray").exists() else shutil.which("ray")
    assert ray_bin, "the `ray` command is not installed beside this Python"
    temp = Path(tempfile.mkdtemp(prefix="rayt_", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, agent, agent_grpc, metrics = free_ports(6)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # no 30 s drain at teardown
        "RAY_AUTH_MODE": "token" if auth_token else "disabled",
    }
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    if auth_token:
        env["RAY_AUTH_TOKEN"] = auth_token
    log_path = temp / "head.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(
            [
                str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                "--num-cpus=2", "--object-store-memory=300000000", f"--temp-dir={temp}", "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                # Any HTTP answer means the dashboard is up (with a token, this probe gets 401).
                requests.get(f"{address}/api/version", timeout=2)
                break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard did not come up in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        if not auth_token:  # stop jobs still running, so that their entrypoint processes end with them
            with contextlib.suppress(Exception):
                from ray.job_submission import JobSubmissionClient

                client_ = JobSubmissionClient(address)
                for job in client_.list_jobs():
                    if not job.status.is_terminal():
                        client_.stop_job(job.submission_id)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        _kill_leftovers(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    with _ray_head() as address:
        yield address


def _spec(tmp_path: Path, **extra: object) -> Path:
    spec = {
        "name": "submit-test",
        "data": [{"name": "sim", "simulate": {"cells": 600, "datasets": 2, "samples_per_dataset": 3,
                                              "genes": 1000, "seed": 0}}],
        "models": [{"name": "pca-logreg"}],
        "evaluation": {"pooled": {"folds": 2, "split": "sample"}, "bootstrap": 50},
        "output": str(tmp_path / "runs" / "default"),
        "cache": str(tmp_path / "cache"),
        **extra,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait_status(address: str, job_id: str, want: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (current := jobs.status(address, job_id)) != want:
        assert time.monotonic() < deadline, f"job {job_id} still {current}, wanted {want}"
        time.sleep(0.5)


# ------------------------------------------------------------------------------------ no cluster needed


def test_unreachable_address_is_a_user_error(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    with pytest.raises(UserError, match=rf"cannot reach the Ray dashboard at http://127\.0\.0\.1:{port}.*ray start"):
        jobs.submit(_spec(tmp_path), f"127.0.0.1:{port}")
    with pytest.raises(UserError, match="cannot reach"):
        jobs.status(f"http://127.0.0.1:{port}", "raysubmit_x")


def test_missing_spec_and_relative_data_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"benchmark file .*nope\.yaml not found"):
        jobs.submit(tmp_path / "nope.yaml", "http://127.0.0.1:1")
    spec = tmp_path / "rel.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "data": [{"path": "data/sim.h5ad", "label_key": "response"}],
                                    "models": [{"name": "pca-logreg"}]}))
    with pytest.raises(UserError, match=r"relative.*shared filesystem"):
        jobs.submit(spec, "http://127.0.0.1:1")


def test_relative_output_and_cache_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver-local relative path names another folder on every node: one line saying what to use."""
    monkeypatch.delenv("SCDRUGMAP_RAY_CACHE", raising=False)
    spec = tmp_path / "rel-out.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "data": [{"simulate": {"cells": 100}}],
                                    "models": [{"name": "pca-logreg"}], "output": "runs/x"}))
    with pytest.raises(UserError, match=r"run directory .*'runs/x' is a relative path.*s3://"):
        jobs.submit(spec, f"127.0.0.1:{free_ports(1)[0]}")
    spec.write_text(yaml.safe_dump({"name": "x", "data": [{"simulate": {"cells": 100}}],
                                    "models": [{"name": "pca-logreg"}], "output": str(tmp_path / "out"),
                                    "cache": "cache"}))
    with pytest.raises(UserError, match=r"`cache:` .*'cache' is a relative path"):
        jobs.submit(spec, f"127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", "rel-cache")
    with pytest.raises(UserError, match=r"SCDRUGMAP_RAY_CACHE 'rel-cache' is a relative path"):
        jobs.cluster_env()
    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", "s3://bucket/cache")
    assert jobs.cluster_env({"A": "1"}) == {"A": "1", "SCDRUGMAP_RAY_CACHE": "s3://bucket/cache"}


def test_stage_package_copies_every_subpackage(tmp_path: Path) -> None:
    root = jobs.stage_package(tmp_path)
    assert root == tmp_path / "scdrugmap_ray"
    for rel in ("__init__.py", "tl.py", "engine/errors.py", "engine/fsutil.py", "jobs/submit.py", "jobs/report.py",
                "cli/main.py", "serve/__init__.py"):
        assert (root / rel).is_file(), rel
    assert not list(root.rglob("__pycache__"))
    # the staged copy is importable on its own, Python API included (the CLI calls sdr.run)
    code = "import scdrugmap_ray as sdr, sys; assert sdr.__file__.startswith(sys.argv[1]); print(callable(sdr.run))"
    out = subprocess.run([sys.executable, "-c", code, str(root)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.stdout.strip() == "True", out.stderr[-2000:]


# ---------------------------------------------------------------------------------- real Ray head


@pytest.mark.slow
def test_staged_package_runs_on_the_cluster(ray_head: str, tmp_path: Path) -> None:
    probe = (
        "python -c \"import scdrugmap_ray.engine.errors as e, scdrugmap_ray.cli.main; "
        "print('staged-ok', e.__file__)\""
    )
    job_id = jobs.submit(_spec(tmp_path), ray_head, entrypoint=probe, extra_env={"SCDRUGMAP_PROBE": "1"})
    assert job_id.startswith("raysubmit_")
    assert jobs.wait(ray_head, job_id, timeout_s=120, poll_s=0.5) == "SUCCEEDED", jobs.logs(ray_head, job_id)
    assert jobs.status(ray_head, job_id) == "SUCCEEDED"
    out = jobs.logs(ray_head, job_id)
    line = next(ln for ln in out.splitlines() if ln.startswith("staged-ok"))
    # The job imported the package shipped in its runtime env, not the checkout on this machine.
    assert "runtime_resources" in line and "py_modules_files" in line, line
    assert not jobs.stop(ray_head, job_id)  # already finished


@pytest.mark.slow
def test_failed_job_and_unknown_job(ray_head: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ended FAILED"):
        jobs.submit(_spec(tmp_path), ray_head, entrypoint="echo failing-on-purpose; exit 3", wait=True)
    with pytest.raises(UserError, match="no job 'raysubmit_doesnotexist'"):
        jobs.status(ray_head, "raysubmit_doesnotexist")
    with pytest.raises(UserError, match="no job"):
        jobs.logs(ray_head, "raysubmit_doesnotexist")


@pytest.mark.slow
def test_status_logs_stop_a_running_job(ray_head: str, tmp_path: Path) -> None:
    job_id = jobs.submit(_spec(tmp_path), ray_head, entrypoint="echo started; sleep 60")
    _wait_status(ray_head, job_id, "RUNNING")
    with pytest.raises(UserError, match="still RUNNING"):
        jobs.wait(ray_head, job_id, timeout_s=1, poll_s=0.2)
    deadline = time.monotonic() + 30
    while "started" not in jobs.logs(ray_head, job_id):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    started = time.monotonic()
    assert jobs.stop(ray_head, job_id) is True
    assert jobs.wait(ray_head, job_id, timeout_s=60, poll_s=0.5) == "STOPPED"
    assert time.monotonic() - started < 30  # stopped, not finished its 60 s sleep


@pytest.mark.slow
def test_cluster_with_token_auth_says_how_to_authenticate(tmp_path: Path) -> None:
    with _ray_head(auth_token=secrets.token_hex(32)) as address, pytest.raises(UserError, match="RAY_AUTH_TOKEN"):
        jobs.submit(_spec(tmp_path), address, entrypoint="echo never")


@pytest.mark.slow
def test_submit_real_benchmark(ray_head: str, tmp_path: Path) -> None:
    """The real `run` command on the cluster: results land in --out (a path the cluster can write)."""
    out = tmp_path / "cluster-run"
    job_id = jobs.submit(_spec(tmp_path), ray_head, out=str(out))
    final = jobs.wait(ray_head, job_id, timeout_s=400)
    assert final == "SUCCEEDED", jobs.logs(ray_head, job_id)[-5000:]
    assert (out / "results.parquet").is_file()
    assert (out / "report.html").is_file()
    assert not (tmp_path / "runs" / "default").exists()  # --out overrides the spec's output

    # `predict --submit`: register the cluster run's best unit, then predict its store as a job on the cluster
    import json

    import pandas as pd
    from scdrugmap_ray.jobs.register import register_from_run

    registry = tmp_path / "registry"
    register_from_run(out, "clustered", best="auroc", registry=registry)
    store = json.loads((out / "manifest.json").read_text())["data"][0]["path"]
    preds = tmp_path / "predictions.parquet"
    proc = subprocess.run(
        [str(VENV_BIN / "scdrugmap-ray"), "predict", store, "--model", "clustered", "--out", str(preds),
         "--registry", str(registry), "--submit", "--address", ray_head],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    predict_job = proc.stdout.split("submitted ", 1)[1].split(";")[0]
    final = jobs.wait(ray_head, predict_job, timeout_s=300)
    assert final == "SUCCEEDED", jobs.logs(ray_head, predict_job)[-5000:]
    got = pd.read_parquet(preds)
    assert len(got) == 600 and got["cell_id"].is_unique and got["p_sensitive"].between(0, 1).all()


def test_rayjob_manifest_carries_a_valid_benchmark() -> None:
    from scdrugmap_ray.jobs.spec import parse_spec

    manifest = Path(__file__).resolve().parents[1] / "configs" / "cluster" / "rayjob.yaml"
    config_map, rayjob = yaml.safe_load_all(manifest.read_text())
    spec = parse_spec(yaml.safe_load(config_map["data"]["benchmark.yaml"]))
    assert str(spec.output_dir()).startswith("/data/") and str(spec.cache_dir()).startswith("/data/")
    assert rayjob["kind"] == "RayJob" and "scdrugmap-ray run /config/benchmark.yaml" in rayjob["spec"]["entrypoint"]
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["pip"]
