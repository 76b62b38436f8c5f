"""deploy/: the Dockerfile, docker-compose.yml and Kubernetes manifests are checked statically
(no Docker engine or cluster here): they parse, every environment variable they set is a
loyalty-sync setting (or a documented third-party one), beat runs exactly once, services have
health checks/probes, images are pinned, and the image runs as a non-root user with no secret
baked in. The checkers return lists of problems; the negative tests prove they can fail.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"

# Environment variables that are not loyalty-sync settings, and who reads them.
THIRD_PARTY_ENV = {
    "POSTGRES_USER": "postgres image: the superuser to create",
    "POSTGRES_PASSWORD": "postgres image: its password (also interpolated into DATABASE_URL)",
    "POSTGRES_DB": "postgres image: the database to create",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus_client multiprocess directory (worker/metrics.py)",
    "PATH": "the shell: puts /app/.venv/bin first",
    "PYTHONUNBUFFERED": "CPython: unbuffered stdout/stderr (logs appear at once)",
    "PYTHONDONTWRITEBYTECODE": "CPython: no .pyc writes on a read-only root filesystem",
    "UV_COMPILE_BYTECODE": "uv (build stage): compile .pyc at install time",
    "UV_LINK_MODE": "uv (build stage): copy, not hard-link, from its cache mount",
    "UV_PYTHON_DOWNLOADS": "uv (build stage): use the image's Python, never download one",
    "UV_PROJECT_ENVIRONMENT": "uv (build stage): where the virtualenv goes",
}
# Services/Deployments without a health check, and why.
NO_HEALTHCHECK = {
    "migrate": "one-shot job: its exit code is the check",
    "beat": "no port; the container restarts when beat exits",
}
SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|(^|_)KEY$", re.IGNORECASE)


def settings_aliases() -> set[str]:
    return {field.alias for field in Settings.model_fields.values() if field.alias}


def unknown_env(names: Iterable[str]) -> list[str]:
    known = settings_aliases() | THIRD_PARTY_ENV.keys()
    return sorted({f"unknown environment variable {name}" for name in names if name not in known})


def image_problems(image: str) -> list[str]:
    """An image reference must carry an explicit tag (or digest) other than `latest`."""
    if "@sha256:" in image:
        return []
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # `registry:5000/x` has a colon but no tag
        return [f"image {image} has no tag"]
    if tag == "latest":
        return [f"image {image} uses the latest tag"]
    return []


# --- docker-compose.yml -----------------------------------------------------------------------


def load_compose(text: str | None = None) -> dict[str, Any]:
    data = yaml.safe_load(text if text is not None else COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose_env_names(compose: dict[str, Any], text: str) -> set[str]:
    names: set[str] = set()
    for service in compose["services"].values():
        env = service.get("environment") or {}
        if isinstance(env, list):
            names.update(item.split("=", 1)[0] for item in env)
        else:
            names.update(env)
    # Variables interpolated from the operator's shell / .env (`${NAME:-default}`).
    names.update(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    return names


def compose_problems(compose: dict[str, Any], text: str = "") -> list[str]:
    problems: list[str] = []
    services: dict[str, Any] = compose.get("services") or {}
    for required in ("postgres", "redis", "migrate", "api", "worker", "beat", "flower"):
        if required not in services:
            problems.append(f"service {required} missing")
    problems += unknown_env(compose_env_names(compose, text))
    for name, service in services.items():
        image = service.get("image")
        if not image:
            problems.append(f"{name}: no image")
        else:
            problems += [f"{name}: {p}" for p in image_problems(image)]
        check = service.get("healthcheck") or {}
        if name not in NO_HEALTHCHECK and (check.get("disable") or not check.get("test")):
            problems.append(f"{name}: no healthcheck")
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on without conditions")
            depends = {}
        for other, condition in depends.items():
            if other not in services:
                problems.append(f"{name}: depends on unknown service {other}")
            wanted = "service_completed_successfully" if other == "migrate" else "service_healthy"
            if (condition or {}).get("condition") != wanted:
                problems.append(f"{name}: depends_on {other} should wait for {wanted}")
    beat = services.get("beat", {})
    replicas = (beat.get("deploy") or {}).get("replicas")
    if replicas != 1:
        problems.append(f"beat: replicas must be exactly 1, not {replicas}")
    if beat.get("command") != ["beat"]:
        problems.append("beat: command must be ['beat']")
    if services.get("migrate", {}).get("command") != ["db", "upgrade"]:
        problems.append("migrate: command must be ['db', 'upgrade']")
    api_command = services.get("api", {}).get("command") or []
    if api_command[:3] != ["api", "--host", "0.0.0.0"]:
        problems.append("api: command must start with api --host 0.0.0.0")
    if services.get("worker", {}).get("command", [None])[0] != "worker":
        problems.append("worker: command must be worker")
    if not str(services.get("flower", {}).get("image", "")).startswith("mher/flower:"):
        problems.append("flower: must run the mher/flower image")
    for name in ("migrate", "api", "worker", "beat"):
        env = services.get(name, {}).get("environment") or {}
        if "DATABASE_URL" not in env or "CELERY_BROKER_URL" not in env:
            problems.append(f"{name}: DATABASE_URL and CELERY_BROKER_URL must be set")
    return problems


def test_compose_parses_and_passes() -> None:
    text = COMPOSE.read_text()
    compose = load_compose(text)
    assert compose_problems(compose, text) == []
    # The env of every app service comes from the one x-env anchor.
    envs = [compose["services"][name]["environment"] for name in ("migrate", "api", "beat")]
    assert envs[0] is envs[1] is envs[2]
    assert envs[0] == compose["x-env"]


def test_compose_checker_catches_mistakes() -> None:
    text = COMPOSE.read_text()
    compose = load_compose(text)
    broken = copy.deepcopy(compose)
    broken["services"]["beat"]["deploy"] = {"replicas": 2}
    broken["services"]["worker"]["environment"] = {"DATABSE_URL": "x"}
    broken["services"]["redis"]["image"] = "redis:latest"
    broken["services"]["flower"]["image"] = "mher/flower"
    del broken["services"]["api"]["healthcheck"]
    broken["services"]["api"]["depends_on"] = ["postgres"]
    problems = compose_problems(broken, text)
    for expected in (
        "beat: replicas must be exactly 1, not 2",
        "unknown environment variable DATABSE_URL",
        "redis: image redis:latest uses the latest tag",
        "flower: image mher/flower has no tag",
        "api: no healthcheck",
        "api: depends_on without conditions",
        "worker: DATABASE_URL and CELERY_BROKER_URL must be set",
    ):
        assert expected in problems, (expected, problems)
    assert "unknown environment variable MYSTERY" in compose_problems(
        compose, text + "\n# ${MYSTERY}\n"
    )


# --- Kubernetes -------------------------------------------------------------------------------


def load_k8s() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), path
                docs.append(doc)
    return docs


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc.get("kind") in ("Deployment", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _probe_path(container: dict[str, Any], probe: str) -> str | None:
    spec = container.get(probe) or {}
    return (spec.get("httpGet") or {}).get("path")


def k8s_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    by_kind: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in docs:
        if "namespace" in doc.get("metadata", {}):
            problems.append(f"{doc['metadata'].get('name')}: names a namespace")
        by_kind[(doc.get("kind", ""), doc.get("metadata", {}).get("name", ""))] = doc
    configmaps = {name for kind, name in by_kind if kind == "ConfigMap"}
    secrets = {name for kind, name in by_kind if kind == "Secret"}
    env_names: set[str] = set()
    for (kind, _name), doc in by_kind.items():
        if kind == "ConfigMap":
            env_names.update(doc.get("data") or {})
        if kind == "Secret":
            env_names.update(doc.get("stringData") or {})
            env_names.update(doc.get("data") or {})
            for key, value in (doc.get("stringData") or {}).items():
                if SECRETISH.search(key) and value not in ("change-me",):
                    problems.append(f"secret {key} is not a change-me placeholder")
    for name, spec in pod_specs(docs):
        security = spec.get("securityContext") or {}
        if security.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not set")
        for container in spec.get("containers", []):
            problems += [f"{name}: {p}" for p in image_problems(container.get("image", ""))]
            env_names.update(item["name"] for item in container.get("env") or [])
            for source in container.get("envFrom") or []:
                if "configMapRef" in source and source["configMapRef"]["name"] not in configmaps:
                    problems.append(f"{name}: unknown ConfigMap {source['configMapRef']['name']}")
                if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                    problems.append(f"{name}: unknown Secret {source['secretRef']['name']}")
            if not container.get("envFrom"):
                problems.append(f"{name}: env not from the ConfigMap/Secret")
            if not (container.get("resources") or {}).get("requests"):
                problems.append(f"{name}: no resource requests")
            if (container.get("securityContext") or {}).get(
                "allowPrivilegeEscalation"
            ) is not False:
                problems.append(f"{name}: allowPrivilegeEscalation is not false")
    problems += unknown_env(env_names)

    def deployment(component: str) -> dict[str, Any]:
        found = by_kind.get(("Deployment", f"loyalty-sync-{component}"))
        if found is None:
            problems.append(f"Deployment loyalty-sync-{component} missing")
            return {"spec": {"template": {"spec": {"containers": [{}]}}}}
        return found

    api = deployment("api")
    [api_container] = api["spec"]["template"]["spec"]["containers"]
    if api["spec"].get("replicas") != 2:
        problems.append("api: replicas must be 2")
    for probe in ("readinessProbe", "livenessProbe"):
        if _probe_path(api_container, probe) != "/healthz":
            problems.append(f"api: {probe} must GET /healthz")
    if api_container.get("args", [None])[0] != "api":
        problems.append("api: args must run api")
    service = by_kind.get(("Service", "loyalty-sync-api"))
    if service is None:
        problems.append("Service loyalty-sync-api missing")
    elif (
        service["spec"]["selector"].items() - api["spec"]["template"]["metadata"]["labels"].items()
    ):
        problems.append("Service loyalty-sync-api selects no api pod")
    worker = deployment("worker")
    [worker_container] = worker["spec"]["template"]["spec"]["containers"]
    if worker["spec"].get("replicas") != 2:
        problems.append("worker: replicas must be 2")
    if _probe_path(worker_container, "livenessProbe") is None:
        problems.append("worker: no liveness probe")
    beat = deployment("beat")
    if beat["spec"].get("replicas") != 1:
        problems.append(f"beat: replicas must be exactly 1, not {beat['spec'].get('replicas')}")
    if (beat["spec"].get("strategy") or {}).get("type") != "Recreate":
        problems.append("beat: strategy must be Recreate")
    job = by_kind.get(("Job", "loyalty-sync-migrate"))
    if job is None:
        problems.append("Job loyalty-sync-migrate missing")
    elif job["spec"]["template"]["spec"]["containers"][0].get("args") != ["db", "upgrade"]:
        problems.append("migrate: args must be db upgrade")
    return problems


def test_k8s_manifests_parse_and_pass() -> None:
    docs = load_k8s()
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "Deployment",
        "Job",
        "Kustomization",
        "Secret",
        "Service",
    ]
    assert k8s_problems(docs) == []


def test_k8s_configuration_is_accepted_by_settings() -> None:
    """The ConfigMap + Secret values are valid settings (types, ranges), not only known names."""
    docs = load_k8s()
    values: dict[str, Any] = {}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            values.update(doc["data"])
        if doc["kind"] == "Secret":
            values.update(doc["stringData"])
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    assert settings.metrics_port == 9100
    assert settings.database_url.startswith("postgresql://")
    assert settings.shopify_secrets() == ("change-me",)


def test_k8s_checker_catches_mistakes() -> None:
    docs = copy.deepcopy(load_k8s())
    for doc in docs:
        name = doc.get("metadata", {}).get("name")
        if name == "loyalty-sync-beat":
            doc["spec"]["replicas"] = 2
            doc["spec"]["strategy"] = {"type": "RollingUpdate"}
        if name == "loyalty-sync-api" and doc["kind"] == "Deployment":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            del container["readinessProbe"]
            container["image"] = "loyalty-sync:latest"
            container["env"] = [{"name": "LOYALTY_MODE", "value": "x"}]
            del doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
        if doc["kind"] == "Secret":
            doc["stringData"]["SECRET_KEY"] = "a-real-looking-key"
            doc["metadata"]["namespace"] = "prod"
    problems = k8s_problems(docs)
    for expected in (
        "beat: replicas must be exactly 1, not 2",
        "beat: strategy must be Recreate",
        "api: readinessProbe must GET /healthz",
        "loyalty-sync-api: image loyalty-sync:latest uses the latest tag",
        "unknown environment variable LOYALTY_MODE",
        "loyalty-sync-api: runAsNonRoot is not set",
        "secret SECRET_KEY is not a change-me placeholder",
        "loyalty-sync-secrets: names a namespace",
    ):
        assert expected in problems, (expected, problems)


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """`(INSTRUCTION, arguments)` with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    out = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _env_pairs(args: str) -> list[tuple[str, str]]:
    parts = shlex.split(args)
    if len(parts) >= 2 and "=" not in parts[0]:  # legacy `ENV NAME value`
        return [(parts[0], " ".join(parts[1:]))]
    return [tuple(part.split("=", 1)) for part in parts if "=" in part]  # type: ignore[misc]


def dockerfile_problems(text: str) -> list[str]:
    problems: list[str] = []
    steps = dockerfile_instructions(text)
    args = {}
    for instruction, rest in steps:
        if instruction == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
    stages: list[tuple[str, str]] = []  # (image, alias)
    for instruction, rest in steps:
        if instruction == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append((image, alias))
            problems += image_problems(image)
    if len(stages) < 2:
        problems.append("not a multi-stage build")
    if not any(image.startswith("ghcr.io/astral-sh/uv:") for image, _ in stages):
        problems.append("uv does not come from ghcr.io/astral-sh/uv")
    final_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    final = steps[final_from:]
    if "slim" not in stages[-1][0]:
        problems.append("runtime stage is not a slim Python image")
    users = [rest for ins, rest in final if ins == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("runtime stage runs as root")
    if ("ENTRYPOINT", '["loyalty-sync"]') not in final:
        problems.append('ENTRYPOINT must be ["loyalty-sync"]')
    if not any(ins == "EXPOSE" and "8000" in rest.split() for ins, rest in final):
        problems.append("EXPOSE 8000 missing")
    if not any(ins == "HEALTHCHECK" and "/healthz" in rest for ins, rest in final):
        problems.append("HEALTHCHECK against /healthz missing")
    if not any(ins == "WORKDIR" and rest == "/app" for ins, rest in final):
        problems.append("runtime WORKDIR is not /app")
    copies = [rest for ins, rest in steps if ins == "COPY"]
    lock_copy = next((i for i, rest in enumerate(copies) if "uv.lock" in rest), None)
    source_copy = next((i for i, rest in enumerate(copies) if re.search(r"\bworker\b", rest)), None)
    if lock_copy is None or "pyproject.toml" not in copies[lock_copy]:
        problems.append("uv.lock and pyproject.toml are not copied on their own")
    elif source_copy is None or source_copy < lock_copy:
        problems.append("the source is copied before the lock file (no layer caching)")
    runs = " ".join(rest for ins, rest in steps if ins == "RUN")
    if "uv sync --frozen --no-dev" not in runs:
        problems.append("no `uv sync --frozen --no-dev`")
    for ins, rest in steps:
        if ins == "ENV":
            for name, value in _env_pairs(rest):
                problems += unknown_env([name])
                if SECRETISH.search(name) and value:
                    problems.append(f"secret {name} baked into the image")
        if ins == "ARG" and SECRETISH.search(rest.split("=")[0]):
            problems.append(f"secret build argument {rest.split('=')[0]}")
        if ins == "COPY" and re.search(r"(^|\s|/)\.env(\s|$)", rest):
            problems.append("a .env file is copied into the image")
    return problems


def test_dockerfile_structure() -> None:
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text) == []
    stages = [rest for ins, rest in dockerfile_instructions(text) if ins == "FROM"]
    assert [s.split()[-1] for s in stages] == ["uv", "builder", "runtime"]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore  # deny by default: no .env, var/ or .venv in the build context


def test_dockerfile_checker_catches_mistakes() -> None:
    text = DOCKERFILE.read_text()
    broken = text.replace("USER 10001:10001", "USER root").replace(
        "LOG_FORMAT=json", "LOG_FORMAT=json SECRET_KEY=abc123"
    )
    broken = broken.replace(
        "FROM ghcr.io/astral-sh/uv:0.13.9 AS uv", "FROM ghcr.io/astral-sh/uv AS uv"
    )
    broken += "\nENV SOME_TUNING=1\nCOPY .env /app/.env\n"
    problems = dockerfile_problems(broken)
    for expected in (
        "runtime stage runs as root",
        "secret SECRET_KEY baked into the image",
        "image ghcr.io/astral-sh/uv has no tag",
        "unknown environment variable SOME_TUNING",
        "a .env file is copied into the image",
    ):
        assert expected in problems, (expected, problems)
    single = 'FROM python:3.11-slim\nCOPY . /app\nRUN pip install .\nENTRYPOINT ["x"]\n'
    assert "not a multi-stage build" in dockerfile_problems(single)


@pytest.mark.parametrize(
    ("image", "ok"),
    [
        ("postgres:17.2-bookworm", True),
        ("registry.example.com:5000/loyalty-sync:0.1.0", True),
        ("registry.example.com:5000/loyalty-sync", False),
        ("redis", False),
        ("redis:latest", False),
        ("mher/flower@sha256:" + "0" * 64, True),
    ],
)
def test_image_pinning_rule(image: str, ok: bool) -> None:
    assert (image_problems(image) == []) is ok


# --- the run-book --------------------------------------------------------------------------------


def test_runbook_covers_the_operations() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "loyalty-sync db upgrade",
        "--queues webhooks",
        "syncs",
        "outbox",
        "beat",
        "SHOPIFY_API_SECRETS",
        "SQUARE_WEBHOOK_SIGNATURE_KEY",
        "loyalty-sync events replay --status failed",
        "loyalty-sync outbox retry --status failed",
        "/metrics",
        "METRICS_PORT",
        "pg_dump",
    ):
        assert needle in text, needle
