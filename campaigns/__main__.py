"""``python -m campaigns create|list|show|retention|prune|export|eval-set|samples|compare``: long training runs
of one hero.

``create NAME --hero ID [--set KEY=VALUE ...] [--keep-full N] [--keep-weights N|all] [--eval-file FILE ...]``,
``list``, ``show NAME [--json] [--plot]`` (the record, eval set, disk figures and retention policy),
``retention NAME [--keep-full N] [--keep-weights N|all]`` (show or change the checkpoint policy),
``prune NAME [--dry-run] [--json]``, ``export NAME OUT [--merged] [--checkpoint PATH] [--json]`` (a plain Hugging
Face model directory), ``eval-set NAME [FILE | --clear]`` (show, set or remove the campaign's eval set),
``samples NAME [--prompt K] [--all] [--json]`` (the probes' answers over the campaign's steps),
``compare A B`` (two models on one eval set; ``NAME``, ``NAME@STEP``, ``NAME@base`` or ``NAME@PATH``; the one
command that loads torch).
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
    create.add_argument("--eval-file", metavar="FILE",
                        help="the campaign's eval set: every job is evaluated on it (see eval-set)")
    _eval_options(create)
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
    evals = sub.add_parser("eval-set", help="show, set or remove the campaign's eval set (from the next job on)")
    evals.add_argument("name")
    evals.add_argument("file", nargs="?", help="the new eval set (any dataset format); none: show the history")
    evals.add_argument("--clear", action="store_true", help="remove the eval set (jobs evaluate on their own split)")
    evals.add_argument("--json", action="store_true")
    _eval_options(evals)
    samples = sub.add_parser("samples", help="how the probes' answers changed over the campaign's steps")
    samples.add_argument("name")
    samples.add_argument("--prompt", type=int, metavar="K", help="only probe K (0-based, as listed)")
    samples.add_argument("--all", action="store_true",
                         help="also evaluations of jobs that did not complete (their steps are not the campaign's)")
    samples.add_argument("--json", action="store_true")
    compare = sub.add_parser("compare", help="evaluate two models on one eval set, side by side (loads torch)")
    compare.add_argument("a", help="NAME (latest checkpoint), NAME@STEP, NAME@base or NAME@PATH")
    compare.add_argument("b", help="the same forms")
    compare.add_argument("--eval-file", metavar="FILE", help="evaluate on this file (default: A's eval set)")
    compare.add_argument("--probes", metavar="FILE", help="answer these prompts (default: the eval set's probes)")
    compare.add_argument("--num-probes", type=int, metavar="N")
    compare.add_argument("--max-new-tokens", type=int, metavar="N")
    compare.add_argument("--max-length", type=int, metavar="N", help="cut examples here (default: the eval set's)")
    compare.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when there is one)")
    compare.add_argument("--json", action="store_true")
    return p


def _eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probes", metavar="FILE",
                        help="probe prompts answered at every evaluation (messages or prompt/response lines; "
                             "default: the eval file's first conversations)")
    parser.add_argument("--num-probes", type=int, metavar="N",
                        help="how many probes (default 4 from the eval file, every line of --probes; at most 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="the most tokens of each answer (default 64)")
    parser.add_argument("--probe-seed", type=int, default=None, metavar="N", help="seeds generation (default 0)")
    parser.add_argument("--eval-max-length", type=int, metavar="N",
                        help="cut eval examples here, for every job (default: the campaign's max_length)")


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
        if args.command == "eval-set":
            return _eval_set(settings, store, args)
        if args.command == "samples":
            return _samples(settings, store, args)
        if args.command == "compare":
            return _compare(settings, args)
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
    if args.eval_file is not None:
        from jobs.eval_sets import create_with_eval_set

        campaign = create_with_eval_set(settings, hero, args.name, overrides, _eval_request(args, args.eval_file))
    else:
        _no_eval_options(args, "--eval-file FILE")
        campaign = create_campaign(settings.guild_home, hero, args.name, overrides)
    if changes:
        set_policy(store, campaign.id, **changes)
    print(f"created campaign {campaign.id} (hero {campaign.hero_id}, {campaign.config_hash})")
    if args.eval_file is not None:
        from campaigns.eval_set import current_change

        _print_change(current_change(campaign))
    return 0


def _eval_request(args, path: str):
    from jobs.eval_sets import EvalSetRequest

    options = {"max_new_tokens": args.max_new_tokens, "seed": args.probe_seed}
    return EvalSetRequest(path=path, probes_path=args.probes, num_probes=args.num_probes,
                          max_length=args.eval_max_length, **{k: v for k, v in options.items() if v is not None})


def _no_eval_options(args, needs: str) -> None:
    given = [flag for flag, value in (("--probes", args.probes), ("--num-probes", args.num_probes),
                                      ("--max-new-tokens", args.max_new_tokens), ("--probe-seed", args.probe_seed),
                                      ("--eval-max-length", args.eval_max_length)) if value is not None]
    if given:
        from campaigns.errors import EvalSetRejected

        raise EvalSetRejected(f"{', '.join(given)}: only with {needs}; nothing changed")


def _eval_set(settings, store, args) -> int:
    from campaigns.eval_set import eval_history

    if args.file is None and not args.clear:
        _no_eval_options(args, "a FILE to set")
        history = eval_history(store.get(args.name))
        if args.json:
            print(json.dumps([c.to_record() for c in history], indent=2))
        elif not history:
            print(f"campaign {args.name} has no eval set; set one with python -m campaigns eval-set {args.name} FILE")
        for change in history:
            _print_change(change)
        return 0
    if args.file is not None and args.clear:
        from campaigns.errors import EvalSetRejected

        raise EvalSetRejected("give FILE or --clear, not both; nothing changed")
    if args.clear:
        _no_eval_options(args, "a FILE to set")
    from jobs.eval_sets import set_eval_set

    change = set_eval_set(settings, _job_store(settings), args.name,
                          None if args.clear else _eval_request(args, args.file))
    if args.json:
        print(json.dumps(change.to_record(), indent=2))
        return 0
    _print_change(change)
    print("applies to every job that starts from now on; a running job keeps the set it started with")
    return 0


def _print_change(change) -> None:
    eval_set = change.eval_set
    if eval_set is None:
        print(f"from step {change.from_step} ({change.at}): no eval set")
        return
    about = "" if eval_set.tokens_counted else "about "
    probes = (f"{eval_set.num_probes} probes ({eval_set.probes_source}), {eval_set.max_new_tokens} new tokens each"
              if eval_set.num_probes else "no probes")
    print(f"from step {change.from_step} ({change.at}): eval set {eval_set.short} {eval_set.source}: "
          f"{eval_set.num_examples} {eval_set.format} examples, {about}{eval_set.num_tokens:,} tokens at max_length "
          f"{eval_set.max_length}; {probes}")


def _samples(settings, store, args) -> int:
    from campaigns.eval_view import collect_samples, format_samples
    from campaigns.evaluations import read_log

    campaign = store.get(args.name)
    entries = read_log(store.directory(campaign.hero_id, campaign.id))
    note = ""
    if not args.all:
        try:
            states = {j.id: j.status.value for j in _job_store(settings).get_many(sorted({e.job_id for e in entries}))}
            entries = [e for e in entries if states.get(e.job_id) in ("completed", "processing")]
        except Exception:  # noqa: BLE001 - Redis down: show everything, and say so
            note = "job states unknown (Redis unreachable): evaluations of every job are shown"
    view = collect_samples(campaign, entries, args.prompt)
    if args.json:
        print(json.dumps(view, indent=2, ensure_ascii=False))
    else:
        print(format_samples(campaign.id, view))
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _compare(settings, args) -> int:
    from campaigns.compare import compare
    from campaigns.eval_view import format_comparison

    result = compare(settings.guild_home, args.a, args.b, device=args.device, eval_file=args.eval_file,
                     probes_file=args.probes, num_probes=args.num_probes, max_new_tokens=args.max_new_tokens,
                     max_length=args.max_length, limits=settings.dataset_limits)
    print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) if args.json else format_comparison(result))
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
    history = record.pop("eval_sets")
    print_record(record)
    if running:
        print(f"{'running:':20} {_running_text(running)}")

    _print_eval(campaign, history)
    _print_disk(usage, campaign.id, note)
    return 0


def _print_eval(campaign, history) -> None:
    from campaigns.eval_set import current_change

    change = current_change(campaign)
    if change is None:
        print(f"{'eval set:':20} none (python -m campaigns eval-set {campaign.id} FILE)")
        return
    print(f"{'eval set:':20} " + ("none since step " + str(change.from_step) if change.eval_set is None else
                                  f"{change.eval_set.short} {change.eval_set.source} (from step {change.from_step}; "
                                  f"{len(history)} change{'s' if len(history) != 1 else ''}: python -m campaigns "
                                  f"eval-set {campaign.id})"))


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
                "val_history": j.metadata.get("val_history") or [],
                "eval_history": j.metadata.get("eval_history") or []} for j in jobs if j.status.value == "completed"]
    path = store.directory(campaign.hero_id, campaign.id) / "plots" / "campaign.png"
    return write_campaign_plot(path, records)


if __name__ == "__main__":
    sys.exit(main())
