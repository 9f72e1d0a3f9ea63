"""What ships to run the services is safe by default and pinned: checked on the files themselves.

No service in infra/ can be brought up without passwords or with Ray's authentication off, published ports
bind to 127.0.0.1 unless BIND_ADDRESS says otherwise, and the tested versions (constraints.txt) agree with
pyproject.toml's bounds and with the MLflow server image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "infra" / "compose" / "docker-compose.yml"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _requirements() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [Requirement(r) for r in reqs]


def test_ray_authentication_is_never_turned_off():
    files = [REPO / "prefect.yaml", REPO / "Makefile", REPO / ".ci" / "run", *(REPO / "infra").rglob("*")]
    for path in (p for p in files if p.is_file()):
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\W{0,4}disabled", text), f"{path} turns Ray's authentication off"
    deployment_env = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]["work_pool"][
        "job_variables"]["env"]
    assert deployment_env["RAY_AUTH_MODE"] == "token"
    for name in ("raycluster.yaml", "rayjob.yaml"):
        spec = yaml.safe_load((REPO / "infra" / "k8s" / name).read_text())["spec"]
        spec = spec.get("rayClusterSpec", spec)
        assert spec["authOptions"]["mode"] == "token", name
    pool = json.loads((REPO / "infra" / "k8s" / "prefect-k8s-work-pool.json").read_text())
    env = pool["variables"]["properties"]["env"]["default"]
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"]


def test_compose_needs_passwords_and_binds_to_loopback():
    text = COMPOSE.read_text()
    assert "change-me" not in text
    services = yaml.safe_load(text)["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if "PASSWORD" in key:  # required, no default: compose refuses to start without it
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key}={value}"
        for port in service.get("ports") or []:
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port}"
    command = services["mlflow"]["command"]
    assert "--allowed-hosts" not in command or "'*'" not in command
    assert "password" not in command.lower().replace("$$minio_root_password", "")


def test_mlflow_server_image_is_the_tested_client_release():
    image = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]["image"]
    tag = image.rsplit(":", 1)[1].lstrip("v")
    assert tag == _constraints()["mlflow"], f"server image {image} and constraints.txt's mlflow differ"
    (client,) = [r for r in _requirements() if r.name == "mlflow"]
    major, minor = Version(tag).release[:2]
    assert client.specifier.contains(tag), f"pyproject's {client} excludes the server's {tag}"
    for other in (f"{major}.{minor + 1}.0", f"{major}.{minor - 1}.99"):  # another minor release
        assert not client.specifier.contains(other), f"pyproject's {client} allows {other}, server {tag}"


def test_every_dependency_is_bounded_and_its_tested_version_fits():
    pins = _constraints()
    for req in _requirements():
        specs = list(req.specifier)
        assert any(s.operator in ("<", "<=", "==", "~=") for s in specs), f"{req}: no upper bound"
        pinned = pins.get(req.name.lower().replace("_", "-"))
        if pinned is not None:
            assert req.specifier.contains(Version(pinned), prereleases=True), f"{req} excludes tested {pinned}"
    named = {r.name.lower() for r in _requirements()}
    assert "faiss-cpu" in named and "torch" in named
    # GeoCLIP and geopy (what `import geoclip` needs): installed with --no-deps by the Makefile
    assert pins["torch"] == "2.13.0" and {"geoclip", "geopy", "geographiclib"} <= set(pins)


def test_a_cluster_without_authentication_is_refused():
    """RAY_AUTH_MODE=disabled with a cluster address: a refusal naming it, before anything connects (in a
    fresh process: a Ray this test session already started would short-cut ensure_ray)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "RAY_AUTH_MODE": "disabled"}
    code = ("from locdiff.distributed import ensure_ray\n"
            "try:\n    ensure_ray()\nexcept ValueError as err:\n    print(err)\nelse:\n    print('connected')\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.match(r"RAY_AUTH_MODE is 'disabled': refusing to connect to 127\.0\.0\.1:1 without token "
                    r"authentication", out.stdout), out.stdout
