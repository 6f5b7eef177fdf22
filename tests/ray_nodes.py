"""Ray nodes that the tests and benchmarks start, and stop by their own process group alone.

`ray start --block` in a session of its own: its processes (GCS, raylet, and the reaper that
ends them if `ray start` dies) share that process group. Stopping it signals that group, never
`ray stop`, which would reach every Ray on the machine, other users' included. Redis holds
6379 here, so every head gets a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """One `ray start --block ARGS`, ready when `ray start` says the runtime started."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str],
        log: Path,
        timeout: float = 180,
        cwd: Path | None = None,
    ) -> None:
        self.log = log
        # Ports Ray gives every node the same by default: two clusters of the suite at once (the
        # `ray` and `ray-nodes` groups) met on the dashboard agent's 52365, and the job agent of
        # test_submit's head never came up. Free ones instead, unless the caller chose.
        for option in ("--dashboard-agent-listen-port", "--metrics-export-port"):
            if not any(arg.startswith(option) for arg in args):
                args = (*args, f"{option}={free_port()}")
        self.process = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            env=env,
            cwd=cwd,  # a node's own working directory: nothing shared through the current one
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start {' '.join(args)} failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def runs(self, pid: int) -> bool:
        """Whether process `pid` (a Ray worker, say) is one of this node's."""
        import psutil

        try:
            return any(p.pid == self.process.pid for p in psutil.Process(pid).parents())
        except psutil.NoSuchProcess:
            return False

    def kill(self) -> None:
        """The node is gone at once, as a preempted machine is: SIGKILL to all its processes."""
        import psutil

        processes = [psutil.Process(self.process.pid)]
        processes += processes[0].children(recursive=True)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.process.wait()

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to `ray start` (it drains the node and ends its processes, the GCS last), then
        SIGKILL to whatever of its process group is left."""
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_head(*args: str, env: dict[str, str], temp_dir: Path, log: Path) -> tuple[RayNode, str]:
    """A head node on a free port with token auth on; returns it and its HOST:PORT."""
    port = free_port()
    node = RayNode(
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        *args,
        env={**env, "RAY_AUTH_MODE": "token"},
        log=log,
    )
    return node, f"127.0.0.1:{port}"


def start_autoscaling_head(
    worker_types: dict[str, dict],
    *,
    head_cpus: int,
    env: dict[str, str],
    temp_dir: Path,
    log: Path,
) -> tuple[RayNode, str]:
    """A GPU-less head whose autoscaler launches `worker_types` on this machine (Ray's fake
    multi-node provider, as `ray.cluster_utils.AutoscalingCluster` uses it), with token auth on.

    Not `AutoscalingCluster.start()`: it runs `ray stop --force` and assumes the GCS on 6379.
    The worker nodes it launches are processes of the head's autoscaler, in the head's process
    group, so `RayNode.stop` ends them with it.
    """
    port = free_port()
    config = {
        "cluster_name": f"fake-{port}",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "available_node_types": {
            "ray.head.default": {
                "resources": {"CPU": head_cpus, "GPU": 0},
                "node_config": {},
                "max_workers": 0,
            },
            **{
                name: {"node_config": {}, "min_workers": 0, **spec}
                for name, spec in worker_types.items()
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "docker": {},
        **{key: [] for key in ("initialization_commands", "setup_commands",
                               "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }  # fmt: skip
    path = log.with_suffix(".autoscaling.json")
    path.write_text(json.dumps(config))
    node = RayNode(
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={head_cpus}",
        "--num-gpus=0",
        f"--autoscaling-config={path}",
        "--include-dashboard=false",  # not needed by the autoscaler; its port may be taken
        f"--ray-client-server-port={free_port()}",
        env={
            **env,
            "RAY_AUTH_MODE": "token",
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        },
        log=log,
    )
    return node, f"127.0.0.1:{port}"
