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

    def __init__(self, app, log_level: str = "warning") -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level, lifespan="on")
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
def thread_server(app, log_level: str = "warning"):
    """Run ``app`` under uvicorn in a daemon thread of this process; yield its base URL."""
    live = ThreadServer(app, log_level).start()
    try:
        yield live.url
    finally:
        live.stop()


class ServerProcess:
    """``skcarrot serve`` in a subprocess, which a test may SIGKILL and start again."""

    def __init__(
        self, db_url: str, port: int | None = None, workers: int = 1, env: dict | None = None, tree: str | None = None
    ) -> None:
        self.db_url = db_url
        self.port = port or free_port()
        self.workers = workers
        self.tree = str(tree or REPO)  # the source tree to run (another version, for a comparison)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": self.tree, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def launch(self) -> "ServerProcess":
        """Start the process without waiting for it (see :meth:`wait`)."""
        cmd = [sys.executable, "-m", "skcarrot", "serve", "--db", self.db_url, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=self.tree, start_new_session=True)
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


# -- small pieces of requests ---------------------------------------------------------------

N_CTX, DIM = 4, 64  # the embedded model's context shape


@contextlib.contextmanager
def sqlite_app(tmp_path):
    """A fresh app on a SQLite ledger under ``tmp_path``, in process: ``(app, client, db_url)``."""
    from fastapi.testclient import TestClient

    from skcarrot.serve import Settings, create_app

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    app = create_app(Settings(db_url=db))
    with TestClient(app) as client:
        yield app, client, db


def score(client, key: str, ids: list, p: int = 1, class_names=("a", "b")):
    """``POST /v1/score`` of the uploaded ``ids`` under ``p`` zero prompt offsets."""
    payload = {"image_ids": ids, "class_names": list(class_names), "offsets": offsets_array(p)}
    return client.post("/v1/score", json=payload, headers=auth(key))


def noise_image(seed: int = 0, size: int = 8):
    """A random RGB image (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


def auth(key: str, **extra) -> dict:
    """Headers of a request by ``key``."""
    return {"Authorization": f"Bearer {key}", **extra}


def offsets_array(p: int, value: float = 0.0, dtype: str = "float32") -> dict:
    """``p`` prompt offsets of the embedded model, all ``value``, as an encoded array."""
    import base64

    import numpy as np

    arr = np.full((p, N_CTX, DIM), value, dtype="<f4" if dtype == "float32" else "<f8")
    return {"shape": list(arr.shape), "dtype": dtype, "data": base64.b64encode(arr.tobytes()).decode()}


def upload(client, key: str, *images) -> list[str]:
    """Upload PIL images with ``client`` (a TestClient or httpx client); their content ids."""
    from skcarrot.wire import png_base64

    r = client.post("/v1/images", json={"images": [png_base64(img) for img in images]}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["ids"]


# -- fuzzing from the schema -------------------------------------------------------------------


def _with_real_images(case, ids, files):
    """A valid case names the key's own images (and sends real image files), so it reaches the model."""
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("image_ids"), list):
        body["image_ids"] = [ids[i % len(ids)] for i in range(len(body["image_ids"]))]
    if isinstance(body.get("inputs"), str):
        body["inputs"] = files[len(body["inputs"]) % len(files)]
    if isinstance(body.get("images"), list):
        body["images"] = [files[i % len(files)] for i in range(len(body["images"]))]
    if isinstance(body.get("messages"), list):  # a chat: the model served, images as data URLs
        body["model"] = "skcarrot-micro-chat"
        for message in body["messages"]:
            for k, part in enumerate(message.get("content") if isinstance(message, dict) else ()):
                if isinstance(part, dict) and isinstance(part.get("image_url"), dict):
                    part["image_url"]["url"] = "data:image/png;base64," + files[k % len(files)]


def _semantic(response) -> bool:
    """A 422 whose every reason is one no schema can state (or a chat route's 400/404 for such a reason)."""
    from skcarrot.serve.openapi import SEMANTIC_REFUSALS
    from skcarrot.serve.routers.chat import CHAT_SEMANTIC_REFUSALS

    if response.status_code in (400, 404):
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return False
        # the chat routes' own reasons, and the server's 422 reasons in OpenAI's shape
        return code in CHAT_SEMANTIC_REFUSALS or code in SEMANTIC_REFUSALS
    if response.status_code != 422:
        return False
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError):
        return False
    return isinstance(detail, list) and all(d.get("type") in SEMANTIC_REFUSALS for d in detail)


def fuzz_every_operation(schema, headers: dict, ids: list, files: list, max_examples: int) -> dict:
    """Run every schemathesis check on valid and invalid cases of every operation of ``schema``.

    Valid cases name the key's own images (``ids``, uploaded from ``files``). A
    valid request refused only for what no schema can state, or an invalid one
    refused by its size (413, 431), is not a failure. Returns the statuses, the
    failures (one line each) and how many valid requests were refused for such
    a reason.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core.failures import AcceptedNegativeData, Failure, FailureGroup
    from schemathesis.openapi.checks import RejectedPositiveData

    report = {"operations": 0, "statuses": [], "failures": [], "semantic_refusals": 0}
    for result in schema.get_all_operations():
        operation = result.ok()
        report["operations"] += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                if mode is GenerationMode.POSITIVE:
                    _with_real_images(case, ids, files)
                response = case.call(headers=headers)
                report["statuses"].append(response.status_code)
                try:
                    case.validate_response(response, headers=headers)
                except (Failure, FailureGroup) as exc:
                    for failure in getattr(exc, "exceptions", [exc]):
                        if isinstance(failure, RejectedPositiveData) and _semantic(response):
                            report["semantic_refusals"] += 1
                            continue
                        if isinstance(failure, AcceptedNegativeData) and response.status_code in (413, 431):
                            continue  # refused by size, before the body is read: a refusal all the same
                        report["failures"].append(
                            f"{operation.label} [{mode.name}]: {type(failure).__name__}: {str(failure)[:300]} "
                            f"-> {response.status_code} {response.text[:300]}"
                        )

            try:
                fuzz()
            except Unsatisfiable:
                # no invalid request exists for an operation without inputs (GET /v1/health)
                assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    return report


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
    with postgres_server() as server:
        yield server.url


class PostgresServer:
    """A running throw-away PostgreSQL: its URL, and :meth:`stop` / :meth:`start` to take it away and back."""

    def __init__(self, url: str, run, data: str, opts: str, log: str) -> None:
        self.url, self._run, self._data, self._opts, self._log = url, run, data, opts, log

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self._data, "-m", "immediate", "-w", "-t", "60", "stop")

    def start(self) -> None:
        self._run("pg_ctl", "-D", self._data, "-o", self._opts, "-l", self._log, "-w", "-t", "60", "start")


@contextlib.contextmanager
def postgres_server():
    """A fresh PostgreSQL cluster on a free 127.0.0.1 port; yields a :class:`PostgresServer`."""
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
        yield PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/ledger", run, data, opts,
                             os.path.join(tmp, "log"))
    finally:
        if started:
            run("pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "60", "stop", check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        del user
