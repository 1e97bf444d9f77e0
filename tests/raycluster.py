"""A real two-node Ray cluster on this machine for tests (`ray start` head + one more node), stopped by the
processes it started — never by name, never with `ray stop`."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RAY_BIN = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM `ray start` if pytest dies, so even a killed session leaves no cluster behind."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _proc_parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process, reuse or not.
    None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


class LocalRayCluster:
    """A Ray head and one more node on this machine, each a `ray start --block` process of ours.

    Everything is private to the instance: free ports (GCS, dashboard, client server, agents), random worker
    ports, a token (RAY_AUTH_MODE=token, so nothing else on the machine can submit to it), and one temp dir
    per node under ``root``. Separate temp dirs matter: with a shared one, the node that finishes with a job's
    working_dir deletes the copy the other node's driver still runs in. ``stop`` ends exactly these processes:
    SIGTERM to each `ray start --block`, which shuts its node down, then SIGKILL for anything of ours left —
    the descendants recorded before, and any process whose command line or working directory is under
    ``root`` (every Ray process of these nodes starts with its cwd there). Never `ray stop`: it kills every
    Ray on the machine, including the test session's own.
    """

    def __init__(self, node_env: dict[str, str], cpus_per_node: int = 1) -> None:
        # Short, under /tmp: Unix socket paths (root/h/session_<date>_<pid>/sockets/plasma_store) max 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="dcfm-rc-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.cpus_per_node = cpus_per_node
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv's
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # no drain wait on SIGTERM: nothing to drain here
                   RAY_USAGE_STATS_ENABLED="0")
        env.update(node_env)
        self.env = env
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def submit_env(self) -> dict[str, str]:
        """Environment for a `ray job submit` subprocess aimed at this cluster."""
        env = {k: v for k, v in self.env.items() if not k.startswith("AWS_")}
        env["RAY_ADDRESS"] = self.address
        return env

    def _start_node(self, name: str, options: list[str]) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        common = [
            "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
            f"--temp-dir={temp_dir}", "--object-store-memory=100000000", "--min-worker-port=0",
            "--max-worker-port=0", f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats",
            "--block",
        ]
        log = open(self.root / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(
            [str(RAY_BIN), "start", *options, *common], cwd=temp_dir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        ))
        log.close()

    def start(self, timeout: float = 120) -> LocalRayCluster:
        self._start_node("h", [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}",
        ])
        self._wait_nodes(1, timeout)
        self._start_node("w", [f"--address=127.0.0.1:{self.gcs_port}"])
        self._wait_nodes(2, timeout)
        return self

    def _wait_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{self.logs()}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (OSError, ValueError, KeyError):
                pass  # dashboard not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} Ray node(s) not alive after {timeout:.0f}s:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def state(self, resource: str) -> list[dict]:
        """Ray's state API over HTTP (no ray.init in this process): /api/v0/nodes, /api/v0/actors, ..."""
        request = urllib.request.Request(f"{self.address}/api/v0/{resource}?limit=10000", headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers)

    def wait_job(self, submission_id: str, timeout: float) -> str:
        """Wait for a job to end; fail with its log unless it SUCCEEDED. Returns the log."""
        from ray.job_submission import JobStatus

        client = self.client()
        deadline = time.monotonic() + timeout
        while not (status := client.get_job_status(submission_id)).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                break
            time.sleep(1)
        logs = client.get_job_logs(submission_id)
        assert status == JobStatus.SUCCEEDED, f"job {submission_id}: {status}\n{logs[-6000:]}"
        return logs

    # -- teardown -----------------------------------------------------------------------------------

    def _descendants(self, pids: list[int]) -> set[int]:
        children: dict[int, list[int]] = {}
        for pid in _all_pids():
            parent = _proc_parent(pid)
            if parent is not None:
                children.setdefault(parent, []).append(pid)
        found, todo = set(), list(pids)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo += children.get(pid, [])
        return found

    def _marked(self) -> set[int]:
        """Processes whose command line or working directory is under ``root``: ours even if orphaned."""
        root, found = str(self.root), set()
        for pid in _all_pids():
            if pid == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if root in cmdline or cwd == root or cwd.startswith(root + "/"):
                found.add(pid)
        return found

    def processes(self) -> dict[int, str]:
        """Every live process of this cluster: pid -> start time."""
        pids = self._descendants([p.pid for p in self.procs]) | self._marked()
        return {pid: started for pid in pids if (started := _started(pid)) is not None}

    def stop(self, timeout: float = 30) -> set[int]:
        """Stop both nodes; returns the pids still alive afterwards (empty when clean)."""
        known = self.processes()

        def alive() -> set[int]:  # what we knew before, unless its pid now names another process, and new ones
            current = self.processes()
            return {pid for pid, started in known.items() if _started(pid) == started} | set(current)
        for proc in reversed(self.procs):  # the worker node first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while (left := alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # did not stop with their node: ours all the same
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        remaining = alive()
        if not remaining:
            shutil.rmtree(self.root, ignore_errors=True)
        return remaining
