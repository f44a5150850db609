"""`make run`: toolexec on http://127.0.0.1:8000 with a warm worker and demo data.

Finds Redis (or starts a private one), migrates, syncs the catalog, seeds the demo logins
(`manage.py seed_demo`), starts the web server (ASGI: HTTP and WebSockets, daphne's
`runserver`) and a worker, and prints how to use them.
Ctrl-C or SIGTERM stops everything it started; if one process dies, it stops the others.
Standard library only: everything Django runs in `manage.py` subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
LOCAL_REDIS = ("127.0.0.1", 6379)  # what settings.REDIS_URL points at by default
STARTUP_SECONDS = 30
STOP_SECONDS = 10
NO_REDIS = (
    "toolexec needs Redis: install it (Debian: apt-get install redis-server) or set REDIS_URL=redis://host:6379/0"
)


class Abort(Exception):
    """A reason to stop that the user can act on; printed as one line."""


class StopRequested(Exception):
    """Ctrl-C or SIGTERM."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]

    def exit_code(self) -> int | None:
        return self.process.poll()

    def how_it_ended(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


# The worker make run starts; README's production section runs the same command.
WORKER_COMMAND = ["toolexec_worker", "default", "--skip-checks"]


def web_command(port: int) -> list[str]:
    """The web server make run starts (tests/test_websocket.py starts the same): daphne's
    runserver, as daphne is first in INSTALLED_APPS, serving toolexec.asgi (HTTP and WebSockets
    on one port). --nostatic: WhiteNoise serves static files, as in production."""
    return [PYTHON, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload", "--nostatic"]


def production_asgi_command(port: int, *, host: str = "127.0.0.1", processes: int = 1) -> list[str]:
    """The README's production ASGI server (run it with DATABASE_CONN_MAX_AGE=0): uvicorn, with
    uvloop, httptools and the websockets library, serving toolexec.asgi (HTTP and WebSockets);
    ``processes`` > 1 runs that many behind one port. No lifespan protocol: Channels' router has
    none. The idle-socket test and the WebSocket benchmark run this very command."""
    uvicorn = str(Path(PYTHON).parent / "uvicorn")
    command = [uvicorn, "toolexec.asgi:application", "--host", host, "--port", str(port), "--lifespan", "off"]
    return [*command, "--workers", str(processes)] if processes > 1 else command


def on_stop_signal(signum: int, frame: FrameType | None) -> None:
    raise StopRequested


def port_from_env() -> int:
    raw = os.environ.get("PORT", "8000")
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise Abort(f"PORT must be a port number, not {raw!r}.")
    return int(raw)


def ensure_port_free(port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as runserver does: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise Abort(f"Port {port} is in use: stop what runs there or pick another with PORT={port + 1}.") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def child_environment(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DEBUG", "true")
    env.setdefault("TOOLEXEC_BASE_URL", f"http://127.0.0.1:{port}")
    env["PYTHONUNBUFFERED"] = "1"  # logs show up as they happen
    return env


def start(children: list[Child], name: str, args: list[str], env: dict[str, str]) -> Child:
    """Start a process and add it to ``children`` at once, so whatever happens next stops it."""
    # A session of its own: Ctrl-C reaches only us, and stop() can signal the whole group
    # (the worker's work horses, runserver's children).
    child = Child(name, subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True))
    children.append(child)
    return child


def start_private_redis(children: list[Child], data_dir: str) -> str:
    """Start a throwaway redis-server on a free port; return its URL."""
    if shutil.which("redis-server") is None:
        raise Abort(NO_REDIS)
    port = free_port()
    args = ["redis-server", "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1"]
    redis = start(children, "redis-server", [*args, "--dir", data_dir, "--loglevel", "warning"], dict(os.environ))
    deadline = time.monotonic() + 5
    while not redis_answers("127.0.0.1", port):
        if redis.exit_code() is not None or time.monotonic() > deadline:
            raise Abort(f"The private redis-server on port {port} did not start. {NO_REDIS}")
        time.sleep(0.1)
    return f"redis://127.0.0.1:{port}/0"


def manage(*args: str, env: dict[str, str], capture: bool = False) -> str:
    result = subprocess.run(
        [PYTHON, "manage.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE if capture else None, text=True
    )
    if result.returncode != 0:
        raise Abort(f"manage.py {args[0]} failed (exit code {result.returncode}); see above.")
    return result.stdout or ""


def wait_until_answers(url: str, children: list[Child]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # 401/403 without a login: the server is up
        except OSError:
            pass
        if died := first_dead(children):
            raise Abort(f"The {died.name} {died.how_it_ended()} while starting; see above.")
        if time.monotonic() > deadline:
            raise Abort(f"The web server did not answer on {url} within {STARTUP_SECONDS} s.")
        time.sleep(0.2)


def first_dead(children: list[Child]) -> Child | None:
    return next((child for child in children if child.exit_code() is not None), None)


def watch(children: list[Child]) -> Child:
    """Block until one child exits; return it."""
    while (died := first_dead(children)) is None:
        time.sleep(0.5)
    return died


def stop(child: Child) -> None:
    if child.exit_code() is not None:
        return
    # SIGINT is what Ctrl-C would send: runserver exits, the worker finishes its job, redis quits.
    signal_group(child, signal.SIGINT)
    try:
        child.process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        print(f"{child.name} did not stop within {STOP_SECONDS} s; killing it.", file=sys.stderr)
        signal_group(child, signal.SIGKILL)
        child.process.wait()


def signal_group(child: Child, signum: int) -> None:
    try:
        os.killpg(child.process.pid, signum)
    except ProcessLookupError:
        pass


def summary(base_url: str, seed_output: str) -> str:
    return (
        f"\ntoolexec is running on {base_url}/\n\n"
        f"  API root          {base_url}/api/v1/\n"
        f"  Swagger UI        {base_url}/api/docs/\n"
        f"  Admin             {base_url}/admin/\n"
        f"  Browsable API     {base_url}/api-auth/login/\n"
        f"  WebSockets        {base_url.replace('http', 'ws', 1)}/ws/v1/jobs/<job_id>/\n\n"
        f"{seed_output.rstrip()}\n\n"
        "Press Ctrl-C to stop (the web server, the worker and any private Redis).\n"
    )


def run(children: list[Child], data_dir: str) -> None:
    port = port_from_env()
    ensure_port_free(port)
    env = child_environment(port)
    base_url = f"http://127.0.0.1:{port}"
    if "REDIS_URL" not in env and not redis_answers(*LOCAL_REDIS):
        env["REDIS_URL"] = start_private_redis(children, data_dir)
        print(f"Started a private redis-server for this run: {env['REDIS_URL']}")
    manage("migrate", "--noinput", env=env)
    manage("sync_tools", env=env)
    seed_output = manage("seed_demo", "--base-url", base_url, env=env, capture=True)
    # ASGI: no persistent database connections (Django's databases docs), the worker keeps its own.
    start(children, "web server", web_command(port), {"DATABASE_CONN_MAX_AGE": "0", **env})
    start(children, "worker", [PYTHON, "manage.py", *WORKER_COMMAND], env)
    wait_until_answers(f"{base_url}/api/v1/", children)
    print(summary(base_url, seed_output), flush=True)
    died = watch(children)
    raise Abort(f"The {died.name} {died.how_it_ended()} unexpectedly; stopping the rest.")


def main() -> int:
    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGTERM, on_stop_signal)
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="toolexec-run-") as data_dir:
        try:
            run(children, data_dir)
        except StopRequested:
            code = 0
        except Abort as reason:
            print(reason, file=sys.stderr)
            code = 1
        finally:
            # Shutting down takes a moment; a second Ctrl-C must not leave orphans behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for child in reversed(children):
                stop(child)
    if code == 0:
        print("Stopped.", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
