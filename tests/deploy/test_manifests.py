"""Deployment files against the code they deploy: Dockerfile, compose, Helm chart, plain manifests.

CPU only, seconds. Helm templates are not rendered here (no helm binary in CI); the chart is linted
(balanced actions, every `.Values` path and `include` defined) and `deploy/k8s/`, its defaults
rendered by hand, is what the semantic checks read. Optional tools run when present: kubectl
(kustomize build), helm (template), kubernetes-validate (schemas), redis-server (loads redis.conf).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

from server.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "rvr-serve"
TEMPLATES = CHART / "templates"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
REDIS_CONF = DEPLOY / "redis.conf"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

# Extra time a worker needs after its drain deadline: hand back the rest, close Redis, exit.
WORKER_GRACE_MARGIN_S = 10


# ---- helpers ----
def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _yaml_files() -> list[Path]:
    files = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
    return [p for p in files if TEMPLATES not in p.parents]


def _k8s_objects() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in _load_all(p)]


def _obj(kind: str, name: str) -> dict:
    found = [o for o in _k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found in deploy/k8s"
    return found[0]


def _pod(deploy: dict) -> dict:
    return deploy["spec"]["template"]["spec"]


def _container(deploy: dict) -> dict:
    (container,) = _pod(deploy)["containers"]
    return container


def _env(deploy: dict) -> dict[str, Any]:
    """What the container's process sees: envFrom ConfigMaps, then env (values or the valueFrom)."""
    c = _container(deploy)
    env: dict[str, Any] = {}
    for src in c.get("envFrom", []):
        env.update(_obj("ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else e["valueFrom"]
    return env


def _port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, Any]) -> Settings:
    """Settings as the pod's process would build them from its environment."""
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"RVR_{name.upper()}", raising=False)
    for key, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(key, value)
        elif key == "RVR_WORKER_NAME":
            monkeypatch.setenv(key, "rvr-serve-worker-7d9f8-abcde")  # the downward API's pod name
        elif key == "RVR_API_KEY_SHA256":
            monkeypatch.setenv(key, "ab" * 32)  # a digest, as the Secret holds
    return Settings()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dockerfile_stages() -> list[list[str]]:
    """Logical lines (continuations joined) per stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    stages: list[list[str]] = [[]]
    for ln in lines:
        if (
            ln.upper().startswith("FROM ")
            and stages[-1]
            and any(x.upper().startswith("FROM ") for x in stages[-1])
        ):
            stages.append([])
        stages[-1].append(ln)
    return stages


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for ln in (ln for stage in _dockerfile_stages() for ln in stage):
        m = re.match(r"ARG\s+(\w+)=(\S*)", ln)
        if m:
            args.setdefault(m.group(1), m.group(2))
    return args


# ---- every file parses ----
@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict)


def test_k8s_objects_are_complete() -> None:
    objs = _k8s_objects()
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for needed in [
        ("Deployment", "rvr-serve-api"),
        ("Deployment", "rvr-serve-worker"),
        ("Service", "rvr-serve-api"),
        ("Service", "rvr-serve-worker"),
        ("ConfigMap", "rvr-serve-config"),
        ("PodDisruptionBudget", "rvr-serve-api"),
        ("PodDisruptionBudget", "rvr-serve-worker"),
        ("NetworkPolicy", "rvr-serve-worker"),
        ("StatefulSet", "rvr-serve-redis"),
    ]:
        assert needed in kinds
    for o in objs:
        assert {"apiVersion", "kind", "metadata"} <= o.keys(), o
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


# ---- Helm templates: lint what can be checked without helm ----
_ACTION = re.compile(r"\{\{-?(.*?)-?\}\}", re.S)
_TEMPLATE_FILES = sorted(p for p in TEMPLATES.iterdir() if p.suffix in (".yaml", ".tpl", ".txt"))


@pytest.mark.parametrize("path", _TEMPLATE_FILES, ids=lambda p: p.name)
def test_template_actions_balanced(path: Path) -> None:
    text = path.read_text()
    assert text.count("{{") == text.count("}}"), "unbalanced {{ }}"
    stack: list[str] = []
    for m in _ACTION.finditer(text):
        body = m.group(1).strip()
        if body.startswith("/*"):
            assert body.endswith("*/"), f"unterminated comment: {body[:40]}"
            continue
        word = body.split(None, 1)[0] if body else ""
        line = text.count("\n", 0, m.start()) + 1
        if word in ("if", "range", "with", "define", "block"):
            stack.append(word)
        elif word == "else":
            assert stack and stack[-1] in ("if", "range", "with"), f"line {line}: else outside if/range/with"
        elif word == "end":
            assert stack, f"line {line}: end without an opening action"
            stack.pop()
        if word == "define":
            assert len(stack) == 1, f"line {line}: define must be at top level"
    assert not stack, f"unclosed {stack}"
    # Nothing left over once actions are removed (a lone "{{" or "}}" is a typo).
    rest = _ACTION.sub("", text)
    assert "{{" not in rest and "}}" not in rest


def _has_path(values: dict, dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_template_values_and_includes_exist() -> None:
    values = _values()
    text = "\n".join(p.read_text() for p in _TEMPLATE_FILES)
    refs = set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))
    assert len(refs) > 40
    missing = sorted(r for r in refs if not _has_path(values, r.lstrip(".")))
    assert not missing, f".Values paths missing from values.yaml: {missing}"
    defined = set(re.findall(r'define\s+"([^"]+)"', text))
    used = set(re.findall(r'(?:include|template)\s+"([^"]+)"', text))
    assert used <= defined, f"undefined templates: {used - defined}"
    for name in ("api.yaml", "worker.yaml", "configmap.yaml", "pdb.yaml", "networkpolicy.yaml"):
        assert (TEMPLATES / name).exists()
    assert (TEMPLATES / "keda.yaml").read_text().count("redis-streams") == 1
    assert "ServiceMonitor" in (TEMPLATES / "servicemonitor.yaml").read_text()


def test_chart_metadata_matches_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    m = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m
    version = m.group(1)
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == version
    assert _values()["image"]["tag"] == version
    for name in ("rvr-serve-api", "rvr-serve-worker"):
        assert _container(_obj("Deployment", name))["image"] == f"rvr-serve:{version}"
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["api"]["image"] == f"rvr-serve:{version}"


# ---- Helm chart rendered by tests/deploy/gotemplate.py (a Go template subset; helm is the reference) ----
def _render(values: dict | None = None) -> dict[tuple[str, str], dict]:
    from tests.deploy.gotemplate import Chart

    objs: dict[tuple[str, str], dict] = {}
    for name, text in Chart(CHART).render("rvr-serve", values).items():
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objs, f"{name}: {key} rendered twice"
                objs[key] = doc
    return objs


def _drop_checksums(obj: dict) -> dict:
    meta = obj.get("spec", {}).get("template", {}).get("metadata", {})
    notes = {k: v for k, v in meta.get("annotations", {}).items() if not k.startswith("checksum/")}
    if "annotations" in meta:
        meta.pop("annotations")
        if notes:
            meta["annotations"] = notes
    return obj


def test_chart_defaults_render_to_the_k8s_manifests() -> None:
    """deploy/k8s is the chart's defaults rendered: the same objects, field for field."""
    rendered = {k: _drop_checksums(v) for k, v in _render().items()}
    plain = {(o["kind"], o["metadata"]["name"]): o for o in _k8s_objects()}
    assert rendered.keys() == plain.keys()
    for key, obj in rendered.items():
        assert obj == plain[key], key


def test_chart_options_render() -> None:
    from server.queue.redis_keys import GROUP, Keys

    objs = _render(
        {
            "keda": {"enabled": True},
            "serviceMonitor": {"enabled": True},
            "ingress": {"enabled": True, "tlsSecret": "rvr-tls"},
            "auth": {"existingSecret": "", "sha256Digests": ["ab" * 32, "cd" * 32]},
            "config": {"RVR_KEY_PREFIX": "prod"},
        }
    )
    trigger = objs[("ScaledObject", "rvr-serve-worker")]["spec"]["triggers"][0]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["stream"] == Keys("prod").stream
    assert trigger["metadata"]["consumerGroup"] == GROUP
    assert trigger["metadata"]["address"] == "rvr-serve-redis:6379"
    assert "replicas" not in objs[("Deployment", "rvr-serve-worker")]["spec"]  # KEDA owns it
    monitor_ports = {e["port"] for e in objs[("ServiceMonitor", "rvr-serve")]["spec"]["endpoints"]}
    service_ports = {p["name"] for k, o in objs.items() if k[0] == "Service" for p in o["spec"]["ports"]}
    assert monitor_ports <= service_ports
    secret = objs[("Secret", "rvr-serve-api-keys")]
    assert Settings(api_key_sha256=secret["stringData"]["api-key-sha256"]).api_key_sha256 == [
        "ab" * 32,
        "cd" * 32,
    ]
    api_env = {e["name"]: e for e in _container(objs[("Deployment", "rvr-serve-api")])["env"]}
    assert api_env["RVR_API_KEY_SHA256"]["valueFrom"]["secretKeyRef"]["name"] == "rvr-serve-api-keys"
    (path,) = objs[("Ingress", "rvr-serve")]["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == "/v1"  # probes and /metrics are not routed

    external = _render(
        {
            "redis": {
                "enabled": False,
                "external": {"url": "rediss://queue.internal:6380/0", "cidr": "10.1.2.3/32"},
            },
            "auth": {"existingSecret": "", "sha256Digests": []},
        }
    )
    assert ("StatefulSet", "rvr-serve-redis") not in external
    assert (
        external[("ConfigMap", "rvr-serve-config")]["data"]["RVR_REDIS_URL"]
        == "rediss://queue.internal:6380/0"
    )
    egress = external[("NetworkPolicy", "rvr-serve-worker")]["spec"]["egress"][0]
    assert egress["to"] == [{"ipBlock": {"cidr": "10.1.2.3/32"}}]
    api_env = {e["name"] for e in _container(external[("Deployment", "rvr-serve-api")])["env"]}
    assert "RVR_API_KEY_SHA256" not in api_env

    kv = importlib.util.find_spec("kubernetes_validate") and importlib.import_module("kubernetes_validate")
    if kv:
        for (kind, _), obj in {**objs, **external}.items():
            if kind not in ("ScaledObject", "ServiceMonitor"):
                kv.validate(obj, "1.30.0", strict=True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"worker": {"terminationGracePeriodSeconds": 180}}, "must exceed worker.drainTimeoutS"),
        ({"api": {"terminationGracePeriodSeconds": 30}}, "must cover preStopSleepS"),
        ({"image": {"tag": "latest"}}, "not latest"),
        ({"config": {"MAX_QUEUE_DEPTH": "3"}}, "RVR_"),
        ({"redis": {"enabled": False}}, "redis.external.url"),
        ({"model": {"existingClaim": "", "hostPath": ""}}, "never download"),
    ],
)
def test_chart_refuses_bad_values(values: dict, message: str) -> None:
    from tests.deploy.gotemplate import TemplateFail

    with pytest.raises(TemplateFail, match=re.escape(message)):
        _render(values)


# ---- settings: every RVR_* name is a real setting, and the values parse ----
def _deploy_text_files() -> list[Path]:
    files = [DOCKERFILE, ROOT / ".dockerignore"]
    files += [p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return files


def test_every_rvr_name_is_a_setting() -> None:
    seen: dict[str, set[str]] = {}
    for path in _deploy_text_files():
        for name in re.findall(r"\bRVR_[A-Z0-9_]+\b", path.read_text()):
            seen.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    fields = set(Settings.model_fields)
    unknown = {n: sorted(where) for n, where in seen.items() if n[4:].lower() not in fields}
    assert not unknown, f"RVR_* names that are no field of server.settings.Settings: {unknown}"
    for needed in ("RVR_REDIS_URL", "RVR_WORKER_NAME", "RVR_API_KEY_SHA256", "RVR_DRAIN_TIMEOUT_S"):
        assert needed in seen


def test_configmap_keys_are_settings() -> None:
    fields = set(Settings.model_fields)
    for data in (_obj("ConfigMap", "rvr-serve-config")["data"], _values()["config"]):
        for key in data:
            assert key.startswith("RVR_") and key[4:].lower() in fields, key
    for role in ("api", "worker"):
        for key in _values()[role]["env"]:
            assert key.startswith("RVR_") and key[4:].lower() in fields, key


@pytest.mark.parametrize("name", ["rvr-serve-api", "rvr-serve-worker"])
def test_k8s_env_builds_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(_obj("Deployment", name))
    s = _settings_from_env(monkeypatch, env)
    assert s.backend == "redis"
    assert s.redis_url == "redis://rvr-serve-redis:6379/0"
    assert s.host == "0.0.0.0"


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_env_builds_valid_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = yaml.safe_load(COMPOSE.read_text())["services"][service]
    env = {k: re.sub(r"\$\{[^}]*\}", "", str(v)) for k, v in svc["environment"].items()}
    s = _settings_from_env(monkeypatch, env)
    assert s.redis_url == "redis://redis:6379/0"
    assert svc["command"][:3] == [service if service == "worker" else "serve", "--redis-url", s.redis_url]


# ---- probes and ports exist in the app ----
def test_api_probes_hit_real_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's probe paths are routes of the API (answered, not 404) on its RVR_PORT."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    # No lifespan (no `with`): the in-process worker, and so the engine, never starts.
    client = TestClient(create_app(Settings(redis_url=None)))
    deploy = _obj("Deployment", "rvr-serve-api")
    container = _container(deploy)
    settings = _settings_from_env(monkeypatch, _env(deploy))
    probes = [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:
        assert client.get(probe["httpGet"]["path"]).status_code != 404, probe
        assert _port(container, probe["httpGet"]["port"]) == settings.port
    assert client.get("/no-such-probe").status_code == 404
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert client.get("/livez").status_code == 200
    service = _obj("Service", "rvr-serve-api")
    assert _port(container, service["spec"]["ports"][0]["targetPort"]) == settings.port


def test_worker_probes_hit_the_worker_probe_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's probe server (server.cli) answers the manifest's paths on RVR_WORKER_PORT."""
    import urllib.error
    import urllib.request

    from server.cli import _probe_server
    from server.metrics import Metrics
    from server.queue.memory import MemoryQueue
    from server.worker import Worker

    deploy = _obj("Deployment", "rvr-serve-worker")
    container = _container(deploy)
    settings = _settings_from_env(monkeypatch, _env(deploy))
    probes = [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:
        assert _port(container, probe["httpGet"]["port"]) == settings.worker_port
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"

    local = settings.model_copy(update={"host": "127.0.0.1", "worker_port": _free_port()})
    metrics = Metrics()
    worker = Worker(local, MemoryQueue(), metrics)  # the real object, never loaded or run
    server = _probe_server(local, worker, metrics)
    assert server is not None

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{local.worker_port}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code

    try:
        # Loading: alive, not ready (the startup probe keeps waiting).
        assert {p["httpGet"]["path"]: status(p["httpGet"]["path"]) for p in probes} == {
            "/readyz": 503,
            "/livez": 200,
        }
        worker.ready.set()  # what load() sets once warm
        assert status("/readyz") == 200 and status("/livez") == 200
        worker.stop()  # SIGTERM: draining, out of rollout readiness, still alive
        assert status("/readyz") == 503 and status("/livez") == 200
        assert status("/metrics") == 200
    finally:
        server.shutdown()
        server.server_close()


# ---- termination: grace periods cover the drain ----
def test_worker_grace_period_covers_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    deploy = _obj("Deployment", "rvr-serve-worker")
    settings = _settings_from_env(monkeypatch, _env(deploy))
    grace = _pod(deploy)["terminationGracePeriodSeconds"]
    assert grace >= settings.drain_timeout_s + WORKER_GRACE_MARGIN_S
    # 30 s (the default) is short for a 50-step 1024^2 job (docs/serving.md §10).
    assert settings.drain_timeout_s > Settings.model_fields["drain_timeout_s"].default
    v = _values()["worker"]
    assert v["terminationGracePeriodSeconds"] >= v["drainTimeoutS"] + WORKER_GRACE_MARGIN_S
    assert (v["terminationGracePeriodSeconds"], v["drainTimeoutS"]) == (grace, settings.drain_timeout_s)


def test_api_grace_period_covers_prestop_and_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    deploy = _obj("Deployment", "rvr-serve-api")
    settings = _settings_from_env(monkeypatch, _env(deploy))
    pre_stop = _container(deploy)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = float(pre_stop[1])
    grace = _pod(deploy)["terminationGracePeriodSeconds"]
    assert grace >= sleep_s + settings.drain_delay_s + settings.drain_timeout_s
    v = _values()["api"]
    assert v["terminationGracePeriodSeconds"] >= v["preStopSleepS"] + v["drainDelayS"] + v["drainTimeoutS"]
    assert (v["terminationGracePeriodSeconds"], v["preStopSleepS"]) == (grace, sleep_s)


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", text)
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_compose_stop_grace_covers_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    worker = _settings_from_env(monkeypatch, dict(services["worker"]["environment"]))
    assert _seconds(services["worker"]["stop_grace_period"]) >= worker.drain_timeout_s + WORKER_GRACE_MARGIN_S
    api_env = {k: re.sub(r"\$\{[^}]*\}", "", str(v)) for k, v in services["api"]["environment"].items()}
    api = _settings_from_env(monkeypatch, api_env)
    assert _seconds(services["api"]["stop_grace_period"]) >= api.drain_delay_s + api.drain_timeout_s


# ---- workers: GPU, stable name, read-only model, network ----
def test_worker_gpu_name_and_model() -> None:
    deploy = _obj("Deployment", "rvr-serve-worker")
    container = _container(deploy)
    assert container["args"] == ["worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert _env(deploy)["RVR_WORKER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model"]
    assert mount["readOnly"] is True and mount["mountPath"] == _env(deploy)["RVR_MODEL"]
    (volume,) = [v for v in _pod(deploy)["volumes"] if v["name"] == "model"]
    assert volume.get("persistentVolumeClaim", {}).get("readOnly") is True or "hostPath" in volume
    for name in ("rvr-serve-api", "rvr-serve-worker"):
        pod = _pod(_obj("Deployment", name))
        assert pod["enableServiceLinks"] is False  # a Service "rvr" would inject RVR_PORT=tcp://...
        assert pod["securityContext"]["runAsNonRoot"] is True
    compose_worker = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]
    (device,) = compose_worker["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    assert any(v.endswith(":/models/rvr:ro") for v in compose_worker["volumes"])


def test_worker_egress_only_to_redis_and_dns() -> None:
    policy = _obj("NetworkPolicy", "rvr-serve-worker")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    redis_labels = _obj("StatefulSet", "rvr-serve-redis")["spec"]["selector"]["matchLabels"]
    for rule in policy["egress"]:
        ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
        (peer,) = rule["to"]
        if ports == {("TCP", 6379)}:
            assert peer == {"podSelector": {"matchLabels": redis_labels}}
        else:
            assert ports == {("UDP", 53), ("TCP", 53)}
            assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    # Inbound: the metrics/probe port only, from in-cluster peers.
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [9100]
    assert all("ipBlock" not in peer for peer in rule["from"])


# ---- Redis: AOF everysec, maxmemory + noeviction ----
def _redis_directives(text: str) -> dict[str, str]:
    out = {}
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            key, _, value = ln.partition(" ")
            out[key.lower()] = value.strip().strip('"')
    return out


def test_redis_conf_durable_and_never_evicts() -> None:
    conf = _redis_directives(REDIS_CONF.read_text())
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"[1-9]\d*(gb|mb)", conf["maxmemory"])
    # One file, three places.
    assert (CHART / "files" / "redis.conf").read_text() == REDIS_CONF.read_text()
    assert _obj("ConfigMap", "rvr-serve-redis-conf")["data"]["redis.conf"] == REDIS_CONF.read_text()
    # The container limit leaves room above maxmemory.
    limit = _container(_obj("StatefulSet", "rvr-serve-redis"))["resources"]["limits"]["memory"]
    assert int(limit.removesuffix("Gi")) > int(conf["maxmemory"].removesuffix("gb"))


def test_compose_redis_uses_the_conf_and_is_healthchecked() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    redis = services["redis"]
    (mount,) = [v for v in redis["volumes"] if v.startswith("./redis.conf:")]
    target = mount.split(":")[1]
    assert redis["command"][:2] == ["redis-server", target]
    assert "ping" in redis["healthcheck"]["test"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"][0] == "CMD"


def test_redis_server_loads_the_conf(tmp_path: Path) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    import redis

    # The file as shipped, but for the data dir (the volume at /data in the containers).
    text = REDIS_CONF.read_text()
    assert "\ndir /data\n" in text
    conf = tmp_path / "redis.conf"
    conf.write_text(text.replace("\ndir /data\n", f"\ndir {tmp_path}\n"))
    port = _free_port()
    args = [redis_server, str(conf), "--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, decode_responses=True)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.05)
        cfg = client.config_get("*")
        assert cfg["appendonly"] == "yes"
        assert cfg["appendfsync"] == "everysec"
        assert cfg["maxmemory-policy"] == "noeviction"
        assert int(cfg["maxmemory"]) == 4 * 1024**3
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


# ---- image ----
def test_dockerfile_non_root_installs_package_and_healthchecks() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build"
    final = stages[-1]
    users = [ln.split(None, 1)[1] for ln in final if ln.upper().startswith("USER ")]
    assert users, "the final stage sets USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    builder = " ".join(ln for stage in stages[:-1] for ln in stage)
    assert re.search(r'pip install "\$spec"', builder) and ".[${PIP_EXTRAS}]" in builder
    args = _dockerfile_args()
    assert "triton" in args["PIP_EXTRAS"].split(",")
    assert args["TORCH_VERSION"] == "2.13.0"
    assert "cpu" in builder and "TORCH_VARIANT" in args
    health = [ln for ln in final if ln.upper().startswith("HEALTHCHECK")]
    assert len(health) == 1 and "/livez" in health[0]
    entry = [ln for ln in final if ln.upper().startswith("ENTRYPOINT")]
    assert entry and '"rvr"' in entry[-1]
    # Every COPY source exists and the allow-list .dockerignore lets it into the context.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for ln in (ln for stage in stages for ln in stage if ln.upper().startswith("COPY ")):
        if "--from=" in ln:
            continue
        for src in ln.split()[1:-1]:
            assert (ROOT / src).exists(), src
            assert f"!{src.rstrip('/')}" in ignore or src.startswith("deploy/docker"), src
    assert "!deploy/docker" in ignore


def _image_refs() -> list[str]:
    refs = []
    for stage in _dockerfile_stages():
        for ln in stage:
            if ln.upper().startswith("FROM "):
                ref = ln.split()[1]
                refs.append(_dockerfile_args().get(ref[2:-1], ref) if ref.startswith("${") else ref)
    compose = yaml.safe_load(COMPOSE.read_text())
    refs += [svc["image"] for svc in compose["services"].values() if "image" in svc]
    for o in _k8s_objects():
        if o["kind"] in ("Deployment", "StatefulSet"):
            refs += [c["image"] for c in _pod(o)["containers"]]
    values = _values()
    refs += [f"{values['image']['repository']}:{values['image']['tag']}", values["redis"]["image"]]
    return refs


def test_no_latest_or_untagged_images() -> None:
    refs = _image_refs()
    assert len(refs) >= 8
    for ref in refs:
        name = ref.rsplit("/", 1)[-1]
        assert ":" in name, f"{ref}: no tag"
        assert name.split(":", 1)[1] != "latest", ref


def test_healthcheck_script_tries_api_then_worker_port(tmp_path: Path) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = 200 if self.path == "/livez" else 503
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    up, down = str(server.server_address[1]), str(_free_port())

    def run(path: str, api: str, worker: str) -> int:
        env = {"RVR_PORT": api, "RVR_WORKER_PORT": worker, "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, str(HEALTHCHECK), path], env=env, timeout=30).returncode

    try:
        assert run("/livez", up, down) == 0  # rvr serve
        assert run("/livez", down, up) == 0  # rvr worker
        assert run("/readyz", up, down) == 1  # 503 is unhealthy
        assert run("/livez", down, down) == 1
    finally:
        server.shutdown()
        server.server_close()


# ---- external tools, when present ----
def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == len(_k8s_objects())


def test_k8s_manifests_match_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for obj in _k8s_objects():
        kv.validate(obj, "1.30.0", strict=True)


def test_helm_template_matches_k8s(tmp_path: Path) -> None:
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not installed")
    out = subprocess.run(
        [helm, "template", "rvr-serve", str(CHART)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d}
    assert rendered == {(o["kind"], o["metadata"]["name"]) for o in _k8s_objects()}


def test_compose_matches_the_compose_spec() -> None:
    tool = shutil.which("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed")
    cmd = [tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_lints_clean() -> None:
    tool = shutil.which("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed")
    out = subprocess.run([tool, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
