"""The deploy files parse and keep secrets out (no Docker engine here: parse, don't run)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml
from conftest import TUNER, run_cli

ROOT = Path(__file__).resolve().parent.parent


def _strings(node: object) -> list[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _no_plaintext_secret(document: object) -> None:
    for text in _strings(document):
        assert not re.search(r"postgres(ql)?(\+\w+)?://[^/@\s]*:[^/@\s]+@", text), text
        assert not re.search(r"(PASSWORD|TOKEN)\s*[=:]\s*\S", text), text


def test_compose_runs_the_stack_with_secrets_from_files_and_nothing_public() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"postgres", "dashboard", "ray-head", "ray-worker", "sweep"}
    _no_plaintext_secret(compose)

    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/pg_password"
    assert "pg_password" in postgres["secrets"]
    assert postgres["healthcheck"]["test"] and "studies" in compose["volumes"]
    assert (ROOT / "deploy/postgres/init.sql").exists()
    for name, secret in compose["secrets"].items():
        assert set(secret) == {"file"}, name  # a file made by hand, git-ignored
        ignored = subprocess.run(["git", "check-ignore", "-q", secret["file"]], cwd=ROOT)
        assert ignored.returncode == 0, f"{secret['file']} must be git-ignored"

    # Nothing is published on all interfaces.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)

    dashboard = services["dashboard"]
    assert dashboard["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "--read-only" in dashboard["command"] or "--token" in dashboard["command"]

    worker = services["ray-worker"]
    (gpus,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["capabilities"] == ["gpu"] and gpus["driver"] == "nvidia"
    for node in ("ray-head", "ray-worker"):
        assert services[node]["shm_size"].endswith("gb")
        assert "ray_token" in services[node]["secrets"]  # token auth on (the entrypoint)

    sweep = services["sweep"]
    assert sweep["restart"] == "no" and sweep["profiles"] == ["sweep"]
    assert sweep["command"][:3] == ["tuner", "sweep", "run"]
    space = sweep["command"][sweep["command"].index("--space") + 1]
    assert (ROOT / space.removeprefix("/app/")).exists()  # the image copies the repo to /app
    help_text = run_cli("sweep", "run", "--help").stdout
    for flag in (a for a in sweep["command"] if a.startswith("--")):
        assert flag in help_text, flag
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY search_spaces" in dockerfile and "WORKDIR /app" in dockerfile


def test_the_compose_dashboard_command_serves_read_only(pg_url: str, tmp_path: Path) -> None:
    """The dashboard service, started directly as compose would (on another port)."""
    import urllib.error
    import urllib.request

    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["dashboard"][
        "command"
    ]
    argv = [*TUNER, *command[1:]]
    argv[argv.index("--port") + 1] = "0"
    proc = subprocess.Popen(
        argv, env={**os.environ, "TUNER_STORAGE": pg_url}, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stderr.readline()
        base = re.search(r"(http://\S+?)/dashboard", line)[1].replace("0.0.0.0", "127.0.0.1")
        with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as response:
            assert response.status == 200
        request = urllib.request.Request(f"{base}/api/studies", data=b"{}", method="POST")
        try:
            urllib.request.urlopen(request, timeout=30)
            raise AssertionError("a write was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 403
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_image_entrypoint_reads_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "pg_password").write_text("s3cret\n")
    (tmp_path / "ray_token").write_text("abc\n")
    env = {"PATH": os.environ["PATH"], "TUNER_SECRETS_DIR": str(tmp_path)}
    out = subprocess.run(
        ["sh", str(ROOT / "deploy/docker/entrypoint.sh"), "env"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "PGPASSWORD=s3cret" in out and "RAY_AUTH_MODE=token" in out
    assert f"RAY_AUTH_TOKEN_PATH={tmp_path}/ray_token" in out


def test_the_ray_cluster_config_asks_for_gpus_with_token_auth() -> None:
    config = yaml.safe_load((ROOT / "deploy/ray/cluster.yaml").read_text())
    _no_plaintext_secret(config)
    workers = [
        t for name, t in config["available_node_types"].items() if name != config["head_node_type"]
    ]
    assert any(
        t["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5")) for t in workers
    )
    assert any("--shm-size" in option for option in config["docker"]["run_options"])
    for command in (*config["head_start_ray_commands"], *config["worker_start_ray_commands"]):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_the_kuberay_manifests_run_a_sweep_on_gpu_workers_with_secrets() -> None:
    cluster = yaml.safe_load((ROOT / "deploy/kuberay/raycluster.yaml").read_text())
    job = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
    for document in (cluster, job):
        _no_plaintext_secret(document)
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]
    ]
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        for secret in ("RAY_AUTH_TOKEN", "PGPASSWORD"):
            assert "secretKeyRef" in env[secret]["valueFrom"] and "value" not in env[secret]
        assert ":" not in env["TUNER_STORAGE"]["value"].split("@")[0].split("//")[1]
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("tuner sweep run --space ")
    assert "runtimeEnvYAML" not in job["spec"]  # Ray shows it to anyone with the dashboard


def test_cron_and_systemd_run_the_wrapper() -> None:
    (line,) = [
        x
        for x in (ROOT / "deploy/cron/crontab").read_text().splitlines()
        if x and not x.startswith("#") and "=" not in x
    ]
    minute, hour, dom, month, dow, user, command, env_file = line.split()
    assert (minute, hour, dom, month, dow) == ("30", "1", "*", "*", "*") and user == "tuner"
    assert command.endswith("/tuner-sweep") and (ROOT / "deploy/cron/tuner-sweep").exists()
    service = (ROOT / "deploy/systemd/tuner-sweep.service").read_text()
    timer = (ROOT / "deploy/systemd/tuner-sweep.timer").read_text()
    assert "ExecStart=/usr/local/bin/tuner-sweep /etc/tuner/sweep.env" in service
    assert "Type=oneshot" in service and "Persistent=true" in timer
    example = (ROOT / "deploy/cron/sweep.env.example").read_text()
    assert "TUNER_SPACE=" in example and not re.search(r"://[^@\s]*:[^@\s]+@", example)


def test_the_dashboard_proxy_authenticates_and_keeps_the_dashboard_on_loopback() -> None:
    conf = (ROOT / "deploy/dashboard/nginx.conf").read_text()
    directives = [line.split("#")[0].strip() for line in conf.splitlines()]
    directives = [d for d in directives if d]
    assert "proxy_pass http://127.0.0.1:8080;" in directives
    assert "auth_basic_user_file /etc/nginx/tuner.htpasswd;" in directives
    assert "listen 443 ssl;" in directives
    # The dashboard's cross-origin check compares Origin with the Host the browser used.
    assert "proxy_set_header Host $http_host;" in directives
    assert "--host 127.0.0.1" in conf
