"""`make bench`: run the benchmarks, each beside its baseline, and rewrite docs/benchmarks.md.

    python -m bench.run            # every benchmark
    python -m bench.run sync       # only some (sync, progress); the document then holds only those

Uses the database toolexec_bench (dropped and created afresh) and Redis index 13 (flushed).
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

from . import common

BENCHMARKS = ("sync", "progress")
DOC = common.ROOT / "docs" / "benchmarks.md"
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

    call_command("migrate", verbosity=0)  # post_migrate syncs the catalog, bench tools included
    with connection.cursor() as cursor:
        cursor.execute(TABLES_SQL)


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _verdict(ok: bool) -> str:
    return "**pass**" if ok else "**MISS**"


def sync_section(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    from .sync_execute import CONNECTIONS, TARGET

    lines = [
        "## 1. Sync execute overhead",
        "",
        "`POST /api/v1/instances/{id}/execute-sync` of a no-op tool (`bench-noop`) with a token, "
        "through gunicorn (2 sync workers, 127.0.0.1), against `bench/baseline`: a plain Django view "
        "(same settings and middleware, no DRF, no authentication) doing an INSERT (autocommit), then "
        "an UPDATE of that row and a counter UPDATE in one transaction. "
        f"wrk with a JSON body, {result['round_seconds']} s per round, one warm-up round per arm, then "
        f"{common.ROUNDS} rounds alternating the order (A B, B A, …). Latency figures are the median "
        "and the p99 *over rounds* of each round's own p50 / p99 from wrk; throughput likewise.",
        "",
        "| connections | arm | p50 ms (median) | p50 ms (p99 of rounds) | p99 ms (median) | req/s (median) "
        "| req/s (p99 of rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for connections in CONNECTIONS:
        arms = result["arms"][connections]
        for arm in ("product", "baseline"):
            lines.append(
                f"| {connections} | {arm} | {_ms(arms.median(arm, 'p50_ms'))} | {_ms(arms.p99(arm, 'p50_ms'))} | "
                f"{_ms(arms.median(arm, 'p99_ms'))} | {arms.median(arm, 'rps'):.0f} | {arms.p99(arm, 'rps'):.0f} |"
            )
        p50_ratio = arms.median("product", "p50_ms") / arms.median("baseline", "p50_ms")
        rps_ratio = arms.median("product", "rps") / arms.median("baseline", "rps")
        verdicts.append(
            f"| 1. sync, {connections} conn | p50 product / baseline | {p50_ratio:.2f}× | "
            f"≤ {TARGET['p50_ratio_max']}× | {_verdict(p50_ratio <= TARGET['p50_ratio_max'])} |"
        )
        verdicts.append(
            f"| 1. sync, {connections} conn | throughput product / baseline | {rps_ratio:.0%} | "
            f"≥ {TARGET['rps_ratio_min']:.0%} | {_verdict(rps_ratio >= TARGET['rps_ratio_min'])} |"
        )
    st, xa = result["statements"], result["xacts"]
    write_xacts = st["product"]["write_xacts"]
    verdicts.append(
        f"| 1. sync | write transactions per request | {write_xacts:g} | ≤ {TARGET['write_xacts_max']} | "
        f"{_verdict(write_xacts <= TARGET['write_xacts_max'])} |"
    )
    lines += [
        "",
        "Per request, by arm:",
        "",
        "| arm | SQL statements | reads | writes | write transactions | xact_commit (pg_stat_database) "
        "| xact_rollback |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("product", "baseline"):
        lines.append(
            f"| {arm} | {st[arm]['statements']:g} | {st[arm]['reads']:g} | {st[arm]['writes']:g} | "
            f"{st[arm]['write_xacts']:g} | "
            f"{xa[arm]['xact_commit']:.2f} | {xa[arm]['xact_rollback']:.2f} |"
        )
    lines += [
        "",
        "*Write transactions* are attributed exactly, in-process (Django's test client, same settings, "
        "20 requests after a warm-up): a write statement outside an atomic block is a transaction of its "
        "own, an atomic block that wrote counts once at its commit. *xact_commit* is PostgreSQL's own count "
        f"over a 1-connection wrk run of each arm ({xa['product']['requests']:.0f} and "
        f"{xa['baseline']['requests']:.0f} requests) in a gunicorn started and stopped for it (so its backends "
        "flushed their counters); in autocommit every read outside a transaction is a committed transaction "
        "too, so it is reads + write transactions (plus connection set-up, amortised by persistent connections).",
        "",
    ]
    return lines, verdicts


def hot_fractions(arms: Any) -> tuple[float, float]:
    """HOT fraction of all the *progress* runs' Job updates, and of those beyond what the
    *never* runs wrote (the progress writes), summed over rounds."""
    upd, hot = sum(arms.values("progress", "job_updates")), sum(arms.values("progress", "job_hot_updates"))
    base_upd, base_hot = sum(arms.values("never", "job_updates")), sum(arms.values("never", "job_hot_updates"))
    extra_upd, extra_hot = upd - base_upd, hot - base_hot
    return (hot / upd if upd else 0.0), (extra_hot / extra_upd if extra_upd > 0 else 1.0)


def progress_section(results: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    from .progress_cost import TARGET

    first = results[0]
    lines = [
        "## 5. Progress cost",
        "",
        f"In-process: a job of the `bench-progress` tool looping N = {first['n']:,} times, calling "
        "`ctx.progress(i * 100 / N)` on each turn (arm *progress*) or not at all (arm *never*), "
        "accepted with `execution_enqueue` and run with `executions.services.job_run` as a worker would "
        "(Redis publishes and cancel probes included). One warm-up per arm, then "
        f"{common.ROUNDS} alternating rounds. Job-row writes are `n_tup_upd` of `executions_job` in "
        "`pg_stat_user_tables` over `job_run` (claim, progress flushes, outcome, attempt log), and the "
        "heap-only fraction is `n_tup_hot_upd / n_tup_upd` over the same span.",
        "",
        "| Job table | arm | job_run s (median) | (p99 of rounds) | tool loop s (median) "
        "| Job row updates (median) | HOT updates (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for result in results:
        arms = result["arms"]
        table = f"fillfactor {result['fillfactor']}" if result["fillfactor"] else "as migrated"
        for arm in ("progress", "never"):
            lines.append(
                f"| {table} | {arm} | {arms.median(arm, 'job_seconds'):.3f} | {arms.p99(arm, 'job_seconds'):.3f} | "
                f"{arms.median(arm, 'loop_seconds'):.3f} | {arms.median(arm, 'job_updates'):.0f} | "
                f"{arms.median(arm, 'job_hot_updates'):.0f} |"
            )
        added_ms = (arms.median("progress", "job_seconds") - arms.median("never", "job_seconds")) / result["n"] * 1000
        duration = arms.median("progress", "job_seconds")
        writes = arms.median("progress", "job_updates")
        extra = writes - arms.median("never", "job_updates")
        hot_all, hot_progress = hot_fractions(arms)
        lines += [
            "",
            f"{table}: added time {added_ms * 1000:.2f} µs per call. The *progress* job's run took {duration:.2f} s "
            f"and updated its Job row {writes:.0f} times, {extra:.0f} of them for progress (the rest — claim, "
            "outcome, attempt log — the job that never reports writes too). Heap-only updates: "
            f"{hot_progress:.3f} of the progress writes, {hot_all:.3f} of all the Job updates of the run (the claim "
            "and the outcome change `status`, which partial and composite indexes cover, so they cannot be HOT).",
            "",
        ]
        verdicts += [
            f"| 5. progress ({table}) | added time per call | {added_ms:.4f} ms "
            f"| ≤ {TARGET['added_ms_per_call_max']} ms | "
            f"{_verdict(added_ms <= TARGET['added_ms_per_call_max'])} |",
            f"| 5. progress ({table}) | Job row writes for progress | {extra:.0f} "
            f"| ≤ duration + 2 = {duration + 2:.1f} | "
            f"{_verdict(extra <= duration + 2)} |",
            f"| 5. progress ({table}) | Job row writes, whole run | {writes:.0f} "
            f"| ≤ duration + 2 = {duration + 2:.1f} | "
            f"{_verdict(writes <= duration + 2)} |",
            f"| 5. progress ({table}) | HOT fraction, progress writes | {hot_progress:.3f} "
            f"| ≥ {TARGET['hot_fraction_min']} | {_verdict(hot_progress >= TARGET['hot_fraction_min'])} |",
            f"| 5. progress ({table}) | HOT fraction, whole run | {hot_all:.3f} | ≥ {TARGET['hot_fraction_min']} | "
            f"{_verdict(hot_all >= TARGET['hot_fraction_min'])} |",
        ]
    return lines, verdicts


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
        f"- machine: nproc {info['nproc']} ({info['cpu']}); load generator, gunicorn, PostgreSQL and Redis "
        "share these cores",
        f"- versions: Python {info['python']}, Django {info['django']}, PostgreSQL {info['postgresql']}, "
        f"Redis {info['redis']}, psycopg2 {info['psycopg2']}, gunicorn {info['gunicorn']}, {info['wrk']}",
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
    return "\n".join([*head, "", *body, *notes]).rstrip() + "\n"


def main(argv: list[str]) -> None:
    chosen = [name for name in argv if name in BENCHMARKS] or list(BENCHMARKS)
    command = "make bench" if chosen == list(BENCHMARKS) else f"python -m bench.run {' '.join(chosen)}"
    prepare()
    info = common.machine()
    sections = []
    notes: list[str] = []
    if "sync" in chosen:
        from . import sync_execute

        print("benchmark 1: sync execute overhead …", flush=True)
        sections.append(sync_section(sync_execute.run()))
    if "progress" in chosen:
        from . import progress_cost

        print("benchmark 5: progress cost …", flush=True)
        results = [progress_cost.run()]
        if hot_fractions(results[0]["arms"])[1] < progress_cost.TARGET["hot_fraction_min"]:
            print("benchmark 5 again with the Job table at fillfactor 80 …", flush=True)
            results.append(progress_cost.run(fillfactor=80))
        sections.append(progress_section(results))
    common.redis_flush()
    if DOC.exists() and NOTES in DOC.read_text():
        notes = [NOTES + DOC.read_text().split(NOTES, 1)[1]]  # people's reading of the figures stays
    DOC.write_text(render(sections, info, command, notes))
    print(f"wrote {DOC.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
