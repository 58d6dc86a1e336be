"""The container files hold together: Dockerfile, docker/docker-compose.yml, docker/compose-scale-out.yml,
config/docker.toml, .dockerignore.

No Docker engine runs here, so nothing is built; instead the wiring an engine would rely on is checked:
the node's config loads with exactly the environment the image and the compose file give it, its
destination is the compose file's Orthanc (host, port, AE title) and Orthanc knows the node's AE title,
data lives on volumes, the token is required and never defaulted, the image runs as a non-root user
with a working health check.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, read_sop_uid, series_files, storescu, wait_for_echo
from sqlalchemy import create_engine, text

from node.config import load_config
from node.decide.compile import load_checked_config

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "docker-compose.yml"
SCALE_OUT = REPO / "docker" / "compose-scale-out.yml"
DOCKER_TOML = REPO / "config" / "docker.toml"
TOKEN = "test-token-0123456789abcdefXYZ"
DOTENV = {"DICOM_NODE_WEB__TOKEN": TOKEN, "ORTHANC_ADMIN_PASSWORD": "test-password", "POSTGRES_PASSWORD": "pg-pw_1"}

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        got = env.get(name)
        if op in (":?", "?") and (got is None or (op == ":?" and got == "")):
            raise KeyError(f"required variable {name}: {arg}")
        if op in (":-", "-") and (got is None or (op == ":-" and got == "")):
            return arg
        return got or ""

    return _VAR.sub(one, value)


def resolved(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolved(x, env) for x in node]
    if isinstance(node, dict):
        return {k: resolved(v, env) for k, v in node.items()}
    return node


def compose(env: dict[str, str] | None = None, path: Path = COMPOSE) -> dict[str, Any]:
    return resolved(yaml.safe_load(path.read_text()), DOTENV if env is None else env)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    e = service.get("environment", {})
    if isinstance(e, list):
        e = dict(item.split("=", 1) for item in e)
    return {k: str(v) for k, v in e.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instr = dockerfile_instructions()
    start = max(i for i, (w, _) in enumerate(instr) if w == "FROM")
    return instr[start:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            for item in shlex.split(args):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def node_env() -> dict[str, str]:
    """What the node process sees in the compose setup: the image's ENV, then the compose file's environment."""
    return {**image_env(), **env_of(compose()["services"]["dicom-node"])}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume or a host path) of a service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def under(path: str | Path, folder: str) -> bool:
    return Path(path) == Path(folder) or Path(folder) in Path(path).parents


@pytest.fixture(scope="module")
def cfg():
    return load_checked_config(DOCKER_TOML, environ=node_env())


def test_the_config_loads_with_the_containers_environment(cfg):
    assert cfg.node.host == "0.0.0.0" and cfg.node.port == 11112
    assert cfg.web.enabled and cfg.web.host == "0.0.0.0" and cfg.web.port == 8080
    assert cfg.web.auth == "token" and cfg.web.token == TOKEN, "the token comes from the compose environment"
    rule = next(r for r in cfg.rules if r["name"] == "ct-seg-and-mip")
    plugins = {a.get("plugin"): a for a in rule["actions"] if a["type"] == "plugin"}
    assert set(plugins) == {"threshold-seg", "mip-sc"}
    assert all(a["send_to"] == ["pacs"] for a in plugins.values())
    assert cfg.ruleset is not None


def test_the_token_is_required_and_never_defaulted():
    assert load_config(DOCKER_TOML, environ={}).web.token == ""
    assert not re.search(r"^\s*token\s*=", DOCKER_TOML.read_text(), re.M), "no token in the config file"
    raw = yaml.safe_load(COMPOSE.read_text())["services"]["dicom-node"]["environment"]["DICOM_NODE_WEB__TOKEN"]
    assert re.fullmatch(r"\$\{DICOM_NODE_WEB__TOKEN:\?[^}]+\}", raw), raw
    with pytest.raises(KeyError, match="DICOM_NODE_WEB__TOKEN"):
        compose({"ORTHANC_ADMIN_PASSWORD": "x"})
    with pytest.raises(KeyError, match="DICOM_NODE_WEB__TOKEN"):
        compose({"ORTHANC_ADMIN_PASSWORD": "x", "DICOM_NODE_WEB__TOKEN": ""})
    assert (REPO / "docker" / ".env.example").is_file()
    assert ".env" in (REPO / "docker" / ".gitignore").read_text().split()


def test_the_pacs_destination_is_the_compose_files_orthanc(cfg):
    services = compose()["services"]
    pacs = next(d for d in cfg.destinations if d.name == "pacs")
    assert pacs.host in services, f"destination host {pacs.host!r} is not a compose service"
    orthanc = services[pacs.host]
    assert "orthanc" in orthanc["image"]
    conf = json.loads(env_of(orthanc)["ORTHANC_JSON"])
    assert pacs.port == conf.get("DicomPort", 4242)
    assert pacs.ae_title == conf.get("DicomAet", "ORTHANC")
    # Orthanc knows the node as a modality (AE title, host = the node's service, DICOM port) and only
    # known modalities may store.
    node_service = next(name for name, s in services.items() if "dicom-node" in s.get("image", "") or "build" in s)
    assert [cfg.node.ae_title, node_service, cfg.node.port] in conf["DicomModalities"].values()
    assert conf["DicomAlwaysAllowStore"] is False
    assert conf["RegisteredUsers"] == {"admin": DOTENV["ORTHANC_ADMIN_PASSWORD"]}
    assert conf.get("AuthenticationEnabled", True) is True


def test_data_lives_on_named_volumes(cfg):
    c = compose()
    node, orthanc = c["services"]["dicom-node"], c["services"]["orthanc"]
    named = set(c["volumes"])
    node_volume = next(target for target, src in mounts(node).items() if src in named)
    assert under(cfg.node.data_dir, node_volume), f"data_dir {cfg.node.data_dir} is not on a volume"
    conf = json.loads(env_of(orthanc)["ORTHANC_JSON"])
    orthanc_volumes = [target for target, src in mounts(orthanc).items() if src in named]
    for key in ("StorageDirectory", "IndexDirectory"):
        assert any(under(conf[key], t) for t in orthanc_volumes), f"Orthanc's {key} is not on a volume"
    # The image declares the same folder a volume, owned by the user the node runs as.
    assert any(w == "VOLUME" and node_volume in args for w, args in final_stage())


def test_the_node_service_runs_the_docker_config_and_publishes_its_ports(cfg):
    node = compose()["services"]["dicom-node"]
    command = node["command"]
    config_path = command[command.index("--config") + 1]
    assert mounts(node).get(config_path) == "../config/docker.toml"
    assert (COMPOSE.parent / "../config/docker.toml").resolve() == DOCKER_TOML
    assert {cfg.node.port, cfg.web.port} <= container_ports(node)
    web = next(p for p in node["ports"] if str(p).endswith(f":{cfg.web.port}"))
    assert str(web).startswith("127.0.0.1:"), "the web port is published on the host's loopback only"
    assert node["build"]["dockerfile"] == "docker/Dockerfile"
    assert (COMPOSE.parent / node["build"]["context"]).resolve() == REPO
    assert node.get("init") is True
    assert "orthanc" in node["depends_on"]


def test_the_image_runs_as_a_non_root_user_with_a_health_check(cfg):
    stage = final_stage()
    users = [args for w, args in stage if w == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    exposed = {int(p.split("/")[0]) for w, args in stage if w == "EXPOSE" for p in args.split()}
    assert {cfg.node.port, cfg.web.port} <= exposed
    checks = [args for w, args in stage if w == "HEALTHCHECK"]
    assert len(checks) == 1 and "/healthz" in checks[0] and "urllib" in checks[0]
    assert f"'{cfg.web.port}'" in checks[0], "the health check's default port is the config's web port"
    # Installed as the README says, into the image (not editable).
    runs = " ".join(args for w, args in dockerfile_instructions() if w == "RUN")
    assert re.search(r'pip install (--\S+ )*"?\.(\[[\w,]+\])?"?(\s|$)', runs), runs
    assert re.search(r'pip install (--\S+ )*"?\.\[([\w,]*,)?postgres[],]', runs), "the image has the PostgreSQL driver"
    assert not re.search(r"pip install[^&]*\s-e\s", runs)
    copies = [args for w, args in stage if w == "COPY"]
    assert any("config/docker.toml" in c for c in copies), "the image carries config/docker.toml"


def _healthcheck_argv() -> list[str]:
    args = next(a for w, a in final_stage() if w == "HEALTHCHECK")
    return json.loads(args[args.index("CMD") + 3 :].strip())


@pytest.mark.parametrize("status", [200, 503])
def test_the_health_check_command_follows_healthz(status):
    """The HEALTHCHECK's command, run as written, exits 0 on 200 and non-zero otherwise."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        argv = _healthcheck_argv()
        assert argv[0] == "python"
        env = {**os.environ, "DICOM_NODE_WEB__PORT": str(server.server_address[1])}
        r = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
        assert (r.returncode == 0) == (status == 200), r.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_dockerignore_keeps_secrets_and_local_state_out_but_not_the_package():
    lines = {
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    for must in (".git/", "var/", "tests/", ".env", "**/.env", "**/__pycache__/"):
        assert must in lines, must
    for needed in ("node", "node/", "pyproject.toml", "README.md", "config", "config/", "*"):
        assert needed not in lines, needed


def test_the_node_runs_on_the_docker_config(tmp_path):
    """``dicom-node run --config config/docker.toml`` with the container's environment, moved to free loopback
    ports and a temp data dir: the node starts (rules, plugins and destination accepted) and answers C-ECHO and,
    where the web server is there, /healthz; SIGTERM stops it cleanly."""
    port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update(node_env())
    env.update(
        {
            "DICOM_NODE_NODE__HOST": "127.0.0.1",
            "DICOM_NODE_NODE__PORT": str(port),
            "DICOM_NODE_NODE__DATA_DIR": str(tmp_path / "data"),
            "DICOM_NODE_WEB__HOST": "127.0.0.1",
            "DICOM_NODE_WEB__PORT": str(web_port),
        }
    )
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", "run", "--config", str(DOCKER_TOML)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_echo(port, "DICOM_NODE", timeout=60, proc=proc)
        status = None
        deadline = time.monotonic() + 15
        while status is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=5) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        if status is not None or _web_server_exists():
            assert status == 200, f"/healthz answered {status}"
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            rc = None
    assert rc == 0, (tmp_path / "node.log").read_text(errors="replace")[-2000:]


def _web_server_exists() -> bool:
    """Until the web server is written (WebSection exists before it), nothing answers /healthz."""
    import importlib.util

    return importlib.util.find_spec("node.web") is not None


def test_pip_install_dot_carries_every_file_of_the_package(tmp_path):
    """The image installs with ``pip install .`` (not editable): every file under node/ -- templates, static
    files, migrations, demo data -- must be in the wheel, or the container lacks it (pyproject's package-data)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "node", src / "node", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with open(tmp_path / "pip.log", "wb") as log:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(tmp_path / "wheel"),
                str(src),
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert r.returncode == 0, (tmp_path / "pip.log").read_text()[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    present = {p.relative_to(src).as_posix() for p in (src / "node").rglob("*") if p.is_file()}
    missing = sorted(present - packaged)
    assert not missing, f"not installed by pip install . (add them to [tool.setuptools.package-data]): {missing}"


# -- docker/compose-scale-out.yml: two nodes on one PostgreSQL and one data volume behind HAProxy


def scale_out(env: dict[str, str] | None = None) -> dict[str, Any]:
    return compose(env, SCALE_OUT)


def node_services(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in c["services"].items() if s.get("image") == "dicom-node:latest"}


def scale_out_cfg(service: dict[str, Any]) -> Any:
    """The config a scale-out node runs with: docker.toml, the image's ENV, then the service's environment."""
    command = service["command"]
    assert mounts(service)[command[command.index("--config") + 1]] == "../config/docker.toml"
    return load_checked_config(DOCKER_TOML, environ={**image_env(), **env_of(service)})


def haproxy_config(c: dict[str, Any]) -> str:
    lb = c["services"]["dicom-lb"]
    (cfg,) = lb["configs"]
    assert cfg["target"] == "/usr/local/etc/haproxy/haproxy.cfg"
    return str(c["configs"][cfg["source"]]["content"])


def test_scale_out_nodes_share_one_index_and_one_data_directory():
    c = scale_out()
    nodes = node_services(c)
    assert len(nodes) >= 2, "the scale-out compose runs several nodes"
    cfgs = {name: scale_out_cfg(s) for name, s in nodes.items()}
    urls = {cfg.database_url for cfg in cfgs.values()}
    assert len(urls) == 1, f"every node must use the same index: {urls}"
    (url,) = urls
    from sqlalchemy.engine import make_url

    u = make_url(url)
    assert u.drivername == "postgresql+psycopg", "several nodes share a PostgreSQL index, not SQLite"
    pg = c["services"][u.host]
    assert "postgres" in pg["image"]
    pg_env = env_of(pg)
    assert (u.username, u.password, u.database, u.port) == (
        pg_env["POSTGRES_USER"],
        DOTENV["POSTGRES_PASSWORD"],
        pg_env["POSTGRES_DB"],
        5432,
    )
    assert pg_env["POSTGRES_PASSWORD"] == DOTENV["POSTGRES_PASSWORD"]
    assert nodes and all(s["depends_on"]["postgres"]["condition"] == "service_healthy" for s in nodes.values())
    # One data directory: the same named volume at the same path in every node, holding data_dir.
    named = set(c["volumes"])
    data_volumes = {
        name: {(src, target) for target, src in mounts(s).items() if src in named} for name, s in nodes.items()
    }
    assert len({frozenset(v) for v in data_volumes.values()}) == 1, data_volumes
    (volume,) = next(iter(data_volumes.values()))
    assert all(under(cfg.node.data_dir, volume[1]) for cfg in cfgs.values())
    assert len({cfg.node.data_dir for cfg in cfgs.values()}) == 1
    assert any(target == "/var/lib/postgresql/data" and src in named for target, src in mounts(pg).items())
    for cfg in cfgs.values():
        assert cfg.web.token == TOKEN and cfg.node.lease >= 3 and cfg.node.processes >= 1


def test_scale_out_secrets_are_required_and_never_defaulted():
    for missing in DOTENV:
        with pytest.raises(KeyError, match=missing):
            scale_out({k: v for k, v in DOTENV.items() if k != missing})
        with pytest.raises(KeyError, match=missing):
            scale_out({**DOTENV, missing: ""})
    assert "POSTGRES_PASSWORD=" in (REPO / "docker" / ".env.example").read_text().split()


def test_scale_out_dicom_goes_through_the_load_balancer_to_every_node():
    c = scale_out()
    nodes = node_services(c)
    cfgs = {name: scale_out_cfg(s) for name, s in nodes.items()}
    conf = haproxy_config(c)
    assert re.search(r"^\s*mode tcp\b", conf, re.M), "DICOM is balanced as TCP (one association per connection)"
    servers = dict(re.findall(r"^\s*server\s+\S+\s+([\w.-]+):(\d+)", conf, re.M))
    assert {h: int(p) for h, p in servers.items()} == {name: cfg.node.port for name, cfg in cfgs.items()}
    (bind,) = re.findall(r"^\s*bind\s+\S*:(\d+)", conf, re.M)
    assert int(bind) in container_ports(c["services"]["dicom-lb"])
    # The nodes publish only their dashboards, each on its own loopback port; DICOM comes through the balancer.
    host_ports = []
    for name, s in nodes.items():
        assert cfgs[name].node.port not in container_ports(s), f"{name} publishes DICOM past the balancer"
        (web,) = s["ports"]
        assert str(web).startswith("127.0.0.1:") and str(web).endswith(f":{cfgs[name].web.port}")
        host_ports.append(str(web).split(":")[1])
        assert s.get("init") is True and s["build"]["dockerfile"] == "docker/Dockerfile"
    assert len(set(host_ports)) == len(host_ports), "each node's dashboard on its own host port"
    # Every association arrives from the balancer's address: one address may hold every pending connection.
    for cfg in cfgs.values():
        assert cfg.node.max_pending_per_address >= cfg.node.max_pending_connections
    # The balancer outlasts the node's idle timeout: the node ends idle associations, not the balancer.
    for side in ("client", "server"):
        (value,) = re.findall(rf"^\s*timeout {side}\s+(\d+)([sm])", conf, re.M)
        seconds = int(value[0]) * (60 if value[1] == "m" else 1)
        assert all(seconds > cfg.node.network_timeout for cfg in cfgs.values()), side
    # Orthanc knows the node by its AE title at the balancer, and the destination is the compose's Orthanc.
    orthanc = json.loads(env_of(c["services"]["orthanc"])["ORTHANC_JSON"])
    any_cfg = next(iter(cfgs.values()))
    assert [any_cfg.node.ae_title, "dicom-lb", int(bind)] in orthanc["DicomModalities"].values()
    pacs = next(d for d in any_cfg.destinations if d.name == "pacs")
    assert pacs.host == "orthanc" and pacs.port == orthanc["DicomPort"] and pacs.ae_title == orthanc["DicomAet"]


def _haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if not found:
        pytest.fail("HAProxy is not installed (scripts/test.sh installs the Debian package haproxy)")
    return found


def test_the_scale_out_setup_runs_two_nodes_behind_its_load_balancer(tmp_path, postgres_url):
    """The compose file's nodes and HAProxy configuration, moved to loopback ports, a temp data directory and a
    test database: associations through the balancer reach both nodes, every instance is indexed once, and a
    dashboard login made on one node works on the other (sessions live in the shared index)."""
    c = scale_out()
    nodes = node_services(c)
    data = tmp_path / "data"
    ports = {name: (free_port(), free_port()) for name in nodes}
    lb_port = free_port()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, service in nodes.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env.update({**image_env(), **env_of(service)})
        env.update(
            {
                "DICOM_NODE_NODE__HOST": "127.0.0.1",
                "DICOM_NODE_NODE__PORT": str(ports[name][0]),
                "DICOM_NODE_NODE__DATA_DIR": str(data),
                "DICOM_NODE_WEB__HOST": "127.0.0.1",
                "DICOM_NODE_WEB__PORT": str(ports[name][1]),
                "DICOM_NODE_DATABASE__URL": postgres_url,
            }
        )
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "node", "run", "--config", str(DOCKER_TOML)],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
    conf = haproxy_config(c)
    conf = re.sub(r"^(\s*bind\s+)\S+", rf"\g<1>127.0.0.1:{lb_port}", conf, flags=re.M)
    for name in nodes:
        conf = re.sub(rf"\b{re.escape(name)}:\d+", f"127.0.0.1:{ports[name][0]}", conf)
    (tmp_path / "haproxy.cfg").write_text(conf)
    lb: subprocess.Popen[bytes] | None = None
    try:
        for name, proc in procs.items():
            try:
                wait_for_echo(ports[name][0], "DICOM_NODE", timeout=90, proc=proc)
            except (RuntimeError, TimeoutError) as e:
                raise AssertionError(f"{name}: {e}\n{(tmp_path / f'{name}.log').read_text(errors='replace')[-3000:]}")
        with open(tmp_path / "haproxy.log", "wb") as log:
            lb = subprocess.Popen(
                [_haproxy(), "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_echo(lb_port, "DICOM_NODE", timeout=30, proc=lb)
        files = series_files("ct-head-philips-5mm")[:12]
        # One association per file: leastconn hands consecutive ones to the nodes in turn.
        for f in files:
            r = storescu(lb_port, [f])
            assert r.returncode == 0, r.stderr
        engine = create_engine(postgres_url)
        try:
            with engine.connect() as conn:
                indexed = conn.execute(text("SELECT sop_instance_uid FROM instance")).scalars().all()
        finally:
            engine.dispose()
        assert sorted(indexed) == sorted(read_sop_uid(f) for f in files), "every instance indexed once"
        for name in nodes:
            log = (tmp_path / f"{name}.log").read_text(errors="replace")
            assert "STORESCU" in log, f"no association reached {name} through the balancer:\n{log[-2000:]}"
        # A dashboard login on the first node is a login on the second.
        first, second = (f"http://127.0.0.1:{ports[name][1]}" for name in nodes)
        cookie = _login(first)
        req = urllib.request.Request(f"{second}/", headers={"Cookie": cookie})
        with urllib.request.urlopen(req, timeout=10) as page:
            assert page.status == 200 and "/login" not in page.url, page.url
    finally:
        if lb is not None:
            lb.terminate()
            lb.wait(timeout=30)
        codes = {}
        for proc in procs.values():
            proc.terminate()
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(timeout=10)
    for name, code in codes.items():
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert code == 0 and "Traceback" not in log, f"{name} exited with {code}:\n{log[-3000:]}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _login(base: str) -> str:
    """Log in with the token through the form; returns the session cookie (``name=value``)."""
    opener = urllib.request.build_opener(_NoRedirect)
    body = f"token={TOKEN}&next=/".encode()
    req = urllib.request.Request(
        f"{base}/login", data=body, headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": base}
    )
    try:
        opener.open(req, timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 303, e.code
        cookie = e.headers["Set-Cookie"]
    else:
        raise AssertionError("the login did not redirect")
    return str(cookie.split(";", 1)[0])
