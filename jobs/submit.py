"""Submit a benchmark to a Ray cluster through the Ray Jobs API, and follow it.

``submit`` sends the same run as ``scdrugmap-ray run`` to a cluster: the job's runtime environment
carries the benchmark YAML (its working directory, as ``benchmark.yaml``) and a copy of this package
(``py_modules``), so the cluster needs Ray and the package's dependencies but not scdrugmap-ray itself
(or pass ``pip=[...]`` to install what is missing). The job's entrypoint is
``python -m scdrugmap_ray.cli.main run benchmark.yaml [--out OUT]``, which connects to the cluster.

Data and output paths are opened ON THE CLUSTER: every path in the spec (and ``out``) must be reachable
from the cluster's nodes, e.g. a shared filesystem (NFS, Lustre, a mounted bucket) mounted at the same
path everywhere. The job runs in a temporary directory, so relative paths would point inside it:
relative data, cache and output paths are refused here, in one line (results would vanish with the
job's working directory). The machine's SCDRUGMAP_RAY_CACHE / SCDRUGMAP_RAY_REGISTRY travel in the job's
runtime environment, so every node uses the same shared cache.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ..engine.errors import UserError
from ..engine.storage import shareable

log = logging.getLogger(__name__)

PACKAGE = "scdrugmap_ray"
SUBPACKAGES = ("engine", "jobs", "serve", "cli")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
AGENT_WAIT_S = 60.0  # how long a submission waits for a starting head's job agent


# ------------------------------------------------------------------------------------------- client


def _normalise(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def _unreachable(address: str) -> UserError:
    return UserError(
        f"cannot reach the Ray dashboard at {address}: is the cluster up? start one with "
        "`ray start --head --dashboard-host=0.0.0.0` and pass its dashboard address (port 8265 by default), "
        "e.g. --address http://HEAD:8265"
    )


def _unauthorised(address: str) -> UserError:
    return UserError(
        f"the Ray cluster at {address} requires an authentication token: set RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN=<token> (print it with `ray get-auth-token` on the head node) and try again"
    )


def job_client(address: str) -> Any:
    """A Ray Jobs API client of the cluster at ``address``; an unreachable head or a refused token is a
    UserError (one line). Public: ``predict --submit`` uses it too."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = _normalise(address)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, requests.exceptions.RequestException) as err:
        raise _unreachable(address) from err
    except AuthenticationError as err:
        raise _unauthorised(address) from err


def call_jobs_api(address: str, job_id: str | None, fn: Any, *args: Any) -> Any:
    """Run one Jobs API call; turn a lost connection, a refused token or an unknown job id into a UserError.
    A head that has just started (or is busy) answers "No available agent" until its job agent is up: the
    call is retried for up to AGENT_WAIT_S."""
    import requests
    from ray.exceptions import AuthenticationError

    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return fn(*args)
        except (ConnectionError, requests.exceptions.ConnectionError) as err:
            raise _unreachable(_normalise(address)) from err
        except AuthenticationError as err:
            raise _unauthorised(_normalise(address)) from err
        except RuntimeError as err:
            if "No available agent" in str(err) and time.monotonic() < deadline:
                log.info("the cluster's job agent is not up yet; retrying")
                time.sleep(2)
                continue
            if job_id is not None and ("404" in str(err) or "does not exist" in str(err)):
                raise UserError(
                    f"no job {job_id!r} on the cluster at {_normalise(address)}; list jobs with "
                    f"`ray job list --address {_normalise(address)}`"
                ) from err
            raise


# ---------------------------------------------------------------------------------------- staging


def _package_dirs() -> dict[str, Path]:
    """Where each subpackage of the installed package lives (editable or regular install)."""
    import importlib

    dirs = {}
    for sub in SUBPACKAGES:
        module = importlib.import_module(f"{PACKAGE}.{sub}")
        if module.__file__ is None:
            raise UserError(f"{PACKAGE}.{sub} has no __init__.py on disk; reinstall scdrugmap-ray (pip install .)")
        dirs[sub] = Path(module.__file__).parent
    return dirs


def stage_package(dest: Path) -> Path:
    """Copy the package to ``dest/scdrugmap_ray`` (no caches): the root package's own modules (the Python
    API, which the CLI calls) and its subpackages; return that directory."""
    import importlib

    root = Path(dest) / PACKAGE
    top = importlib.import_module(PACKAGE).__file__
    if top is None:
        raise UserError(f"{PACKAGE} has no __init__.py on disk; reinstall scdrugmap-ray (pip install .)")
    root.mkdir(parents=True, exist_ok=True)
    for module in Path(top).parent.glob("*.py"):  # a regular install holds the subpackages there too
        shutil.copy2(module, root / module.name)
    for sub, src in _package_dirs().items():
        shutil.copytree(src, root / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return root


def _check_spec_paths(spec_path: Path, out: str | None, env: dict[str, str]) -> None:
    """Refuse paths that cannot work on the cluster; the full validation is `run`'s job."""
    try:
        spec = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{spec_path} is not valid YAML: {err}") from err
    if not isinstance(spec, dict):
        raise UserError(f"{spec_path} is not a benchmark spec (expected a YAML mapping)")
    for entry in spec.get("data") or []:
        path = entry.get("path") if isinstance(entry, dict) else None
        if path and not Path(path).is_absolute() and "://" not in str(path):
            raise UserError(
                f"data path {path!r} in {spec_path} is relative; the job runs in a temporary directory on the "
                "cluster: give an absolute path on storage every node can read (a shared filesystem)"
            )
    cache = spec.get("cache")
    if cache:
        shareable(cache, f"`cache:` in {spec_path}")
    elif "SCDRUGMAP_RAY_CACHE" not in env:
        log.warning(
            "no `cache:` in %s and no SCDRUGMAP_RAY_CACHE: converted data and preset checkpoints are cached on "
            "each node's home directory; on a multi-node cluster set `cache:` (or SCDRUGMAP_RAY_CACHE) to a "
            "shared directory or URI",
            spec_path,
        )
    output = out or spec.get("output")
    shareable(output or f"runs/{spec.get('name')}", "the run directory (--out or `output:`)")


def cluster_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a cluster job: the caller's, plus this machine's SCDRUGMAP_RAY_CACHE and
    SCDRUGMAP_RAY_REGISTRY when set (checked to be paths every node can reach), so the job's driver and
    every worker share one cache: data converted once, preset checkpoints created once."""
    env = {str(k): str(v) for k, v in (extra_env or {}).items()}
    for var in ("SCDRUGMAP_RAY_CACHE", "SCDRUGMAP_RAY_REGISTRY"):
        value = os.environ.get(var)
        if value and var not in env:
            env[var] = shareable(value, var)
    return env


# -------------------------------------------------------------------------------------------- API


def submit(
    spec_path: Path,
    address: str,
    *,
    out: str | None = None,
    pip: list[str] | None = None,
    wait: bool = False,
    extra_env: dict[str, str] | None = None,
    entrypoint: str | None = None,
) -> str:
    """Submit the benchmark ``spec_path`` to the cluster at ``address`` (its dashboard, e.g.
    ``http://HEAD:8265``); return the job id.

    Paths in the spec and ``out`` are opened on the cluster (see the module docstring). ``pip`` installs
    extra packages in the job's environment (default: none, the cluster image has the dependencies).
    ``wait`` blocks until the job ends and raises a UserError unless it succeeded. ``entrypoint``
    replaces the ``run`` command (for smoke tests of the cluster and the staged package).
    """
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise UserError(f"benchmark file {spec_path} not found")
    env = cluster_env(extra_env)
    _check_spec_paths(spec_path, out, env)
    client = job_client(address)

    command = ["python", "-m", f"{PACKAGE}.cli.main", "run", "benchmark.yaml"]
    if out:
        command += ["--out", str(out)]
    with tempfile.TemporaryDirectory(prefix="scdrugmap-submit-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        shutil.copyfile(spec_path, work / "benchmark.yaml")
        package = stage_package(Path(tmp) / "stage")
        runtime_env: dict[str, Any] = {"working_dir": str(work), "py_modules": [str(package)]}
        if pip:
            runtime_env["pip"] = list(pip)
        if env:
            runtime_env["env_vars"] = env
        # submit_job uploads the staged directories before it returns, so the temp dir can go after.
        job_id = call_jobs_api(
            address,
            None,
            lambda: client.submit_job(
                entrypoint=entrypoint or shlex.join(command),
                runtime_env=runtime_env,
                metadata={"tool": "scdrugmap-ray", "spec": spec_path.name},
            ),
        )
    log.info("submitted %s to %s", job_id, _normalise(address))
    if wait:
        final = _wait_for(address, job_id, None)
        if final != "SUCCEEDED":
            raise UserError(
                f"job {job_id} ended {final}; see its logs with `scdrugmap-ray logs {job_id} --address {address}`"
            )
    return str(job_id)


def status(address: str, job_id: str) -> str:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    client = job_client(address)
    return str(call_jobs_api(address, job_id, client.get_job_status, job_id).value)


def logs(address: str, job_id: str) -> str:
    """Everything the job has printed so far."""
    client = job_client(address)
    return str(call_jobs_api(address, job_id, client.get_job_logs, job_id))


def stop(address: str, job_id: str) -> bool:
    """Ask the job to stop; False when it had already finished."""
    client = job_client(address)
    return bool(call_jobs_api(address, job_id, client.stop_job, job_id))


def wait(address: str, job_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
    """Block until the job ends; return its final status. UserError when ``timeout_s`` runs out first."""
    return _wait_for(address, job_id, timeout_s, poll_s)


def _wait_for(address: str, job_id: str, timeout_s: float | None, poll_s: float = 2.0) -> str:
    client = job_client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        current = str(call_jobs_api(address, job_id, client.get_job_status, job_id).value)
        if current in TERMINAL:
            return current
        if deadline is not None and time.monotonic() >= deadline:
            raise UserError(
                f"job {job_id} is still {current} after {timeout_s:.0f} s; follow it with "
                f"`scdrugmap-ray status {job_id} --address {address}`"
            )
        time.sleep(poll_s)
