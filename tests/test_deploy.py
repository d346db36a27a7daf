"""Deployment files: the Dockerfile (hadolint), compose.yaml (the Compose spec), the KubeRay manifests (a schema of
the KubeRay fields used, Kubernetes' own PodSpec/ConfigMap schemas, Ray Serve's config schema), and the one
install script the image and `make install` share. No image can be built on these machines."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTER = REPO / "configs" / "cluster"
K8S_VERSION = kubernetes_validate.latest_version()
KUBERAY_SCHEMA = json.loads((Path(__file__).parent / "data" / "kuberay_v1_subset.schema.json").read_text())


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_dockerfile_passes_hadolint() -> None:
    proc = _run(BIN / "hadolint", "--no-color", "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_bites() -> None:
    bad = REPO / "Dockerfile"
    text = bad.read_text().replace('CMD ["scdrugmap-ray", "serve", "--host", "0.0.0.0", "--port", "8000"]',
                                   "CMD scdrugmap-ray serve --host 0.0.0.0")
    proc = subprocess.run([str(BIN / "hadolint"), "--no-color", "-"], input=text, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "DL3025" in proc.stdout


def test_dockerfile_cpu_default_cuda_arg_non_root_and_the_shared_install() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "tools/install.sh --venv /opt/venv --variant \"$VARIANT\"" in text
    # CI's `make install` runs the same script (and .ci/run runs make test)
    assert re.search(r"^\ttools/install\.sh --venv \$\(VENV\) --python \$\(PYTHON\) --dev$",
                     (REPO / "Makefile").read_text(), re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
    # every file the image copies exists and is let through by .dockerignore (which keeps .venv out of the context)
    allowed = {line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copies = [copied for line in re.findall(r"^COPY (.+)$", text, re.M) for copied in line.split()[:-1]]
    for copied in copies:
        assert (REPO / copied).exists() and copied in allowed, copied
    # the image installs the package: every folder pyproject maps into it is copied
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) <= set(copies), set(package_dirs.values()) - set(copies)


def test_install_script() -> None:
    assert _run("bash", "-n", "tools/install.sh").returncode == 0
    proc = _run("bash", "tools/install.sh", "--variant", "tpu")
    assert proc.returncode == 2 and "expected auto, cpu or cuda" in proc.stderr


def test_compose_file_follows_the_compose_spec() -> None:
    proc = _run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "compose.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    server = compose["services"]["server"]
    assert server["build"]["args"]["VARIANT"] == "cpu"
    assert any(v.endswith(":/registry") for v in server["volumes"])
    assert server["command"][:2] == ["scdrugmap-ray", "serve"] and "/registry" in server["command"]
    assert compose["services"]["server-gpu"]["build"]["args"]["VARIANT"] == "cuda"


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]


def test_manifests_validate() -> None:
    kinds = set()
    for name, doc in _manifests():
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["spec"], name
            jsonschema.validate(doc, KUBERAY_SCHEMA)
            for i, template in enumerate(_pod_templates(doc["spec"])):
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{doc['metadata']['name']}-{i}"},
                       **template}
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"RayJob", "RayService", "ConfigMap"} <= kinds


def test_the_validators_bite() -> None:
    service = next(d for _, d in _manifests() if d["kind"] == "RayService")
    typo = copy.deepcopy(service)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(typo, KUBERAY_SCHEMA)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           **copy.deepcopy(service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])}
    pod["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_rayservice_serve_config_builds_our_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema
    from scdrugmap_ray.engine.errors import UserError
    from scdrugmap_ray.serve.deploy import build, config_from_args

    service = next(d for _, d in _manifests() if d["kind"] == "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    app = config.applications[0]
    assert app.import_path == "scdrugmap_ray.serve.deploy:build"
    args = {**app.args, "registry": str(tmp_path)}
    monkeypatch.setenv(args["api_key_env"], "k3y")
    cfg = config_from_args(args)
    assert (cfg.api_key, cfg.max_replicas, cfg.registry) == ("k3y", 4, str(tmp_path))
    assert isinstance(build(args), Application)  # what Serve's controller calls with the manifest's args
    with pytest.raises(UserError, match="unknown key"):
        config_from_args({**args, "max_replica": 2})
    monkeypatch.delenv(args["api_key_env"])
    with pytest.raises(UserError, match="not set or empty"):
        config_from_args(args)
