"""Celery's own unit tests with IdempotentTask as every app's default task base.

``make test-celery-compat`` runs this. It fetches the source release of the *installed*
Celery from the package index (``pip download --no-binary :all:``, cached in
build/celery-src), unpacks its tests (``t/`` only: the installed Celery is the one
tested) into build/celery-compat, and runs ``t/unit/tasks`` (tasks, canvas, tracing,
results, chords, stamping) twice with Celery's own pytest configuration:

1. on plain Celery, the baseline: everything must pass there, so nothing that fails
   on Celery itself is blamed on celery-idem;
2. with ``compat_plugin``, which makes IdempotentTask (on the in-memory store,
   cleared per test) the default base of every app.

The failures of the second run are compared with ``expected.txt`` (node id -> reason).
The build fails on a failure not in the list, on a listed test that now passes
("unexpectedly passes: remove it from the list"), on a listed test that fails for
another reason than its ``match:`` lines say, on an entry naming no test, and on any
failure of the baseline. ``COMPAT_PLAIN=1`` (or ``--plain``) runs the baseline only;
``--no-baseline`` only the idempotent run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / "build" / "celery-src"
WORK = ROOT / "build" / "celery-compat"
EXPECTED = HERE / "expected.txt"
TEST_DIR = "t/unit/tasks"
BUG = "bug: being fixed"
FAILURE_LINES = 80
"""Lines of each unexpected failure's traceback printed."""


@dataclass
class Entry:
    """One expected difference of ``expected.txt``."""

    nodeid: str
    reason: str = ""
    match: list[str] = field(default_factory=list)

    @property
    def bug(self) -> bool:
        return self.reason.startswith(BUG)


@dataclass
class Run:
    """The outcome of one pytest run over Celery's tests."""

    label: str
    outcomes: dict[str, str]
    failures: dict[str, str]
    records: dict[str, int]
    celery_file: str
    celery_idem_imported: bool
    summary: str
    seconds: float

    def count(self, outcome: str) -> int:
        return sum(1 for value in self.outcomes.values() if value == outcome)

    def failed(self) -> set[str]:
        return {nodeid for nodeid, value in self.outcomes.items() if value == "failed"}


def log(message: str = "") -> None:
    print(message, flush=True)


def parse_expected(path: Path) -> dict[str, Entry]:
    """Read ``expected.txt``: a node id, then indented ``match:`` and reason lines."""
    entries: dict[str, Entry] = {}
    current: Entry | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if not line[0].isspace():
            nodeid = line.strip()
            if nodeid in entries:
                raise SystemExit(f"{path}:{number}: {nodeid} is listed twice")
            current = entries[nodeid] = Entry(nodeid)
        elif current is None:
            raise SystemExit(f"{path}:{number}: an indented line before any node id")
        elif line.strip().startswith("match:"):
            current.match.append(line.strip()[len("match:") :].strip())
        else:
            current.reason = f"{current.reason} {line.strip()}".strip()
    for entry in entries.values():
        if not entry.reason:
            raise SystemExit(f"{path}: {entry.nodeid} has no reason")
    return entries


def sdist(celery_version: str) -> Path:
    """The Celery source release of this version, downloaded into CACHE once."""
    name = f"celery-{celery_version}.tar.gz"
    archive = CACHE / name
    if archive.exists():
        log(f"celery-compat: using the cached {archive.relative_to(ROOT)}")
        return archive
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"celery-compat: downloading the source release of celery=={celery_version}")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
            "--no-deps", "--dest", str(CACHE), f"celery=={celery_version}",
        ],
        check=True,
    )  # fmt: skip
    if not archive.exists():
        raise SystemExit(f"celery-compat: pip download left no {name} in {CACHE}")
    return archive


def unpack(archive: Path, celery_version: str) -> Path:
    """Unpack the tests (``t/``) and pytest configuration, fresh, into WORK.

    Not the ``celery`` package: with it on the path the tests would import that copy
    instead of the installed Celery that celery-idem runs with.
    """
    top = f"celery-{celery_version}"
    wanted = (f"{top}/t/", f"{top}/pyproject.toml")
    target = WORK / top
    if target.exists():
        shutil.rmtree(target)
    WORK.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        names = {m.name for m in members}
        for needed in (f"{top}/{TEST_DIR}/test_tasks.py", f"{top}/t/unit/conftest.py"):
            if needed not in names:
                raise SystemExit(
                    f"celery-compat: {archive.name} has no {needed}: this Celery release "
                    "does not ship its tests in its source release"
                )
        for member in members:
            if not (member.isfile() or member.isdir()) or ".." in Path(member.name).parts:
                raise SystemExit(f"celery-compat: refusing {member.name!r} in {archive.name}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(WORK, members=members, filter="data")
        else:
            tar.extractall(WORK, members=members)
    return target


def run_pytest(source: Path, *, plain: bool, timeout: int) -> Run:
    """One pytest run over Celery's tests; outcomes come from compat_plugin's JSON."""
    label = "plain Celery" if plain else "IdempotentTask"
    results = WORK / f"results-{'plain' if plain else 'idem'}.json"
    results.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["COMPAT_RESULTS"] = str(results)
    env["COMPAT_PLAIN"] = "1" if plain else "0"
    command = [
        sys.executable, "-m", "pytest", TEST_DIR,
        "-c", "pyproject.toml", "--rootdir", ".",  # Celery's own pytest configuration
        "-p", "compat_plugin", "-p", "no:celery_idem", "-p", "no:cacheprovider",
        "-q", "--tb=no", "-rN", "--disable-warnings", f"--timeout={timeout}",
    ]  # fmt: skip
    # -rN --tb=no: the expected failures are not listed; the unexpected ones are, with
    # their tracebacks, by compare().
    log(f"\n===== celery-compat: {label}: {' '.join(command[1:])} (in {source})")
    started = time.monotonic()
    process = subprocess.run(
        command, cwd=source, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seconds = time.monotonic() - started
    sys.stdout.write(process.stdout)
    lines = process.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else ""
    if process.returncode not in (0, 1) or not results.exists():
        raise SystemExit(
            f"celery-compat: pytest ({label}) exited with {process.returncode}"
            + ("" if results.exists() else " and wrote no results")
        )
    data: dict[str, Any] = json.loads(results.read_text(encoding="utf-8"))
    return Run(
        label=label,
        outcomes=data["outcomes"],
        failures=data["failures"],
        records=data["records"],
        celery_file=data["celery_file"],
        celery_idem_imported=data["celery_idem_imported"],
        summary=summary,
        seconds=seconds,
    )


def excerpt(text: str) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) > FAILURE_LINES:
        lines = [*lines[:FAILURE_LINES], f"... ({len(lines) - FAILURE_LINES} more lines)"]
    return "\n".join(f"    {line}" for line in lines)


def compare(
    plain: Run | None, idem: Run | None, expected: dict[str, Entry], listed_in: Path, source: Path
) -> int:
    """Print the findings and the table; return the number of problems."""
    problems: list[str] = []
    for run in filter(None, (plain, idem)):
        if Path(run.celery_file).resolve().is_relative_to(source.resolve()):
            problems.append(f"{run.label} imported Celery from the unpacked source")
    if plain is not None and plain.celery_idem_imported:
        problems.append("the plain-Celery run imported celery_idem")

    plain_failed: set[str] = set()
    if plain is not None:
        plain_failed = plain.failed()
        for nodeid in sorted(plain_failed):
            log(f"\nFAILS ON PLAIN CELERY (not celery-idem: the environment or Celery): {nodeid}")
            log(excerpt(plain.failures.get(nodeid, "")))
        if plain_failed:
            problems.append(f"{len(plain_failed)} failing on plain Celery")

    seen: list[str] = []
    unexpected: list[str] = []
    passing: list[str] = []
    other_reason: list[str] = []
    stale: list[str] = []
    also_plain: list[str] = []
    if idem is not None:
        if not idem.records.get("written"):
            problems.append("no idempotency record was written: the base was not injected")
        for nodeid in sorted(idem.failed()):
            entry = expected.get(nodeid)
            text = idem.failures.get(nodeid, "")
            if nodeid in plain_failed:
                also_plain.append(nodeid)
            elif entry is None:
                unexpected.append(nodeid)
                log(f"\nUNEXPECTED FAILURE with IdempotentTask: {nodeid}")
                log(excerpt(text))
            elif missing := [m for m in entry.match if m not in text]:
                other_reason.append(nodeid)
                log(f"\nFAILS FOR ANOTHER REASON than listed in {listed_in.name}: {nodeid}")
                log(f"  expected to find: {missing!r}")
                log(excerpt(text))
            else:
                seen.append(nodeid)
        for nodeid, entry in sorted(expected.items()):
            outcome = idem.outcomes.get(nodeid)
            if outcome is None:
                stale.append(nodeid)
                log(f"\nLISTED BUT NOT RUN (renamed or removed in this Celery?): {nodeid}")
            elif outcome != "failed":
                passing.append(nodeid)
                log(
                    f"\nUNEXPECTEDLY PASSES ({outcome}), remove it from the list of expected "
                    f"differences ({listed_in}): {nodeid}\n"
                    f"    it was listed as: {entry.reason}"
                )
        problems += [
            f"{len(items)} {what}"
            for items, what in (
                (unexpected, "unexpected failures"),
                (passing, "unexpectedly passing"),
                (other_reason, "failing for another reason"),
                (stale, "stale list entries"),
            )
            if items
        ]

    log("\n===== celery-compat: summary")
    log(f"  {'run':<16} {'passed':>7} {'failed':>7} {'skipped':>8} {'xfailed':>8} {'time':>7}")
    for run in filter(None, (plain, idem)):
        log(
            f"  {run.label:<16} {run.count('passed'):>7} {run.count('failed'):>7} "
            f"{run.count('skipped'):>8} {run.count('xfailed'):>8} {run.seconds:>6.1f}s"
        )
    if idem is not None:
        bugs = sum(expected[nodeid].bug for nodeid in seen)
        log(
            f"  idempotency records written: {idem.records.get('written', 0)} "
            f"(by {idem.records.get('tests', 0)} tests)"
        )
        rows = [
            (
                "expected differences seen",
                len(seen),
                f"of {len(expected)} listed ({bugs} marked bug)",
            ),
            ("unexpected failures", len(unexpected), ""),
            ("unexpectedly passing", len(passing), "remove them from the list"),
            ("failing for another reason", len(other_reason), ""),
            ("stale list entries", len(stale), ""),
        ]
        if plain is not None:
            rows.append(
                ("failing on plain Celery too", len(also_plain), "not blamed on celery-idem")
            )
        for name, count, note in rows:
            shown = note if count or name.startswith("expected") else ""
            log(f"  {name:<28} {count:>4}  {shown}".rstrip())
    for run in filter(None, (plain, idem)):
        log(f"  pytest, {run.label}: {run.summary}")
    verdict = "FAILED: " + ", ".join(problems) if problems else "PASSED"
    counts = ", ".join(
        f"{run.label} {run.count('passed')} passed, {run.count('failed')} failed"
        for run in filter(None, (plain, idem))
    )
    if idem is not None:
        counts += f"; {len(seen)} expected differences"
    log(f"celery-compat: {verdict} ({counts})")
    return len(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--plain",
        action="store_true",
        default=os.environ.get("COMPAT_PLAIN") == "1",
        help="the plain-Celery baseline only (also COMPAT_PLAIN=1)",
    )
    mode.add_argument("--no-baseline", action="store_true", help="the idempotent run only")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per test")
    parser.add_argument(
        "--expected",
        type=Path,
        default=EXPECTED,
        help="the list of expected differences (default: tests/celery_compat/expected.txt)",
    )
    args = parser.parse_args(argv)
    if args.plain and args.no_baseline:
        parser.error("COMPAT_PLAIN=1 (or --plain) and --no-baseline leave nothing to run")

    celery_version = version("celery")
    listed_in = args.expected.resolve()
    if listed_in.is_relative_to(ROOT):
        listed_in = listed_in.relative_to(ROOT)  # shorter in messages; make runs in ROOT
    expected = parse_expected(args.expected)
    source = unpack(sdist(celery_version), celery_version)
    log(
        f"celery-compat: Celery {celery_version}, {TEST_DIR}; "
        f"{len(expected)} expected differences in {listed_in}"
    )
    plain = None if args.no_baseline else run_pytest(source, plain=True, timeout=args.timeout)
    idem = None if args.plain else run_pytest(source, plain=False, timeout=args.timeout)
    return 1 if compare(plain, idem, expected, listed_in, source) else 0


if __name__ == "__main__":
    sys.exit(main())
