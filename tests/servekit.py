"""Test kit for the server: live servers (thread or process) and a throwaway PostgreSQL.

Everything listens on 127.0.0.1 only, is bounded in time and is torn down by
the fixture that started it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before it was healthy")
        try:
            r = httpx.get(f"{url}/v1/health", timeout=2.0)
            if r.status_code == 200 and r.json()["model_loaded"]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no healthy server at {url} after {timeout} s")


class ThreadServer:
    """``app`` under uvicorn in a daemon thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "ThreadServer":
        self.thread.start()
        wait_healthy(self.url, timeout=60)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)


@contextlib.contextmanager
def thread_server(app):
    """Run ``app`` under uvicorn in a daemon thread of this process; yield its base URL."""
    live = ThreadServer(app).start()
    try:
        yield live.url
    finally:
        live.stop()


class ServerProcess:
    """``skcarrot serve`` in a subprocess, which a test may SIGKILL and start again."""

    def __init__(self, db_url: str, port: int | None = None, workers: int = 1, env: dict | None = None) -> None:
        self.db_url = db_url
        self.port = port or free_port()
        self.workers = workers
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def launch(self) -> "ServerProcess":
        """Start the process without waiting for it (see :meth:`wait`)."""
        cmd = [sys.executable, "-m", "skcarrot", "serve", "--db", self.db_url, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=str(REPO), start_new_session=True)
        return self

    def wait(self, timeout: float = 120.0) -> "ServerProcess":
        wait_healthy(self.url, timeout=timeout, proc=self.proc)
        return self

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        return self.launch().wait(timeout)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL the whole process group (uvicorn and any workers): no clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def postgres_cluster():
    """A fresh PostgreSQL cluster on a free 127.0.0.1 port; yields its SQLAlchemy URL.

    PostgreSQL refuses to run as root, so when this process is root the
    cluster runs as the ``postgres`` user (through ``runuser``).
    """
    bindir = _pg_bin()
    if bindir is None:
        message = "PostgreSQL binaries not found (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = os.geteuid() == 0
    tmp = tempfile.mkdtemp(prefix="skcarrot-pg-")
    data, sockets = os.path.join(tmp, "data"), os.path.join(tmp, "run")
    os.makedirs(sockets)
    user = "postgres" if root else None
    if root:
        import pwd

        pw = pwd.getpwnam("postgres")
        for path in (tmp, sockets):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(tmp, 0o700)

    def run(*args, check=True):
        cmd = [str(bindir / args[0]), *args[1:]]
        if root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    port = free_port()
    started = False
    try:
        run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=200"
        run("pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(tmp, "log"), "-w", "-t", "60", "start")
        started = True
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "ledger")
        yield f"postgresql://postgres@127.0.0.1:{port}/ledger"
    finally:
        if started:
            run("pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "60", "stop", check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        del user
