"""``pip install celery-idem``, then the README's quickstart, on a real worker.

The package is built into a wheel and installed, with its dependencies from the
package registry, into a fresh virtualenv: nothing from the checkout or the
development venv is visible there. The quickstart's files (``tasks.py``, ``send.py``)
and its worker command are taken from README.md's code blocks as they stand, so the
test fails when the README drifts from what works. They run against a private
redis-server (the README's ``localhost:6379`` is rewritten to its port; the system's
Redis is never touched).

This is how the crash of issue #14 looked from outside: the worker died at start with
``ModuleNotFoundError: No module named 'packaging'`` (kombu 5.7's Redis transport
without kombu's ``redis`` extra), or refused redis-py 5.x (``VersionMismatch``).

Two environment variables choose another installation than the newest releases on
the development venv's Python (``make test-matrix`` uses them):

``IDEM_INSTALL_PYTHON``
    the interpreter of the fresh virtualenv;
``IDEM_INSTALL_CONSTRAINTS``
    pip constraints for the install, separated by spaces
    (``"celery==5.3.6 kombu==5.3.7 redis==5.0.8"``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.processes import Process, wait_for
from devtools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
#: Where the quickstart is shown: the page and the heading of its section.
README = (ROOT / "README.md", "## Quickstart")
GETTING_STARTED = (ROOT / "docs" / "getting-started.md", "## Make a task idempotent")

INSTALL_TIMEOUT = 300.0
WORKER_START_TIMEOUT = 60.0
SEND_TIMEOUT = 60.0

#: What the quickstart's files call Redis; rewritten to the private server's address.
README_REDIS = "redis://localhost:6379/"
#: The line the quickstart's body prints (the worker logs a task's stdout).
BODY_LINE = "sending welcome to user 7"

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_FILE_HEADER = re.compile(r"# (\w+\.py)$")

#: Without git: what the build's copy leaves out (venvs, build output, caches).
_NOT_SOURCES = shutil.ignore_patterns(
    ".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", "*_cache", ".hypothesis"
)


def copy_sources(dest: Path) -> None:
    """Copy the checkout's files that git does not ignore (committed or not) to ``dest``."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, ignore=_NOT_SOURCES)
        return
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a file deleted in the work tree is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


# --------------------------------------------------------------------------- the README


@dataclass(frozen=True)
class Quickstart:
    """The quickstart section of a Markdown page: its files and its worker command."""

    files: dict[str, str]
    worker: list[str]


def quickstart(page: Path, heading: str) -> Quickstart:
    """The files (python blocks opening with ``# NAME.py``) and the worker command.

    Taken from the section of ``page`` whose heading starts with ``heading``.
    """
    text = page.read_text(encoding="utf-8")
    start = text.find(f"\n{heading}")
    assert start >= 0, f"{page.name} has no {heading!r} section any more"
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    files: dict[str, str] = {}
    commands: list[str] = []
    for lang, body in _BLOCK.findall(section):
        first = body.splitlines()[0] if body else ""
        header = _FILE_HEADER.fullmatch(first.strip())
        if lang == "python" and header:
            files[header.group(1)] = body
        elif not lang:
            commands += [line.split("#")[0].strip() for line in body.splitlines()]
    workers = [c.split() for c in commands if c.startswith("celery ") and " worker" in c]
    assert set(files) == {"tasks.py", "send.py"}, (
        f"{page.name}'s quickstart should show tasks.py and send.py, found {sorted(files)}"
    )
    assert len(workers) == 1, f"{page.name}'s quickstart should show one worker command"
    return Quickstart(files, workers[0])


def test_the_docs_quickstart_is_the_readme_quickstart() -> None:
    # Fast: the docs site's copy (docs/getting-started.md) must not drift from the
    # README's, which the slow test below runs.
    assert quickstart(*GETTING_STARTED) == quickstart(*README)


# --------------------------------------------------------------------------- the install


@dataclass(frozen=True)
class Installed:
    """A fresh virtualenv with the wheel and its dependencies installed."""

    venv: Path
    versions: str

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def _run(cmd: list[str | Path], cwd: Path | None = None) -> str:
    """Run ``cmd`` to completion; its output, or a failure showing the output's end."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode:
        tail = "\n".join(output.splitlines()[-40:])
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")
    return output


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that points into the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from a copy of the sources and install it in a new virtualenv."""
    work = tmp_path_factory.mktemp("install")
    # A copy, so that setuptools' build/ of the checkout (stale modules included) and
    # its egg-info never reach the wheel.
    sources = work / "src"
    copy_sources(sources)
    wheels = work / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, sources])
    (wheel,) = wheels.glob("celery_idem-*.whl")

    python = os.environ.get("IDEM_INSTALL_PYTHON") or sys.executable
    venv = work / "venv"
    _run([python, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", wheel]
    constraints = os.environ.get("IDEM_INSTALL_CONSTRAINTS", "").split()
    if constraints:
        constraints_file = work / "constraints.txt"
        constraints_file.write_text("\n".join(constraints) + "\n", encoding="utf-8")
        pip += ["-c", constraints_file]
    _run(pip)
    _run([venv / "bin" / "python", "-m", "pip", "check"])
    versions = _run(
        [
            venv / "bin" / "python",
            "-c",
            "import importlib.metadata as m, platform; print(f'Python "
            "{platform.python_version()}', *(f'{d} {m.version(d)}' for d in "
            "('celery', 'kombu', 'redis')), sep=', ')",
        ]
    ).strip()
    return Installed(venv, versions)


@pytest.mark.slow
def test_the_wheel_is_what_the_venv_imports(installed: Installed, tmp_path: Path) -> None:
    where = _run(
        [installed.bin / "python", "-c", "import celery_idem; print(celery_idem.__file__)"],
        cwd=tmp_path,
    )
    assert str(installed.venv) in where, f"celery_idem imported from {where}"
    assert str(ROOT) not in where


@pytest.mark.slow
def test_the_readme_quickstart_runs_once_per_key(installed: Installed, tmp_path: Path) -> None:
    qs = quickstart(*README)
    print(f"the quickstart on {installed.versions}")  # shown by -rP or -s
    assert README_REDIS in qs.files["tasks.py"], (
        f"the quickstart's tasks.py no longer names {README_REDIS}: update this test"
    )
    with RedisServer() as server:
        redis_at = f"redis://127.0.0.1:{server.port}/"
        for name, code in qs.files.items():
            code = code.replace(README_REDIS, redis_at)
            assert "6379" not in code, f"{name} would reach the system Redis"
            (tmp_path / name).write_text(code, encoding="utf-8")

        # `celery` is the fresh venv's; the command is the README's own.
        cmd = [str(installed.bin / qs.worker[0]), *qs.worker[1:]]
        worker = Process(
            "the quickstart's worker", cmd, tmp_path / "worker.log", _clean_env(), tmp_path
        )
        worker.start()
        try:
            worker.wait_ready(lambda: " ready." in worker.output(), WORKER_START_TIMEOUT)
            sent = subprocess.run(
                [str(installed.bin / "python"), "send.py"],
                cwd=tmp_path,
                env=_clean_env(),
                capture_output=True,
                text=True,
                timeout=SEND_TIMEOUT,
                check=False,
            )
            assert sent.returncode == 0, (
                f"send.py exited {sent.returncode} ({installed.versions}):\n{sent.stderr}\n"
                f"the worker's log:\n{worker.tail(40)}"
            )
            answers = sent.stdout.splitlines()
            # Its first run's return value, three times: the fence is the first run's.
            assert len(answers) == 3, sent.stdout
            assert len(set(answers)) == 1, answers
            assert answers[0].startswith("welcome sent to user 7, fence "), answers
            # The log line of the body's print can trail the task's result a moment.
            wait_for(lambda: BODY_LINE in worker.output(), 10, message="the body's print")
            assert worker.output().count(BODY_LINE) == 1, (
                f"the body ran more than once ({installed.versions}):\n{worker.tail(40)}"
            )
        finally:
            worker.stop()
