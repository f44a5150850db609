"""`make bench`: run the benchmarks, each beside its baseline, and rewrite docs/benchmarks.md.

    python -m bench.run            # every benchmark
    python -m bench.run sync       # only some (names in BENCHMARKS): their sections and target rows
                                   # are replaced, the others' kept from the run that wrote them

Uses the database toolexec_bench (dropped and created afresh) and Redis index 13 (flushed).
"""

from __future__ import annotations

import datetime
import importlib
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

from . import common

# name on the command line -> module with TITLE ("benchmark N: …"), measure() and
# section(result) -> (lines, target rows). They run in this order (history last: it fills the
# record tables with a million rows); the document lists them by number.
BENCHMARKS = {
    "sync": "bench.sync_execute",
    "async": "bench.async_accept",
    "progress": "bench.progress_cost",
    "queue-start": "bench.queue_start",
    "throughput": "bench.worker_throughput",
    "memory": "bench.worker_memory",
    "cpu": "bench.platform_cpu",
    "cache": "bench.cache_hit",
    "workflow": "bench.workflow_steps",
    "websocket": "bench.websocket_fanout",
    "history": "bench.history_scale",
}
# BENCH_DOC writes elsewhere (to develop a benchmark without touching the committed document)
DOC = Path(os.environ.get("BENCH_DOC", common.ROOT / "docs" / "benchmarks.md")).resolve()
NOTES = "\n## Notes (hand-written, kept across runs)\n"


def prepare() -> None:
    os.environ.update(common.bench_env())
    common.database_recreate()
    common.redis_flush()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from bench.baseline.views import TABLES_SQL
    from bench.floor_rq import TABLE_SQL

    call_command("migrate", verbosity=0)  # post_migrate syncs the catalog, bench tools included
    with connection.cursor() as cursor:
        cursor.execute(TABLES_SQL + TABLE_SQL)
    # The Celery peer's result tables (django-celery-results), with its own settings module.
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "django_celery_results", "--verbosity", "0", "--skip-checks"],
        cwd=str(common.ROOT), env={**common.subprocess_env(), "DJANGO_SETTINGS_MODULE": "bench.celery_settings"},
        check=True,
    )  # fmt: skip


KEPT = re.compile(r"benchmarks? ([\d, ]+?) (?:are )?(?:as measured )?by the run of (.+?)(?=; benchmark|$)")


def kept_from(text: str, chosen: set[int]) -> tuple[dict[int, tuple[list[str], list[str]]], dict[int, str]]:
    """Of a document ``render`` wrote, each benchmark not in ``chosen`` as (its section's lines,
    its target rows) by number, and by number the run that measured it: the one the document's
    ``kept`` line names for it, else the document's own (its date and command lines)."""
    lines = text.split(NOTES, 1)[0].splitlines()
    kept: dict[int, tuple[list[str], list[str]]] = {}
    current: int | None = None
    for line in lines:
        row = re.match(r"\| (\d+)\. ", line)
        if row and int(row[1]) not in chosen:
            kept.setdefault(int(row[1]), ([], []))[1].append(line)
        heading = re.match(r"## (\d+)\. ", line)
        if heading:
            current = int(heading[1])
        elif line.startswith("## "):
            current = None
        if current is not None and current not in chosen:
            kept.setdefault(current, ([], []))[0].append(line)
    said = dict(line[2:].split(": ", 1) for line in lines if line.startswith(("- date: ", "- command: ", "- kept: ")))
    origin = {number: f"{said.get('date', 'an earlier run')} ({said.get('command', '?')})" for number in kept}
    for numbers, run in KEPT.findall(said.get("kept", "")):
        for number in (int(n) for n in numbers.split(", ")):
            if number in origin:
                origin[number] = run
    return kept, origin


def kept_words(origin: dict[int, str]) -> str:
    """``kept_from``'s origins in words, one clause per run, in the order of the benchmarks."""
    runs: dict[str, list[int]] = {}
    for number in sorted(origin):
        runs.setdefault(origin[number], []).append(number)
    return "; ".join(
        f"{'benchmarks' if len(numbers) > 1 else 'benchmark'} {', '.join(map(str, numbers))} by the run of {run}"
        for run, numbers in runs.items()
    )


def render(sections: list[tuple[list[str], list[str]]], info: dict[str, str], command: str, notes: list[str]) -> str:
    head = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/run.py`); do not edit by hand. Every figure is measured beside "
        "its baseline in the same run on the same machine, alternating the arms, because these machines "
        "are shared and noisy: compare ratios, not absolute figures, across runs. Benchmarks are not tests.",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- command: `{command}`",
        *([f"- kept: {info['kept']}"] if info.get("kept") else []),
        f"- machine: nproc {info['nproc']} ({info['cpu']}); load generator, gunicorn, PostgreSQL and Redis "
        "share these cores",
        f"- versions: Python {info['python']}, Django {info['django']}, PostgreSQL {info['postgresql']}, "
        f"Redis {info['redis']}, psycopg {info['psycopg']}, gunicorn {info['gunicorn']}, {info['wrk']}, "
        f"RQ {info['rq']}, Celery {info['celery']} (the benchmark's peer only)",
        "",
        "## Targets",
        "",
        "| benchmark | figure | measured | target | verdict |",
        "|---|---|---|---|---|",
    ]
    body: list[str] = []
    for lines, verdicts in sections:
        head += verdicts
        body += lines
    head += [
        "",
        "Beside these, no other ratio in this document may get worse by more than 10% against the previous "
        "committed run (issue 20): compare by hand, with the noise of a shared machine in mind.",
    ]
    return "\n".join([*head, "", *body, *notes]).rstrip() + "\n"


def main(argv: list[str]) -> None:
    chosen = [name for name in argv if name in BENCHMARKS] or list(BENCHMARKS)
    command = "make bench" if chosen == list(BENCHMARKS) else f"python -m bench.run {' '.join(chosen)}"
    prepare()
    info = common.machine()
    numbered, failed = [], []
    for name in chosen:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"{module.TITLE} …", flush=True)
        try:
            numbered.append((int(module.TITLE.split()[1].rstrip(":")), module.section(module.measure())))
        except Exception:  # noqa: BLE001 - whatever broke, the other benchmarks still count
            # A whole run takes most of an hour: one benchmark that fails does not throw the
            # others' figures away. It keeps its previous ones, and the run fails at the end.
            traceback.print_exc()
            failed.append(name)
    if (failed or command != "make bench") and DOC.exists():
        # The benchmarks not run keep their figures, saying from which run they are.
        kept, origin = kept_from(DOC.read_text(), {number for number, _ in numbered})
        numbered += [(number, (section, rows)) for number, (section, rows) in kept.items()]
        if kept:
            info["kept"] = kept_words(origin)
    sections = [section for _, section in sorted(numbered, key=lambda pair: pair[0])]
    common.redis_flush()
    notes: list[str] = []
    if DOC.exists() and NOTES in DOC.read_text():
        notes = [NOTES + DOC.read_text().split(NOTES, 1)[1]]  # people's reading of the figures stays
    DOC.write_text(render(sections, info, command, notes))
    print(f"wrote {DOC}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (the document keeps their previous figures)")


if __name__ == "__main__":
    main(sys.argv[1:])
