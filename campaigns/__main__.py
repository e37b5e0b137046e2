"""``python -m campaigns create|list|show|retention|prune|export``: long training runs of one hero.

``create NAME --hero ID [--set KEY=VALUE ...] [--keep-full N] [--keep-weights N|all]``, ``list``,
``show NAME [--json] [--plot]`` (the record, disk figures and retention policy), ``retention NAME [--keep-full N]
[--keep-weights N|all]`` (show or change the checkpoint policy), ``prune NAME [--dry-run] [--json]``,
``export NAME OUT [--merged] [--checkpoint PATH] [--json]`` (a plain Hugging Face model directory).
"""

from __future__ import annotations

import argparse
import json
import sys

from config.cli import print_record, report_error
from config.errors import GuildError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m campaigns", description="Long training runs of one hero.")
    sub = p.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create")
    create.add_argument("name")
    create.add_argument("--hero", dest="hero_id", required=True)
    create.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    _keep_options(create)
    ls = sub.add_parser("list")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="the record, disk figures and retention policy")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.add_argument("--plot", action="store_true", help="write the campaign's cumulative loss curve (PNG)")
    keep = sub.add_parser("retention", help="show or change which checkpoints the campaign keeps")
    keep.add_argument("name")
    _keep_options(keep)
    prune = sub.add_parser("prune", help="apply the retention policy now and say what it freed")
    prune.add_argument("name")
    prune.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    prune.add_argument("--json", action="store_true")
    export = sub.add_parser("export", help="write a plain Hugging Face model directory (campaigns/export.py)")
    export.add_argument("name")
    export.add_argument("out", help="a new (or empty) directory")
    export.add_argument("--merged", action="store_true", help="LoRA/QLoRA: merge the adapter into the base")
    export.add_argument("--checkpoint", help="a checkpoint directory (default: the campaign's latest)")
    export.add_argument("--json", action="store_true")
    return p


def _keep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-full", metavar="N",
                        help="the newest N completed jobs keep their full checkpoint (with optimizer state; default 1)")
    parser.add_argument("--keep-weights", metavar="N|all",
                        help="the newest N completed jobs keep their final weights (default 3)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from campaigns.campaign import CampaignStore
        from config.settings import get_settings

        settings = get_settings()
        store = CampaignStore(settings.guild_home)
        if args.command == "create":
            return _create(settings, store, args)
        if args.command == "export":
            return _export(settings, args)
        if args.command == "list":
            campaigns = store.list()
            running = _running_jobs(settings)
            if args.json:
                print(json.dumps([{**c.to_dict(), "running": running.get(c.id)} for c in campaigns], indent=2))
            else:
                for c in campaigns:
                    now = running.get(c.id)
                    print(f"{c.id:24} {c.hero_id:16} step {c.current_step:<8} jobs {len(c.job_ids):<5} {c.status}"
                          + (f"  {_running_text(now)}" if now else ""))
            return 0
        if args.command == "retention":
            return _retention(store, args)
        if args.command == "prune":
            return _prune(settings, store, args)
        return _show(settings, store, args)
    except GuildError as exc:
        return report_error(exc)
    except Exception as exc:  # noqa: BLE001 - Redis down or refusing the password: one line, never a traceback
        from jobs.errors_text import describe_unexpected

        print(f"error: {describe_unexpected(exc)}", file=sys.stderr)
        return 1


def _create(settings, store, args) -> int:
    from campaigns.campaign import create_campaign
    from config.layers import Layer, canonical_key, parse_set_args, resolve
    from heroes.profile import load_hero
    from jobs.retention import RetentionPolicy, set_policy

    changes = _keep_changes(args)
    RetentionPolicy.from_record(changes, "--keep-full/--keep-weights")  # refused before anything is created
    hero = load_hero(args.hero_id, settings.guild_home)
    sets = parse_set_args(args.sets)
    typed = resolve([Layer("campaign", sets, "--set", from_text=True)]).flat()
    overrides = {canonical_key(k): typed[canonical_key(k)] for k in sets}
    campaign = create_campaign(settings.guild_home, hero, args.name, overrides)
    if changes:
        set_policy(store, campaign.id, **changes)
    print(f"created campaign {campaign.id} (hero {campaign.hero_id}, {campaign.config_hash})")
    return 0


def _keep_changes(args) -> dict:
    from jobs.retention import parse_keep

    changes = {}
    if args.keep_full is not None:
        changes["keep_full"] = parse_keep(args.keep_full, "--keep-full")
    if args.keep_weights is not None:
        changes["keep_weights"] = parse_keep(args.keep_weights, "--keep-weights")
    return changes


def _retention(store, args) -> int:
    from jobs.retention import policy_of, set_policy

    changes = _keep_changes(args)
    policy = set_policy(store, args.name, **changes) if changes else policy_of(store.get(args.name))
    print(f"{args.name}: keep_full={policy.keep_full} keep_weights={policy.to_record()['keep_weights']} — "
          f"{policy.describe()}" + ("; applies from the next prune (python -m campaigns prune "
                                    f"{args.name})" if changes else ""))
    return 0


def _prune(settings, store, args) -> int:
    from campaigns.disk import format_bytes
    from jobs.retention import apply_retention

    report = apply_retention(store, args.name, _job_store(settings), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        root = store.checkpoint_root(store.get(args.name))
        print(f"campaign {report.campaign}: {report.policy.describe()}")
        for d in report.decisions:
            print(f"{d.verdict.value:7} {str(d.path.relative_to(root)):44} {format_bytes(d.size_bytes):>9}  {d.reason}")
        if report.trash_bytes:
            print(f"{'remove':7} {'leftovers of interrupted deletes':44} {format_bytes(report.trash_bytes):>9}")
        if args.dry_run:
            print(f"would free {format_bytes(report.freed_bytes)} (dry run: nothing deleted)")
        else:
            print(f"freed {format_bytes(report.freed_bytes)}")
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if report.errors else 0


def _show(settings, store, args) -> int:
    from jobs.retention import disk_usage, policy_of

    campaign = store.get(args.name)
    if args.plot:
        print(f"loss plot: {_write_plot(settings, store, campaign)}")
    jobs, note = _job_store(settings), ""
    try:
        jobs.ping()
    except Exception:  # noqa: BLE001 - the figures still make sense without job states
        jobs, note = None, "job states unknown (Redis unreachable): retry and running checkpoints count as full"
    usage = disk_usage(store, campaign, jobs)
    policy = policy_of(campaign)
    running = _running_jobs(settings).get(campaign.id) if jobs is not None else None
    if args.json:
        print(json.dumps({**campaign.to_dict(), "running": running, "retention": policy.to_record(),
                          "disk": usage.to_dict()}, indent=2))
        return 0
    record = campaign.to_dict()
    record["retention"] = policy.to_record()
    print_record(record)
    if running:
        print(f"{'running:':20} {_running_text(running)}")
    _print_disk(usage, campaign.id, note)
    return 0


def _print_disk(usage, name: str, note: str) -> None:
    from campaigns.disk import format_bytes

    print(f"{'disk:':20} checkpoints under {usage.path}")
    rows = [("full", usage.full_bytes, "resumable: weights, optimizer and RNG state"),
            ("weights-only", usage.weights_only_bytes, "final weights of recent jobs"),
            ("kept-for-retry", usage.retry_bytes, "newest checkpoint of queued, failed and cancelled jobs"),
            ("running", usage.running_bytes, "being written by a running job"),
            ("other", usage.other_bytes, "incomplete saves, unknown directories, trash"),
            ("total", usage.total_bytes, ""),
            ("reclaimable", usage.reclaimable_bytes, f"python -m campaigns prune {name}")]
    for label, value, what in rows:
        shown = "unknown" if value is None else format_bytes(value)
        print(f"  {label:18} {shown:>9}" + (f"  ({what})" if what else ""))
    print(f"  {'free':18} {format_bytes(usage.free_bytes):>9}  (of {format_bytes(usage.filesystem_bytes)} on that "
          "file system)")
    if note:
        print(f"  note: {note}")


def _export(settings, args) -> int:
    from campaigns.export import export_campaign

    result = export_campaign(settings.guild_home, args.name, args.out, merged=args.merged, checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"exported campaign {result.campaign} step {result.step} ({result.kind}) to {result.path}")
    if result.kind == "adapter":
        print(f"load it on its base: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
              f"{result.base_model!r}), {result.path!r}), or export again with --merged")
    else:
        print(f"load it: AutoModelForCausalLM.from_pretrained({result.path!r})")
    return 0


def _running_jobs(settings) -> dict[str, dict]:
    """The running job of each campaign (one at most: the campaign lock), with its live step; {} without Redis.

    ``step`` is the campaign's global step the job has reached (its live progress); ``current_step`` in
    ``campaign.json`` moves only when a job completes.
    """
    try:
        store = _job_store(settings)
        running = store.list(status="processing")
        runtimes = store.runtimes([j.id for j in running])
    except Exception:  # noqa: BLE001 - the campaign records still make sense without it
        return {}
    found = {}
    for job in running:
        progress = job.progress or {}
        found[job.campaign_id] = {"job": job.id, "worker": runtimes[job.id].worker, "start_step": job.start_step,
                                  "step": progress.get("step"), "total_steps": progress.get("total_steps")}
    return found


def _running_text(running: dict) -> str:
    """``running 2026…_a on gpu0@h: step 140/200 (this job 20 of 80)``; before its first step, ``starting``."""
    where = f"running {running['job']} on {running['worker'] or '?'}"
    if running["step"] is None:
        return f"{where}: starting"
    start = running["start_step"] or 0
    return (f"{where}: step {running['step']}/{running['total_steps']} (this job {running['step'] - start} of "
            f"{(running['total_steps'] or 0) - start})")


def _job_store(settings):
    from jobs.store import JobStore

    return JobStore.connect(settings.redis_url, settings.guild_home)


def _write_plot(settings, store, campaign):
    from jobs.plots import write_campaign_plot

    jobs = _job_store(settings).get_many(campaign.job_ids)
    records = [{"id": j.id, "loss_history": j.metadata.get("loss_history") or [],
                "val_history": j.metadata.get("val_history") or []} for j in jobs if j.status.value == "completed"]
    path = store.directory(campaign.hero_id, campaign.id) / "plots" / "campaign.png"
    return write_campaign_plot(path, records)


if __name__ == "__main__":
    sys.exit(main())
