"""The Docker build contexts, checked without a Docker engine (the compose tier builds them).

The classic builder (docker-compose v1, a docker CLI without buildx) reads only the root
.dockerignore; BuildKit reads docker/<name>.Dockerfile.dockerignore instead. A file that a
Dockerfile copies from the repository root must be let through by both, or one of the two
builders fails with "no such file".
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ROOT_CONTEXT_DOCKERFILES = ["docker/gateway.Dockerfile", "docker/triton.Dockerfile"]


def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].upper() == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return sources


def _allowed(ignore_file: Path) -> set[str]:
    return {line[1:] for line in ignore_file.read_text().splitlines() if line.startswith("!")}


@pytest.mark.parametrize("dockerfile", ROOT_CONTEXT_DOCKERFILES)
def test_both_builders_see_what_a_dockerfile_copies(dockerfile: str) -> None:
    sources = _copy_sources(ROOT / dockerfile)
    assert sources
    for ignore in (ROOT / ".dockerignore", ROOT / f"{dockerfile}.dockerignore"):
        assert set(sources) <= _allowed(ignore), (ignore.name, set(sources) - _allowed(ignore))
        rules = [line for line in ignore.read_text().splitlines() if line and not line.startswith("#")]
        assert rules[0] == "*", ignore.name  # everything else stays out (.venv, model_repository, .env)
    for source in sources:
        assert (ROOT / source).exists(), source


def test_compose_builds_from_the_contexts_the_dockerfiles_expect() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    builds = {name: s["build"] for name, s in services.items() if "build" in s}
    assert builds["gateway"]["context"] == "." and builds["triton"]["context"] == "."
    for name, build in builds.items():
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        assert build["network"] == "host", name  # the engine here has no bridge
    assert all(s.get("network_mode") == "host" for s in services.values())


def test_prometheus_scrapes_the_compose_defaults() -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in config["scrape_configs"]}
    assert targets == {"gateway": ["127.0.0.1:8080"], "triton": ["127.0.0.1:8002"]}
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "${GPT2_GATEWAY_PORT:-8080}" in compose and "${GPT2_TRITON_METRICS_PORT:-8002}" in compose
    run = (ROOT / "docker" / "prometheus-run.sh").read_text()
    assert "127\\.0\\.0\\.1:8080" in run and "127\\.0\\.0\\.1:8002" in run  # the ports it rewrites
