"""``python -m jobs list|show|watch|cancel|retry``: look at and steer jobs."""

from __future__ import annotations

import argparse
import json
import sys

from config.cli import report_error
from config.errors import GuildError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs", description="Look at and steer Guild jobs.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list jobs, oldest first")
    ls.add_argument("--status", choices=["queued", "processing", "completed", "failed", "skipped", "cancelled"])
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one job's record and its plan (what it trains)")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--history", action="store_true", help="also print every transition")
    watch = sub.add_parser("watch", help="a live progress bar until the job ends")
    watch.add_argument("id")
    watch.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    plan = sub.add_parser("plan", help="the queue in the order workers will take it, with ETAs from the live workers, "
                                       "running jobs, campaign order and measured speeds")
    plan.add_argument("--json", action="store_true")
    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("id")
    pause = sub.add_parser("pause", help="stop consuming; running jobs checkpoint and go back to their queue")
    pause.add_argument("--worker", help="one worker (e.g. gpu0@host); default: all")
    resume = sub.add_parser("resume", help="consume again")
    resume.add_argument("--worker", help="one worker; default: all")
    retry = sub.add_parser("retry", help="queue a failed or cancelled job again (resumes from its checkpoint)")
    retry.add_argument("id")
    dead = sub.add_parser("dead-letters", help="messages no worker could run, moved aside (newest first)")
    dead.add_argument("--json", action="store_true")
    dead.add_argument("--limit", type=int, default=50, help="show at most this many (default 50)")
    dead.add_argument("--clear", action="store_true", help="forget them all (after looking at them)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from config.settings import get_settings
        from jobs.store import JobStore

        settings = get_settings()
        store = JobStore.connect(settings.redis_url, settings.guild_home)
        return _run(args, store)
    except GuildError as exc:
        return report_error(exc)
    except Exception as exc:  # noqa: BLE001
        from jobs.errors_text import describe_unexpected

        print(f"error: {describe_unexpected(exc)}", file=sys.stderr)
        return 1


def _run(args, store) -> int:
    from jobs.cli_format import job_table, job_view

    if args.command == "list":
        jobs = store.list(status=args.status)
        waits = store.waits([j.id for j in jobs if j.status.value == "queued"])
        if args.json:
            print(json.dumps([{**j.to_dict(), "waiting": waits[j.id].to_dict() if j.id in waits else None}
                              for j in jobs], indent=2))
        else:
            print(job_table(jobs, waits))
        return 0
    if args.command == "show":
        job = store.get(args.id)
        wait = store.runtime(job.id).waiting
        if args.json:
            data = {**job.to_dict(), "waiting": wait.to_dict() if wait else None}
            if args.history:
                data["history"] = store.history(job.id)
            print(json.dumps(data, indent=2))
        else:
            print(job_view(job, plan=True, wait=wait))
            if args.history:
                for h in store.history(job.id):
                    print(f"  {h['at']}  {h.get('from') or '-'} → {h['to']}  {h.get('reason', '')}")
        return 0
    if args.command == "watch":
        from jobs.watch_cli import watch_jobs

        store.get(args.id)
        return watch_jobs(store, [args.id], timeout_s=args.timeout)
    if args.command == "plan":
        from config.settings import get_settings
        from jobs.cli_format import plan_text
        from jobs.queue_plan import build_plan

        plan = build_plan(store, get_settings())
        print(json.dumps(plan, indent=2) if args.json else plan_text(plan))
        return 0
    if args.command in ("pause", "resume"):
        from jobs.control import pause_workers, resume_workers
        from tasks.app import app

        who = args.worker or "all workers"
        if args.command == "pause":
            stopped = pause_workers(app.control, store, args.worker)
            print(f"paused {who}" + (f"; checkpointing and requeuing {', '.join(stopped)}" if stopped else ""))
        else:
            resume_workers(app.control, store, args.worker)
            print(f"resumed {who}")
        return 0
    if args.command in ("cancel", "retry"):
        from jobs.control import cancel_job, retry_job

        if args.command == "cancel":
            print(cancel_job(store, args.id))
        else:
            from tasks.app import app
            from tasks.publish import CeleryPublisher

            print(retry_job(store, args.id, CeleryPublisher(app, store)))
        return 0
    if args.command == "dead-letters":
        return _dead_letters(store, args)
    raise AssertionError(args.command)  # pragma: no cover


def _dead_letters(store, args) -> int:
    if args.clear:
        print(f"cleared {store.clear_dead_letters()} dead letter(s)")
        return 0
    letters = store.dead_letters(args.limit)
    if args.json:
        import dataclasses

        print(json.dumps([dataclasses.asdict(d) for d in letters], indent=2))
        return 0
    from tasks.poison import describe_body

    total = store.dead_letter_count()
    print(f"{total} dead letter(s): messages no worker could run, kept with their raw body" + (
        f" (newest {len(letters)} shown)" if total > len(letters) else ""))
    for d in letters:
        headers = d.headers or {}
        who = ", ".join(f"{k}={headers[k]!r}" for k in ("task", "id") if k in headers) or "no task headers"
        print(f"{d.at}  queue {d.queue or '?'}  {who}\n  error: {d.error}\n"
              f"  body ({d.body_bytes} bytes): {describe_body(d.raw_body())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
