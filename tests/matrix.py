"""``make test-matrix``: the fast tests at the declared floors and at the newest releases.

Two environments, each a virtualenv of its own under ``build/matrix/``:

``floors``
    the oldest Python found that ``requires-python`` admits (3.10 here), with every
    ``>=`` floor of pyproject.toml's ``dependencies`` pinned with ``==`` (celery, kombu,
    redis-py), and the ``postgres`` extra's (psycopg, with its binary build at the same
    version): what the declared ranges promise at their low end;
``newest``
    the newest Python found, everything upgraded to the newest release the registry
    has (``pip install -U --upgrade-strategy eager``).

In each, the package is installed (editable, with its ``test`` and ``postgres`` extras,
and psycopg's binary build, so the PostgreSQL store's contract runs on the system's
PostgreSQL where there is one) and pytest runs
``tests/unit``, ``tests/contract`` and ``tests/install``: the last one builds the
wheel and starts the README's quickstart worker from a fresh venv on that Python, at
the floors under the same pins (``IDEM_INSTALL_CONSTRAINTS``). The venvs are kept and
brought up to date at the next run.

Usage: ``python tests/matrix.py [floors|newest ...] [-- PYTEST_ARGS]``; no name runs
both. ``MATRIX_FLOORS_PYTHON`` and ``MATRIX_NEWEST_PYTHON`` choose the interpreters.
Only the standard library, so that any Python 3.10+ runs it; it exits non-zero when an
environment cannot be built or its tests fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
BUILD = ROOT / "build" / "matrix"
TESTS = ["tests/unit", "tests/contract", "tests/install"]
ENVIRONMENTS = ("floors", "newest")
EXTRAS = ".[test,postgres]"
BINARY = {"psycopg": "psycopg-binary"}
"""A dependency whose compiled build is installed beside it, pinned to the same floor."""


def log(message: str) -> None:
    print(f"[matrix {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- pyproject


def _project_table(text: str) -> str:
    match = re.search(r"^\[project\]\n(.*?)(?=^\[)", text, re.MULTILINE | re.DOTALL)
    if not match:
        raise SystemExit(f"{PYPROJECT}: no [project] table")
    return match.group(1)


def declared_floors(text: str) -> list[str]:
    """``name==X`` for every ``>=X`` in ``[project] dependencies`` and the ``postgres``
    extra (extras of a requirement dropped); a :data:`BINARY` build pinned beside its
    package."""
    block = re.search(r"^dependencies = \[\n(.*?)^\]", _project_table(text), re.M | re.S)
    if not block:
        raise SystemExit(f"{PYPROJECT}: no dependencies list in [project]")
    extra = re.search(r"^postgres = \[(.*?)\]", text, re.M | re.S)
    requirements = re.findall(r'^\s*"([^"]+)"', block.group(1), re.MULTILINE)
    requirements += re.findall(r'"([^"]+)"', extra.group(1)) if extra else []
    pins = []
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", requirement)
        if name and floor:
            pins.append(f"{name.group(0)}=={floor.group(1)}")
            if name.group(0) in BINARY:
                pins.append(f"{BINARY[name.group(0)]}=={floor.group(1)}")
    if not pins:
        raise SystemExit(f"{PYPROJECT}: no '>=' floor in [project] dependencies")
    return pins


def required_python(text: str) -> tuple[int, int]:
    """The lowest ``X.Y`` of ``requires-python = ">=X.Y"``."""
    match = re.search(r'^requires-python = ">=\s*(\d+)\.(\d+)', _project_table(text), re.M)
    if not match:
        raise SystemExit(f'{PYPROJECT}: requires-python is not ">=X.Y"')
    return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------- interpreters


def _version_of(executable: str) -> tuple[int, int] | None:
    """``(major, minor)`` of an interpreter that runs, None otherwise (a pyenv shim of a
    version that is not selected exits with an error)."""
    try:
        out = subprocess.run(
            [executable, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = out.stdout.split()
    if out.returncode or len(parts) != 2:
        return None
    return int(parts[0]), int(parts[1])


def interpreters() -> dict[tuple[int, int], str]:
    """Every CPython 3 found: ``python3.N`` on PATH, then pyenv's versions; one per N."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(8, 30)]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates += [str(p) for p in sorted(pyenv.glob("3.*/bin/python3.*"))]
    found: dict[tuple[int, int], str] = {}
    for candidate in candidates:
        if not candidate or not re.search(r"python3\.\d+$", candidate):
            continue
        version = _version_of(candidate)
        if version and version not in found:
            found[version] = candidate
    return found


def pick_python(name: str, minimum: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """The interpreter for ``name``: its environment variable, else oldest or newest."""
    chosen = os.environ.get(f"MATRIX_{name.upper()}_PYTHON")
    if chosen:
        version = _version_of(chosen)
        if version is None:
            raise SystemExit(f"MATRIX_{name.upper()}_PYTHON={chosen} does not run")
        return chosen, version
    usable = {v: path for v, path in interpreters().items() if v >= minimum}
    if not usable:
        raise SystemExit(f"no Python {minimum[0]}.{minimum[1]}+ found")
    version = min(usable) if name == "floors" else max(usable)
    if name == "floors" and version != minimum:
        log(f"no Python {minimum[0]}.{minimum[1]} found: the floors run on {version}")
    return usable[version], version


# --------------------------------------------------------------------------- environments


@dataclass
class Outcome:
    name: str
    versions: str = ""
    seconds: float = 0.0
    result: str = "not run"


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def prepare(name: str, python: str, version: tuple[int, int], pins: list[str]) -> Path:
    """Create (or reuse) the environment's venv and install the package into it."""
    venv = BUILD / f"{name}-py{version[0]}.{version[1]}"
    venv_python = venv / "bin" / "python"
    if not venv_python.exists() and run([python, "-m", "venv", str(venv)]):
        raise RuntimeError(f"could not create {venv}")
    install = [str(venv_python), "-m", "pip", "install", "-q", "-e", EXTRAS, *BINARY.values()]
    if pins:
        constraints = venv / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        install += ["-c", str(constraints)]
    else:
        install += ["-U", "--upgrade-strategy", "eager"]
    if run(install) or run([str(venv_python), "-m", "pip", "check"]):
        raise RuntimeError(f"could not install the package into {venv}")
    return venv


def installed_versions(venv: Path) -> str:
    script = (
        "import importlib.metadata as m, platform; print(f'Python "
        "{platform.python_version()}', *(f'{d} {m.version(d)}' for d in "
        "('celery', 'kombu', 'redis', 'psycopg')), sep=', ')"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def run_environment(name: str, pytest_args: list[str], text: str) -> Outcome:
    outcome = Outcome(name)
    start = time.monotonic()
    try:
        python, version = pick_python(name, required_python(text))
        pins = declared_floors(text) if name == "floors" else []
        log(f"{name}: Python {version[0]}.{version[1]} ({python}); pins: {pins or 'none'}")
        venv = prepare(name, python, version, pins)
        outcome.versions = installed_versions(venv)
        log(f"{name}: {outcome.versions}")
        env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
        env.pop("IDEM_INSTALL_PYTHON", None)  # tests/install uses this venv's Python
        env["IDEM_INSTALL_CONSTRAINTS"] = " ".join(pins)
        cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider"]
        rc = run([*cmd, "-q", *TESTS, *pytest_args], env)
        outcome.result = "passed" if rc == 0 else f"FAILED (pytest exit {rc})"
    except RuntimeError as exc:
        outcome.result = f"FAILED ({exc})"
    outcome.seconds = time.monotonic() - start
    return outcome


def main(argv: list[str]) -> int:
    names, pytest_args = argv, []
    if "--" in argv:
        cut = argv.index("--")
        names, pytest_args = argv[:cut], argv[cut + 1 :]
    unknown = [n for n in names if n not in ENVIRONMENTS]
    if unknown:
        raise SystemExit(f"unknown environment {unknown}: choose from {ENVIRONMENTS}")
    text = PYPROJECT.read_text(encoding="utf-8")
    outcomes = [run_environment(n, pytest_args, text) for n in names or ENVIRONMENTS]
    print("\n---- test matrix ----")
    for o in outcomes:
        print(f"  {o.name:<7} {o.seconds:6.1f}s  {o.result:<8}  {o.versions}")
    return 0 if all(o.result == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
