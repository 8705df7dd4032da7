"""``make chaos``: minutes of overlapping faults over a mixed workload, then a verdict.

The orchestrator starts everything on this machine, each piece on its own:

- a *safe* redis-server (broker, result backend and the effect ledger) that no fault
  touches, and the *store* (``--store``: a redis-server with AOF on, or a private
  PostgreSQL whose database also holds the tasks' rows; ``stores.py``), reached only
  through the TCP fault proxy (``proxy.py``);
- 3 prefork workers of the chaos app (``app.py``), with ``acks_late`` and
  ``task_reject_on_worker_lost``;
- the publisher process (``publisher.py``): a steady seeded workload, then every answer;
- the nemesis (``nemesis.py``): seeded random faults, overlapping, each logged.

When the publisher has sent its last call the nemesis stops (ending every fault it has
running), the publisher waits for the answers, and the checker (``checker.py``) judges
from the publisher's history, the ledger and the fault log alone (with PostgreSQL, the
committed rows of the tasks' table too). The run's files stay in
``build/chaos/<seed>/``; ``--report`` writes its section of docs/reliability.md.

Exit status 0 when the checker found nothing, 1 when it found an anomaly (the first is
printed in full), 2 when the run itself could not be carried out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kombu import Connection

from devtools.processes import wait_for
from devtools.redis_server import RedisServer
from tests.chaos import checker
from tests.chaos.nemesis import Nemesis, NemesisTargets
from tests.chaos.plan import kinds_for
from tests.chaos.stores import STORES, open_store
from tests.faults.harness import amqp_url
from tests.faults.report import CHAOS_BEGIN
from tests.integration.conftest import ROOT, Worker

LEASE = 2.0
BROKERS = ("redis", "rabbitmq")


@dataclass
class ChaosWorker:
    """A worker the nemesis may kill whole and restart (a new process, same queue)."""

    env: dict[str, str]
    queue: str
    current: Worker = field(init=False)

    def __post_init__(self) -> None:
        self.current = self._new().start()

    def _new(self) -> Worker:
        w = Worker(self.env, concurrency=2, app="tests.chaos.app")
        w.queue = self.queue
        return w

    @property
    def main_pid(self) -> int:
        assert self.current.proc is not None
        return self.current.proc.pid

    def children(self) -> list[int]:
        return self.current.children()

    def kill(self) -> None:
        self.current.kill()

    def restart(self) -> None:
        self.current = self._new().start()

    def stop(self) -> None:
        self.current.stop()


def run(args: argparse.Namespace) -> tuple[checker.Report, Counter[str]]:
    """Carry one soak out; the checker's report and the faults injected (not failed)."""
    workdir = args.out / str(args.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    history, answers = workdir / "history.jsonl", workdir / "answers.jsonl"
    faults_log, sent_flag = workdir / "faults.jsonl", workdir / "sent"
    for path in (history, answers, faults_log, sent_flag, workdir / "rows.jsonl"):
        path.unlink(missing_ok=True)
    (workdir / "run.json").write_text(json.dumps({"store": args.store, "broker": args.broker}))
    with ExitStack() as stack:
        safe = stack.enter_context(RedisServer())
        store = stack.enter_context(open_store(args.store, workdir))
        queue = f"chaos-{args.seed}-{os.getpid()}"
        broker = amqp_url() if args.broker == "rabbitmq" else safe.url(1)
        env = {
            "CHAOS_BROKER_URL": broker,
            "CHAOS_QUEUE": queue,
            "CHAOS_BACKEND": safe.url(2),
            "CHAOS_LEDGER": safe.url(3),
            "CHAOS_STORE_URL": store.url,
            "CHAOS_LEASE": str(LEASE),
            "CHAOS_BROKEN": args.broken or "",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        if args.broker == "rabbitmq":
            stack.callback(delete_queue, broker, queue)  # RabbitMQ outlives the run
        workers = [ChaosWorker(env, queue) for _ in range(args.workers)]
        stack.callback(lambda: [w.stop() for w in workers])
        targets = NemesisTargets(
            workers=lambda: list(workers), store_stop=store.stop, store_start=store.start,
            proxy=store.proxy, **store.faults,
        )  # fmt: skip
        kinds = tuple(args.kinds.split(",")) if args.kinds else store.kinds
        nemesis = Nemesis(
            random.Random(args.seed), targets, faults_log, lease=LEASE, kinds=kinds,
            mean_gap=args.mean_gap,
        )  # fmt: skip
        publisher = subprocess.Popen(
            [
                sys.executable, "-m", "tests.chaos.publisher", "--seconds", str(args.seconds),
                "--rate", str(args.rate), "--seed", str(args.seed), "--history", str(history),
                "--answers", str(answers), "--sent-flag", str(sent_flag),
                "--drain", str(args.drain),
            ],
            cwd=ROOT, env={**os.environ, **env},
        )  # fmt: skip
        started = time.time()
        if kinds and not args.no_faults:
            nemesis.start()
        try:
            wait_for(
                lambda: sent_flag.exists() or publisher.poll() is not None,
                timeout=args.seconds + 120, interval=0.2, message="the publisher's send phase",
            )  # fmt: skip
        finally:
            nemesis.stop()
        publisher.wait(timeout=args.drain + 120)
        if publisher.returncode != 0:
            raise RuntimeError(f"the publisher exited with {publisher.returncode}")
        ledger = safe.client(3).lrange("chaos:ledger", 0, -1)
        (workdir / "ledger.jsonl").write_text(b"\n".join(ledger).decode() + "\n")
        delivered = safe.client(3).lrange("chaos:deliveries", 0, -1)
        (workdir / "deliveries.jsonl").write_text(b"\n".join(delivered).decode() + "\n")
        store.save(workdir)
        counts = nemesis.counts()
        (workdir / "injected.json").write_text(json.dumps(counts))
        print(f"chaos: {time.time() - started:.0f} s, files in {workdir}", flush=True)
        return judge(workdir), counts


def judge(workdir: Path) -> checker.Report:
    """The checker's verdict on a run's files (history, answers, ledger, deliveries, faults).

    Reads only what the run left in ``workdir``, so a run can be judged again later
    (``--judge``) with the same files.
    """

    def lines(name: str) -> list[dict[str, Any]]:
        path = workdir / name
        return checker.load_jsonl(path) if path.exists() else []

    rows = None
    if (workdir / "rows.jsonl").exists():  # the PostgreSQL store's run: check 7 too
        rows = [checker.Row.from_json(x) for x in lines("rows.jsonl")]
    return checker.check(
        [checker.Call.from_json(x) for x in lines("history.jsonl")],
        [checker.Answer.from_json(x) for x in lines("answers.jsonl")],
        [checker.Effect.from_json(x) for x in lines("ledger.jsonl")],
        [checker.Fault.from_json(x) for x in lines("faults.jsonl")],
        deliveries=[checker.Delivery.from_json(x) for x in lines("deliveries.jsonl")],
        rows=rows,
        lease=LEASE,
    )


def delete_queue(broker: str, queue: str) -> None:
    """Remove the run's queue from a broker that outlives it (RabbitMQ)."""
    with Connection(broker, connect_timeout=5) as conn:
        conn.default_channel.queue_delete(queue)


STORE_FAULTS = {
    "redis": "the store's Redis restarted with AOF, `SCRIPT FLUSH`",
    "postgres": (
        "the store's PostgreSQL restarted (fast shutdown) and killed (SIGKILL of the "
        "postmaster and its backends, WAL recovery at the start), every worker session "
        "ended by `pg_terminate_backend`"
    ),
}
DATABASE_EFFECT = (
    " The PostgreSQL server runs with `synchronous_commit = on` for the chaos database "
    "(`fsync` off: the nemesis kills processes, never the machine); with it off, a killed "
    "server forgets its last acknowledged commits, which no store-side protocol survives."
    " With the records in PostgreSQL, every body that completes its key also inserts one "
    "row into a table of the same database (no unique constraint) inside "
    "`self.idem_atomic(conn)`, on its own connection through the same proxy, and answers "
    "with that row's id; a body whose connection breaks retries (`autoretry_for`). The "
    "checker reads the committed rows too (check 7): more than one row for a key (and "
    "step) is an anomaly under every fault, as is an answer that does not name its key's "
    "committed row."
)


def method(args: argparse.Namespace) -> str:
    """What the run did, for the reader of its report."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    faults = args.kinds or ", ".join(kinds_for(args.store))
    store = "PostgreSQL" if args.store == "postgres" else "Redis"
    replay = f"CHAOS_SECONDS={args.seconds:g} CHAOS_SEED={args.seed}"
    replay += f" CHAOS_STORE={args.store}" if args.store != "redis" else ""
    replay += f" CHAOS_BROKER={args.broker}" if args.broker != "redis" else ""
    return (
        f"Written by `make chaos` from the run it reports ({when}"
        f"{', judged again from its saved files' if args.judge else ''}; replay it with "
        f"`{replay} make chaos`). Jepsen's "
        f"method: a workload, a nemesis, an independent history, a checker. A publisher "
        f"process sent {args.rate:g} operations a second for {args.seconds:g} s (unique keys, "
        f"bursts of 2 to 4 concurrent duplicates, late duplicates, explicit keys, key "
        f"mismatches aimed at answered keys, `self.retry()` and `autoretry_for` tasks, a "
        f"3-step chain through idempotent steps, a 3-member group) to {args.workers} prefork "
        f"workers (2 children each, `acks_late`, `task_reject_on_worker_lost`, "
        f"{'RabbitMQ' if args.broker == 'rabbitmq' else 'Redis'} broker, {store} store, "
        f"lease {LEASE:g} s). A seeded nemesis injected overlapping faults every "
        f"{args.mean_gap:g} s on average: {faults} (worker children and whole workers "
        f"SIGKILLed and restarted, children SIGSTOPped past their lease, "
        f"{STORE_FAULTS[args.store]}, and through a TCP proxy in front of the store: "
        f"latency, dropped connections, blackholes). Every body appended its effect to a "
        f"ledger on a server no fault touches. The checker (`tests/chaos/checks.py`) reads "
        f"only the publisher's history, that ledger and the fault log, never celery-idem's "
        f"records: every call answered with a value or a documented error, the answers of a "
        f"key agree, every body run beyond one per key is explained by a fault in the "
        f"documented window (listed below with its fault), fences grow, no mismatch ran a "
        f"body, no key is stuck.{DATABASE_EFFECT if args.store == 'postgres' else ''}\n"
    )


def section_id(args: argparse.Namespace) -> str:
    """The section's marker in docs/reliability.md: the broker's, or ``<store>[-broker]``."""
    if args.store == "redis":
        return str(args.broker)
    return args.store if args.broker == "redis" else f"{args.store}-{args.broker}"


def section_title(args: argparse.Namespace) -> str:
    broker = f"{'RabbitMQ' if args.broker == 'rabbitmq' else 'Redis'} broker"
    if args.store == "postgres":
        return f"Chaos soak, PostgreSQL store ({broker})"
    return f"Chaos soak, {broker}"


def write_section(path: Path, section: str, marker: str) -> None:
    """Replace (or append) the chaos section ``marker`` of docs/reliability.md."""
    text = path.read_text() if path.exists() else ""
    begin, end = f"{CHAOS_BEGIN} {marker} -->", f"<!-- chaos:end {marker} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    env_seed = os.environ.get("CHAOS_SEED")
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("CHAOS_SECONDS", 180))
    )
    parser.add_argument("--seed", type=int, default=int(env_seed) if env_seed else None)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--broker", choices=BROKERS, default=os.environ.get("CHAOS_BROKER", "redis")
    )
    parser.add_argument(
        "--store", choices=STORES, default=os.environ.get("CHAOS_STORE", "redis"),
        help="where celery-idem keeps its records (postgres: the tasks' rows too)",
    )  # fmt: skip
    parser.add_argument("--rate", type=float, default=20.0, help="operations a second")
    parser.add_argument("--mean-gap", type=float, default=1.5, help="mean seconds between faults")
    parser.add_argument("--kinds", default="", help="fault kinds, comma-separated (default all)")
    parser.add_argument("--no-faults", action="store_true", help="the workload alone")
    parser.add_argument("--drain", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "chaos")
    parser.add_argument("--report", type=Path, help="write the run's section to this file")
    parser.add_argument(
        "--min-each", type=int, default=0, help="fail unless each fault kind ran this often"
    )
    parser.add_argument(
        "--judge", action="store_true", help="judge the saved files of --seed again, run nothing"
    )
    parser.add_argument("--broken", default="", help=argparse.SUPPRESS)  # checker self-test
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**9)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    print(f"chaos: seed {args.seed} (replay with CHAOS_SEED={args.seed}), {args.seconds:.0f} s")
    try:
        if args.judge:
            workdir = args.out / str(args.seed)
            saved_run = workdir / "run.json"
            if saved_run.exists():  # judged as it ran: its store and broker
                vars(args).update(json.loads(saved_run.read_text()))
            report = judge(workdir)
            saved = workdir / "injected.json"
            injected = Counter(json.loads(saved.read_text()) if saved.exists() else report.faults)
        else:
            report, injected = run(args)
    except Exception as exc:  # the run itself failed: no verdict
        print(f"chaos: the run could not be carried out: {type(exc).__name__}: {exc}")
        return 2
    section = checker.render_markdown(report, seed=args.seed, title=section_title(args))
    title, _, body = section.partition("\n")
    section = title + "\n\n" + method(args) + body
    print(section)
    if args.report:
        write_section(args.report, section, section_id(args))
    kinds = tuple(args.kinds.split(",")) if args.kinds else kinds_for(args.store)
    short = [k for k in kinds if injected[k] < args.min_each]
    if args.min_each and short and not args.no_faults:
        print(f"chaos: fault kinds injected fewer than {args.min_each} times: {short}")
        return 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
