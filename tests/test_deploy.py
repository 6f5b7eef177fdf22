"""The deploy files parse and keep secrets out (no Docker engine here: parse, don't run)."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TUNER, run_cli

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "schemas"  # vendored: see schemas/README.md


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
    # The sweep container is no Ray node: it reaches the head's Jobs API, which the head serves
    # on the compose network, with the token (the entrypoint reads the ray_token secret).
    address = sweep["command"][sweep["command"].index("--address") + 1]
    host, port = re.fullmatch(r"http://([-a-z0-9]+):(\d+)", address).groups()
    head = services[host]["command"]
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert (
        port == re.search(r"--dashboard-port[= ](\d+)", head)[1]
        if "--dashboard-port" in head
        else port == "8265"
    )
    assert "ray_token" in sweep["secrets"]
    space = sweep["command"][sweep["command"].index("--space") + 1]
    assert (ROOT / space.removeprefix("/app/")).exists()  # the image copies the repo to /app
    help_text = run_cli("sweep", "run", "--help").stdout
    for flag in (a for a in sweep["command"] if a.startswith("--")):
        assert flag in help_text, flag
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY search_spaces" in dockerfile and "WORKDIR /app" in dockerfile


def _compose_validator():
    import jsonschema

    # Its "$schema" names draft-07 without the trailing "#" that jsonschema looks for.
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))


def test_compose_file_follows_the_compose_spec_and_shares_the_artifacts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    _compose_validator().validate(compose)

    # One artifact location for every process: the same named volume under TUNER_ARTIFACTS.
    holders = set()
    for name, service in compose["services"].items():
        artifacts = service.get("environment", {}).get("TUNER_ARTIFACTS")
        if artifacts is None:
            continue
        (volume,) = [
            v.split(":")[0]
            for v in service["volumes"]
            if artifacts.startswith(v.split(":")[1].rstrip("/") + "/")
        ]
        assert volume in compose["volumes"], (name, volume)
        holders.add(volume)
    assert len(holders) == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda c: c["services"]["sweep"]["depends_on"]["postgres"].update(condition="healthy"),
            "healthy",
        ),
        (lambda c: c["services"]["ray-head"].update(shm="8gb"), "shm"),
        (lambda c: c["secrets"]["ray_token"].update(path="x"), "path"),
    ],
)
def test_the_compose_spec_check_catches(change, expected: str) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    change(compose)
    errors = _compose_validator().iter_errors(compose)
    assert any(expected in e.message or expected in map(str, e.path) for e in errors)


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


# --- The Ray cluster launcher (deploy/ray/cluster.yaml) ---------------------------------------


def _launcher_problems(raw: dict) -> list[str]:
    """What `ray up` would trip on: Ray's own config validation, then where the secrets land in
    the container, worked out with Ray's own `docker run` builder."""
    from ray.autoscaler._private.docker import docker_start_cmds
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.sdk import get_docker_host_mount_location

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # raises on what Ray refuses

    # `ray up` passes file_mounts less its two bootstrap files (command_runner.run_init).
    mounts = {k: v for k, v in config["file_mounts"].items() if "ray_bootstrap" not in k}
    docker = config["docker"]
    run = docker_start_cmds(
        config["auth"]["ssh_user"],
        docker["image"],
        mounts,
        docker["container_name"],
        docker.get("run_options", []) + docker.get("head_run_options", []),
        config["cluster_name"],
        "/home/tuner",  # the image's HOME (Dockerfile: useradd tuner)
        "docker",
    )
    argv = shlex.split(run)
    binds = [tuple(argv[i + 1].split(":")[:2]) for i, a in enumerate(argv) if a == "-v"]
    env = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-e")
    staged = get_docker_host_mount_location(config["cluster_name"])

    problems = []
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("the container's environment lacks RAY_AUTH_MODE=token")
    for name in ("RAY_AUTH_TOKEN_PATH", "PGPASSFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        path = env.get(name)
        if path is None:
            problems.append(f"the container's environment lacks {name}")
            continue
        # The innermost bind mount that holds the file is what the container sees there.
        holding = [(src, dst) for src, dst in binds if path.startswith(dst.rstrip("/") + "/")]
        if not holding:
            problems.append(f"{name}={path} is on no mount")
            continue
        src, dst = max(holding, key=lambda b: len(b[1]))
        if not src.startswith(staged + "/") or dst not in mounts:
            problems.append(
                f"{name}={path} is under {src}, a host folder the launcher never writes"
            )
        elif not mounts[dst].startswith("~/.tuner-secrets"):
            problems.append(f"{name}={path} comes from {mounts[dst]}, not ~/.tuner-secrets")
    return problems


def test_the_ray_cluster_config_passes_rays_validation_and_its_secrets_reach_ray_start() -> None:
    raw = yaml.safe_load((ROOT / "deploy/ray/cluster.yaml").read_text())
    _no_plaintext_secret(raw)
    assert _launcher_problems(raw) == []

    workers = [
        t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]
    ]
    assert any(
        t["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5")) for t in workers
    )
    assert all(t["min_workers"] == 0 for t in workers)  # GPUs from zero, on demand
    assert any("--shm-size" in option for option in raw["docker"]["run_options"])
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
    run_env = dict(o[3:].split("=", 1) for o in raw["docker"]["run_options"] if o.startswith("-e "))
    assert run_env["TUNER_ARTIFACTS"].startswith("s3://")  # no shared disk between its nodes


@pytest.mark.parametrize(
    ("name", "break_it", "expected"),
    [
        (
            # The shipped defect: file_mounts land at their own path in the container, and a
            # `-v` of a host folder nobody writes hides /run/secrets.
            "secrets mounted from a host folder",
            lambda c: (
                c["file_mounts"].update({"/home/ubuntu/.tuner-secrets": "~/.tuner-secrets"}),
                c["file_mounts"].pop("/run/secrets"),
                c["docker"]["run_options"].append("-v /home/ubuntu/.tuner-secrets:/run/secrets:ro"),
            ),
            "a host folder the launcher never writes",
        ),
        (
            "no token mode for attach",
            lambda c: c["docker"]["run_options"].remove("-e RAY_AUTH_MODE=token"),
            "lacks RAY_AUTH_MODE=token",
        ),
        ("an unknown key", lambda c: c.update(head_setup_comands=[]), "head_setup_comands"),
    ],
)
def test_the_ray_cluster_config_check_catches(name: str, break_it, expected: str) -> None:
    import jsonschema

    raw = yaml.safe_load((ROOT / "deploy/ray/cluster.yaml").read_text())
    break_it(raw)
    try:
        problems = _launcher_problems(raw)
    except (jsonschema.ValidationError, ValueError) as e:
        problems = [str(e)]
    assert any(expected in p for p in problems), problems


# --- KubeRay ------------------------------------------------------------------------------------

KUBERAY = ROOT / "deploy/kuberay"
# The oldest operator each manifest claims (deploy/README.md), and the one they are used with.
MINIMUM = {"RayCluster": "v1.5.1", "RayJob": "v1.4.0", "RayCronJob": "v1.6.0"}
PLURAL = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}


def _strict(node: object) -> object:
    """The CRD schema as `kubectl apply` (strict field validation) enforces it: an object with
    `properties` takes no other keys unless the CRD says it may (additionalProperties, or
    x-kubernetes-preserve-unknown-fields)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(kind: str, version: str):
    import jsonschema

    schema = json.loads((SCHEMAS / f"kuberay-{version}/ray.io_{PLURAL[kind]}.v1.json").read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _schema_errors(document: dict, version: str | None = None) -> list[str]:
    validator = _crd_validator(document["kind"], version or MINIMUM[document["kind"]])
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


# The operator's own rules, beyond its schema: ray-operator/controllers/ray/utils/validation.go
# (ValidateRayClusterSpec, ValidateRayJobSpec, ValidateRayCronJobSpec at KubeRay v1.6-1.7), and
# what its controllers do (common/pod.go, rayjob_controller.go). Messages quote the Go ones.

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _name_errors(metadata: dict, kind: str, limit: int) -> list[str]:
    name = metadata.get("name") or metadata.get("generateName", "") + "x" * 5  # 5 random chars
    errors = []
    if len(name) > limit:
        errors.append(f"{kind} name should be no more than {limit} characters")
    if not DNS1035.fullmatch(name):
        errors.append(f"{kind} name should be a valid DNS1035 label")
    return errors


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _raycluster_errors(spec: dict) -> list[str]:
    errors = []
    head = spec["headGroupSpec"]
    groups = spec.get("workerGroupSpecs", [])
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    head_env = _env(head["template"]["spec"]["containers"][0])
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2" or head_env.get(
        "RAY_enable_autoscaler_v2", {}
    ).get("value") in ("1", "true")
    start_resources = ("num-cpus", "num-gpus", "memory", "resources")
    for group in [head, *groups]:
        name = group.get("groupName", "Head")
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{name} should have at least one container")
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in start_resources) and group.get("resources"):
            errors.append(
                "resource fields should not be set in both rayStartParams and Resources"
                f" for {name} group"
            )
        if "labels" in params:
            errors.append(f"rayStartParams['labels'] is not supported for {name} group")
        if (
            autoscaling
            and v2
            and group["template"]["spec"].get("restartPolicy", "Never") != "Never"
        ):
            errors.append(
                f"restartPolicy for {name} should be Never or unset when using autoscaler V2"
            )
    for group in groups:
        name, low, high = group["groupName"], group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(
                f"worker group {name} must set both minReplicas and maxReplicas"
                " when autoscaling is disabled"
            )
        if low is not None and low < 0 or high is not None and high < 0:
            errors.append(f"worker group {name} has negative minReplicas or maxReplicas")
        if low is not None and high is not None and low > high:
            errors.append(
                f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"
            )
        if group.get("idleTimeoutSeconds") is not None and not (autoscaling and v2):
            errors.append(
                f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled"
            )
        if group.get("suspend") and autoscaling:
            errors.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
    auth = spec.get("authOptions") or {}
    token = auth.get("mode", "token") == "token" and bool(auth)
    if token:
        if not spec.get("rayVersion"):
            errors.append("authOptions.mode is 'token' but RayVersion was not specified")
        elif _version(spec["rayVersion"]) < (2, 52, 0):
            errors.append("authOptions.mode is 'token' but minimum Ray version is 2.52.0")
        if auth.get("enableK8sTokenAuth") and auth.get("secretName"):
            errors.append(
                "authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set"
            )
    elif auth.get("enableK8sTokenAuth"):
        errors.append(
            "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
        )

    # common/pod.go: with authOptions the operator sets RAY_AUTH_MODE and RAY_AUTH_TOKEN (from the
    # authOptions Secret) on the Ray containers, the autoscaler sidecar and the submitters, but
    # only where they are absent; the sidecar gets the token no other way.
    containers = [c for g in [head, *groups] for c in g["template"]["spec"]["containers"]]
    by_hand = sorted({n for c in containers for n in _env(c) if n.startswith("RAY_AUTH_")})
    if token and by_hand:
        errors.append(
            f"{', '.join(by_hand)} set by hand beside authOptions:"
            " they would differ from the autoscaler's"
        )
    if not token and autoscaling and by_hand:
        errors.append(
            "token auth set by hand with in-tree autoscaling: the autoscaler sidecar gets no token"
            " (use authOptions: {mode: token})"
        )
    return errors


def _rayjob_errors(spec: dict) -> list[str]:
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if spec.get("suspend") and not shutdown:
        errors.append(
            "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
        )
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append("TTLSecondsAfterFinished must be a non-negative integer")
    if ttl > 0 and not shutdown:  # KubeRay >= 1.4
        errors.append(
            "a RayJob with shutdownAfterJobFinishes set to false"
            " cannot have TTLSecondsAfterFinished"
        )
    if (strategy := spec.get("deletionStrategy")) is not None:
        rules = strategy.get("deletionRules") or []
        legacy = "onSuccess" in strategy or "onFailure" in strategy
        if rules and shutdown:
            errors.append(
                "spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules"
                " are mutually exclusive"
            )
        if rules and legacy:
            errors.append(
                "Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously"
            )
        if not rules and not legacy:
            errors.append(
                "DeletionStrategy requires either BOTH onSuccess and onFailure,"
                " OR the deletionRules field"
            )
        if legacy and not ("onSuccess" in strategy and "onFailure" in strategy):
            errors.append(
                "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set"
            )
        for i, rule in enumerate(rules):
            condition = rule.get("condition", {})
            if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
                errors.append(
                    f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus"
                    " must be set"
                )
            if condition.get("ttlSeconds", 0) < 0:
                errors.append(f"deletionRules[{i}]: TTLSeconds must be non-negative")
            if selector and rule.get("policy") in ("DeleteCluster", "DeleteWorkers"):
                errors.append(
                    f"deletionRules[{i}]: DeletionPolicyType '{rule['policy']}'"
                    " not supported when ClusterSelector is set"
                )
        if selector:
            # rayjob_controller.go returns before any deletion for a RayJob on an existing cluster.
            errors.append(
                "deletionStrategy on a RayJob with clusterSelector: KubeRay deletes nothing of it"
            )
    if spec.get("suspend") and selector:
        errors.append("the ClusterSelector mode doesn't support the suspend operation")
    if "rayClusterSpec" not in spec and not selector:
        errors.append("one of RayClusterSpec or ClusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append("cluster name in ClusterSelector should not be empty")
        if mode == "SidecarMode":
            errors.append("ClusterSelector is not supported in SidecarMode")
        if backoff is not None and backoff > 0:
            errors.append("BackoffLimit is incompatible with ClusterSelector mode")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        errors.append("BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        errors.append(
            "Currently, SidecarMode doesn't support SubmitterPodTemplate or SubmitterConfig"
        )
    if "rayClusterSpec" in spec:
        errors += _raycluster_errors(spec["rayClusterSpec"])
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    except yaml.YAMLError:
        errors.append("runtimeEnvYAML is not valid YAML")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            errors.append(f"{key} must be a positive integer")
    if backoff is not None and backoff < 0:
        errors.append("backoffLimit must be a positive integer")
    return errors


# robfig/cron's ParseStandard: five fields, or a descriptor.
MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()  # noqa: SIM905
DAYS = "sun mon tue wed thu fri sat".split()  # noqa: SIM905
CRON_FIELDS = [
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, {m: i + 1 for i, m in enumerate(MONTHS)}),
    (0, 6, {d: i for i, d in enumerate(DAYS)}),
]


def _cron_error(schedule: str) -> str | None:
    if schedule.startswith("@"):
        known = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
        return None if schedule in known or schedule.startswith("@every ") else "unknown descriptor"
    fields = schedule.split()
    if len(fields) != 5:
        return f"expected exactly 5 fields, found {len(fields)}"
    for text, (low, high, names) in zip(fields, CRON_FIELDS, strict=True):
        for part in text.split(","):
            span, _, step = part.partition("/")
            if step and not step.isdigit():
                return f"bad step {part!r}"
            if span in ("*", "?"):
                continue
            ends = [names.get(x.lower(), x) for x in span.split("-")]
            if len(ends) > 2 or not all(str(x).isdigit() for x in ends):
                return f"bad value {part!r}"
            if not all(low <= int(x) <= high for x in ends) or int(ends[0]) > int(ends[-1]):
                return f"{part!r} is outside {low}-{high}"
    return None


def _raycronjob_errors(document: dict) -> list[str]:
    import zoneinfo

    spec = document["spec"]
    errors = _name_errors(document["metadata"], "RayCronJob", 36)
    if "TZ" in spec["schedule"]:
        errors.append("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")
    elif error := _cron_error(spec["schedule"]):
        errors.append(f"invalid cron schedule: {error}")
    if "timeZone" in spec:
        try:
            zoneinfo.ZoneInfo(spec["timeZone"])
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            errors.append(f"invalid time zone: {spec['timeZone']!r}")
    return errors + [f"invalid RayJob template: {e}" for e in _rayjob_errors(spec["jobTemplate"])]


def _operator_errors(document: dict) -> list[str]:
    kind, metadata = document["kind"], document["metadata"]
    if kind == "RayCluster":
        return _name_errors(metadata, kind, 53) + _raycluster_errors(document["spec"])
    if kind == "RayJob":
        return _name_errors(metadata, kind, 47) + _rayjob_errors(document["spec"])
    return _raycronjob_errors(document)


def _manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_kuberay_manifests_pass_the_strict_crd_schema_and_the_operators_rules(
    name: str,
) -> None:
    document = _manifest(name)
    assert document["apiVersion"] == "ray.io/v1"
    _no_plaintext_secret(document)
    assert _schema_errors(document) == []  # the oldest operator the manifest claims
    assert _schema_errors(document, "v1.6.0") == []  # the one that runs all three
    assert _operator_errors(document) == []


@pytest.mark.parametrize(
    "sample", sorted(p.name for p in (SCHEMAS / "kuberay-v1.6.0/samples").iterdir())
)
def test_the_strict_crd_schemas_accept_kuberays_own_samples(sample: str) -> None:
    """Strictness rejects only what the operator does not know: its samples, with their pod
    templates, ports, volumes and resources, all pass."""
    documents = yaml.safe_load_all((SCHEMAS / "kuberay-v1.6.0/samples" / sample).read_text())
    rays = [d for d in documents if d and d["apiVersion"] == "ray.io/v1"]
    assert rays
    for document in rays:
        assert _schema_errors(document, "v1.6.0") == [], sample


def _set(path: str, value: object):
    def change(document: dict) -> None:
        *parents, last = path.split(".")
        node = document
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return change


_DELETE = object()
HEAD = "spec.headGroupSpec.template.spec"
TOKEN_BY_HAND = [
    {"name": "RAY_AUTH_MODE", "value": "token"},
    {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}},
]


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        # The shipped RayJob defect: KubeRay >= 1.4 rejects a TTL without shutdown.
        (
            "rayjob.yaml",
            _set("spec.ttlSecondsAfterFinished", 86400),
            "cannot have TTLSecondsAfterFinished",
        ),
        (
            "raycronjob.yaml",
            _set("spec.jobTemplate.ttlSecondsAfterFinished", 600),
            "cannot have TTLSecondsAfterFinished",
        ),
        (
            "rayjob.yaml",
            _set(
                "spec.deletionStrategy",
                {
                    "deletionRules": [
                        {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}
                    ]
                },
            ),
            "not supported when ClusterSelector is set",
        ),
        (
            "rayjob.yaml",
            _set("spec.clusterSelector", {}),
            "one of RayClusterSpec or ClusterSelector",
        ),
        (
            "rayjob.yaml",
            _set("spec.backoffLimit", 2),
            "BackoffLimit is incompatible with ClusterSelector",
        ),
        (
            "rayjob.yaml",
            _set("spec.activeDeadlineSeconds", 0),
            "activeDeadlineSeconds must be a positive",
        ),
        ("rayjob.yaml", _set("metadata.generateName", "Tuner_sweep-"), "DNS1035"),
        ("raycronjob.yaml", _set("spec.schedule", "30 25 * * *"), "invalid cron schedule"),
        ("raycronjob.yaml", _set("spec.schedule", "CRON_TZ=UTC 30 1 * * *"), "use timeZone field"),
        ("raycronjob.yaml", _set("spec.timeZone", "Mars/Olympus"), "invalid time zone"),
        (
            "raycronjob.yaml",
            _set("metadata.name", "tuner-nightly-sweep-of-the-lora-adapters"),
            "no more than 36",
        ),
        # The shipped RayCluster defect: a hand-set token with in-tree autoscaling.
        (
            "raycluster.yaml",
            lambda d: (
                d["spec"].pop("authOptions"),
                d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].extend(
                    TOKEN_BY_HAND
                ),
            ),
            "the autoscaler sidecar gets no token",
        ),
        (
            "raycluster.yaml",
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].extend(
                TOKEN_BY_HAND
            ),
            "set by hand beside authOptions",
        ),
        ("raycluster.yaml", _set("spec.rayVersion", "2.51.0"), "minimum Ray version is 2.52.0"),
        (
            "raycluster.yaml",
            _set("spec.workerGroupSpecs.0.minReplicas", 5),
            "greater than maxReplicas",
        ),
        (
            "raycluster.yaml",
            _set("spec.workerGroupSpecs.0.idleTimeoutSeconds", 60),
            "autoscaler v2 is not enabled",
        ),
        (
            "raycluster.yaml",
            _set("spec.headGroupSpec.rayStartParams.labels", "a=b"),
            "rayStartParams['labels']",
        ),
    ],
)
def test_the_operator_rules_catch(name: str, change, expected: str) -> None:
    document = _manifest(name)
    change(document)
    errors = _operator_errors(document)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("raycluster.yaml", _set(f"{HEAD}.containers.0.envv", []), "'envv' was unexpected"),
        ("raycluster.yaml", _set("spec.authOptions.mode", "password"), "'password' is not one of"),
        (
            "raycluster.yaml",
            _set("spec.workerGroupSpecs.0.minReplica", 0),
            "'minReplica' was unexpected",
        ),
        (
            "rayjob.yaml",
            _set("spec.shutdownAfterJobFinish", True),
            "'shutdownAfterJobFinish' was unexpected",
        ),
        ("rayjob.yaml", _set("spec.entrypoint", ["tuner"]), "is not of type 'string'"),
        (
            "raycronjob.yaml",
            _set("spec.jobTemplate.clusterSelecter", {}),
            "'clusterSelecter' was unexpected",
        ),
        ("raycronjob.yaml", _set("spec.schedule", _DELETE), "'schedule' is a required property"),
        # KubeRay 1.7 added timeZone; the 1.6 the file claims rejects it.
        ("raycronjob.yaml", _set("spec.timeZone", "Etc/UTC"), "'timeZone' was unexpected"),
    ],
)
def test_the_strict_crd_schema_catches(name: str, change, expected: str) -> None:
    document = _manifest(name)
    change(document)
    errors = _schema_errors(document)
    assert any(expected in e for e in errors), errors


def test_the_minimum_operator_versions_are_stated_and_needed() -> None:
    """Each manifest and the README state the oldest operator it passes; authOptions is unknown
    before 1.5.1 (seen through the 1.4.0 RayJob CRD, whose rayClusterSpec is that release's
    RayCluster spec)."""
    cluster = _manifest("raycluster.yaml")
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}}
    job["spec"] = {"entrypoint": "true", "rayClusterSpec": cluster["spec"]}
    assert any("'authOptions' was unexpected" in e for e in _schema_errors(job, "v1.4.0"))
    readme = (ROOT / "deploy/README.md").read_text().splitlines()
    for kind, version in MINIMUM.items():
        stated = f">= {version[1:]}"
        assert stated in (KUBERAY / f"{kind.lower()}.yaml").read_text(), kind
        assert any(f"**{kind}**" in line and stated in line for line in readme), kind


def test_the_kuberay_route_runs_the_nightly_sweep_from_zero_gpus_with_referenced_secrets() -> None:
    cluster, job, cron = (_manifest(n) for n in MANIFESTS)
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token"} and spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu.get("replicas", 0) == 0  # from zero, on demand
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"

    # Every Ray pod: the store without a password in the URL, the password and S3 keys by
    # reference to Secrets, artifacts in S3, shared memory for Ray's object store.
    secrets_used = set()
    pods = [spec["headGroupSpec"]["template"]["spec"], gpu["template"]["spec"]]
    for pod in pods:
        (container,) = pod["containers"]
        env = _env(container)
        assert "@" in env["TUNER_STORAGE"]["value"]
        assert ":" not in env["TUNER_STORAGE"]["value"].split("@")[0].split("//")[1]
        assert env["TUNER_ARTIFACTS"]["value"].startswith("s3://")
        for name in (
            "PGPASSWORD",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL",
        ):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert "value" not in env[name]
            secrets_used.add((ref["name"], ref["key"]))
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])

    # The Secrets are made by the commands the README gives (never a manifest with values), and
    # the S3 one's keys are those of the example env file.
    readme = (ROOT / "deploy/README.md").read_text()
    example = (KUBERAY / "s3.env.example").read_text()
    example_keys = {
        line.split("=")[0] for line in example.splitlines() if re.match(r"[A-Z_]+=$", line)
    }
    for secret, key in secrets_used:
        assert re.search(rf"kubectl create secret generic {secret} ", readme), secret
        if secret == "tuner-s3":
            assert key in example_keys and "--from-env-file" in readme
        else:
            assert f"--from-file={key}=" in readme, key
    for made in ("s3.env", "pg-password"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"deploy/kuberay/{made}"], cwd=ROOT)
        assert ignored.returncode == 0, f"deploy/kuberay/{made} must be git-ignored"

    # The PVC and the PostgreSQL Service the cluster names are shipped.
    shipped = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((KUBERAY / "storage.yaml").read_text())
    }
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for p in pods
        for v in p["volumes"]
        if "persistentVolumeClaim" in v
    }
    for claim in claims:
        assert ("PersistentVolumeClaim", claim) in shipped
    host = env["TUNER_STORAGE"]["value"].split("@")[1].split(":")[0]
    assert ("Service", host) in shipped

    # The sweep: on this cluster, with an existing space, the entrypoint's flags known to the CLI.
    help_text = run_cli("sweep", "run", "--help").stdout
    for spec_of_job in (job["spec"], cron["spec"]["jobTemplate"]):
        assert spec_of_job["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        argv = shlex.split(spec_of_job["entrypoint"])
        assert argv[:3] == ["tuner", "sweep", "run"]
        assert (ROOT / argv[argv.index("--space") + 1].removeprefix("/app/")).exists()
        assert argv[argv.index("--out") + 1].startswith("/work/sweeps")  # the head's PVC
        for flag in (a for a in argv if a.startswith("--")):
            assert flag in help_text, flag
        assert "runtimeEnvYAML" not in spec_of_job  # Ray shows it to anyone with the dashboard
    assert job["spec"]["entrypoint"] == cron["spec"]["jobTemplate"]["entrypoint"]
    mounts = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/work/sweeps" for m in mounts)


def test_the_kubernetes_objects_shipped_are_well_formed() -> None:
    """The PVC and the Service, against the core v1 schemas that KubeRay's CRD embeds (a head
    Service, an ephemeral volume's claim template), strict."""
    import jsonschema

    schema = json.loads((SCHEMAS / "kuberay-v1.6.0/ray.io_rayclusters.v1.json").read_text())
    head = schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]
    service = _strict(head["headService"])
    volume = head["template"]["properties"]["spec"]["properties"]["volumes"]["items"]
    claim = _strict(volume["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"])
    quantity = re.compile(r"\d+(\.\d+)?([KMGTPE]i?|[mk])?")
    for document in yaml.safe_load_all((KUBERAY / "storage.yaml").read_text()):
        assert document["apiVersion"] == "v1"
        name = document["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        if document["kind"] == "PersistentVolumeClaim":
            jsonschema.validate({k: document[k] for k in ("metadata", "spec")}, claim)
            assert set(document["spec"]["accessModes"]) <= {
                "ReadWriteOnce",
                "ReadOnlyMany",
                "ReadWriteMany",
                "ReadWriteOncePod",
            }
            assert quantity.fullmatch(document["spec"]["resources"]["requests"]["storage"])
        else:
            assert document["kind"] == "Service"
            jsonschema.validate(document, service)
            spec = document["spec"]
            assert spec["type"] != "ExternalName" or re.fullmatch(
                r"[a-z0-9.-]+", spec["externalName"]
            )
            assert all(1 <= p["port"] <= 65535 for p in spec["ports"])


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


# --- issue 22: i22-delete ---


def test_the_deployed_dashboards_answer_to_their_names_and_refuse_any_other(
    pg_url: str,
) -> None:
    """The dashboard refuses a Host it was not given (DNS rebinding): compose's must still
    answer to its service name and to the published loopback port, and the nginx example must
    allow the server_name its proxy passes on."""
    import urllib.error
    import urllib.request

    conf = (ROOT / "deploy/dashboard/nginx.conf").read_text()
    (server_name,) = set(re.findall(r"^\s*server_name (\S+);", conf, re.M))
    assert f"--allow-host {server_name}" in conf

    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["dashboard"][
        "command"
    ]
    assert command[command.index("--allow-host") + 1] == "dashboard"
    argv = [*TUNER, *command[1:]]
    argv[argv.index("--port") + 1] = "0"
    proc = subprocess.Popen(
        argv, env={**os.environ, "TUNER_STORAGE": pg_url}, stderr=subprocess.PIPE, text=True
    )

    def status(base: str, host: str) -> int:
        request = urllib.request.Request(f"{base}/api/studies", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        line = proc.stderr.readline()
        base = re.search(r"(http://\S+?)/dashboard", line)[1].replace("0.0.0.0", "127.0.0.1")
        port = base.rsplit(":", 1)[1]
        assert status(base, f"127.0.0.1:{port}") == 200  # published on the host's loopback
        assert status(base, f"localhost:{port}") == 200
        assert status(base, f"dashboard:{port}") == 200  # the service name, inside compose
        assert status(base, f"172.18.0.5:{port}") == 200  # the container's address
        assert status(base, f"evil.example:{port}") == 421
    finally:
        proc.terminate()
        proc.wait(timeout=10)
