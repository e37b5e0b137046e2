"""``python -m enqueue FILE [FILE ...] --priority {high,normal,low}``: submit datasets for training.

Every file is validated completely before anything is enqueued; a bad batch enqueues nothing and exits 2
with one ``FILE:LINE: what is wrong`` line per problem on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from config.errors import GuildError
from jobs.queues import PRIORITIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m enqueue", description="Submit chat datasets (.jsonl) for training.")
    p.add_argument("files", nargs="+", metavar="FILE", help="JSON Lines datasets (messages, prompt/response or text)")
    p.add_argument("--priority", choices=PRIORITIES, default="normal", help="queue to join (default: normal)")
    p.add_argument("--hero", dest="hero_id", help="hero id (default: the campaign's, else tiny-qwen3)")
    p.add_argument("--campaign", help="campaign name (default: main-<hero>; created when missing)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="per-job config override, e.g. --set learning_rate=1e-5 (repeatable)")
    p.add_argument("--force", action="store_true", help="enqueue content that is already queued or trained")
    p.add_argument("--preempt", action="store_true",
                   help="with --priority high: if every worker is busy with low jobs, one checkpoints and steps aside")
    p.add_argument("--plan", action="store_true", help="show where the files would land in the queue; enqueue nothing")
    p.add_argument("--wait", action="store_true", help="follow the job(s) to the end; exit 0 only if all completed")
    p.add_argument("--json", action="store_true", help="print the job records as a JSON list")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.preempt and args.priority != "high":
        print(f"error: --preempt makes a running low job step aside for a high one: add --priority high "
              f"(got --priority {args.priority}); nothing enqueued", file=sys.stderr)
        return 2
    try:
        from config.layers import parse_set_args
        from config.settings import get_settings
        from jobs.store import JobStore
        from jobs.submit import SubmitRequest, submit

        settings = get_settings()
        store = JobStore.connect(settings.redis_url, settings.guild_home)
        request = SubmitRequest(paths=args.files, priority=args.priority, hero_id=args.hero_id,
                                campaign=args.campaign, sets=parse_set_args(args.sets), force=args.force,
                                preempt=args.preempt)

        def publish(job_id: str, priority: str, at_head: bool = False) -> None:
            from tasks.app import app  # imported only when a message goes out: validation errors stay fast
            from tasks.publish import CeleryPublisher

            CeleryPublisher(app, store)(job_id, priority, at_head)

        if args.plan:
            from jobs.cli_format import plan_text
            from jobs.queue_plan import plan_submission

            plan = plan_submission(settings, store, request)
            print(json.dumps(plan, indent=2) if args.json else plan_text(plan) + "\n(nothing enqueued)")
            return 0
        jobs = submit(settings, store, request, publish)
    except GuildError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}" if not _names_a_file(line, args.files) else line, file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - Redis down and the like: one line, no traceback
        from jobs.errors_text import describe_unexpected

        print(f"error: {describe_unexpected(exc, nothing_enqueued=True)}", file=sys.stderr)
        return 1
    from jobs.submit import truncation_warning

    for path, job in zip(args.files, jobs):  # one job per file, in order; stderr keeps --json stdout clean
        warning = truncation_warning(path, job.workload)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if args.wait:
        from jobs.watch_cli import watch_jobs

        if not args.json:
            print("\n".join(j.id for j in jobs), flush=True)
        # With --json, stdout carries only the final records (one JSON list); progress goes to stderr.
        return watch_jobs(store, [j.id for j in jobs], as_json=args.json)
    if args.json:
        print(json.dumps([j.to_dict() for j in jobs], indent=2))
    else:
        for job in jobs:
            print(job.id)
    return 0


def _names_a_file(line: str, files: list[str]) -> bool:
    return any(line.startswith(f + ":") for f in files)


if __name__ == "__main__":
    sys.exit(main())
