"""A real Label Studio server for the live-mode tests, started once per session and stopped after.

Label Studio pins its own torch-free but conflicting stack (Django, pydantic, ...), so it lives in its own
virtual environment: ``$XAL_LABEL_STUDIO_VENV``, default ``<repo>/.venv-label-studio``; when absent the
fixture makes it (``python3 -m venv`` + ``pip install label-studio``, about 1.5 min with a warm pip
cache, CI makes it beforehand). Only a venv that cannot be made skips the tests (with the failing step
and its output); a server that does not come up fails them, with its log's tail.

The server: SQLite in a fresh ``LABEL_STUDIO_BASE_DATA_DIR``, bound to 127.0.0.1 on a free port, the
admin user and its legacy API token created at start from LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN
(LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN: since 1.17 new organisations accept only personal access tokens
otherwise), signup closed, no version check, no analytics, no local-file serving (push uploads the
images through the import API).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_ENV = "XAL_LABEL_STUDIO_VENV"
REQUIREMENT = "label-studio>=1.23,<1.24"
TOKEN = "xal-test-token-0123456789abcdef"  # the legacy token the admin gets (a test server only)
START_TIMEOUT_S = 240.0  # first start runs the migrations: ~35 s on 2 cores


class LabelStudioServer(NamedTuple):
    url: str
    token: str
    log: Path


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def label_studio_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or REPO / ".venv-label-studio")


def ensure_label_studio(venv: Path, log: Path) -> Path:
    """The label-studio executable of venv, making the venv when it has none (output to log); skips the
    tests when it cannot be made (the step and its output's tail in the reason)."""
    exe = venv / "bin" / "label-studio"
    if exe.is_file():
        return exe
    python = shutil.which("python3") or sys.executable
    made = not venv.exists()  # only a venv made here is removed when its install fails
    steps = [("python3 -m venv", [python, "-m", "venv", str(venv)]),
             ("pip install label-studio", [str(venv / "bin" / "pip"), "install", "-q", REQUIREMENT])]
    start = time.monotonic()
    for name, cmd in steps:
        with open(log, "a") as out:
            try:
                code = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL).returncode
            except OSError as err:
                code, _ = -1, out.write(f"{err}\n")
        if code != 0:
            if made:
                shutil.rmtree(venv, ignore_errors=True)  # a half-made venv would be taken for a good one
            pytest.skip(f"cannot make the Label Studio venv {venv}: `{name}` failed ({code}): {_tail(log, 5)}")
    if not exe.is_file():
        pytest.skip(f"cannot make the Label Studio venv {venv}: no {exe} after pip install")
    print(f"made the Label Studio venv {venv} in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return exe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),  # SQLite database, uploads, media
        "LABEL_STUDIO_USERNAME": "admin@xal.test",
        "LABEL_STUDIO_PASSWORD": "xal-test-password",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
    })
    return env


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group, SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """(url, token, log) of a Label Studio server on 127.0.0.1, up for the whole session."""
    root = tmp_path_factory.mktemp("label-studio")
    exe = ensure_label_studio(label_studio_venv(), root / "install.log")
    data, log = root / "data", root / "server.log"
    data.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=root, env=server_env(data), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"Label Studio exited {proc.returncode} before {url}/health answered; "
                            f"log {log}:\n{_tail(log)}", pytrace=False)
            if time.monotonic() - start > START_TIMEOUT_S:
                pytest.fail(f"Label Studio did not answer {url}/health within {START_TIMEOUT_S:.0f} s; "
                            f"log {log}:\n{_tail(log)}", pytrace=False)
            time.sleep(0.5)
        print(f"Label Studio up at {url} in {time.monotonic() - start:.1f} s", file=sys.stderr)
        yield LabelStudioServer(url, TOKEN, log)
    finally:
        _stop(proc)
