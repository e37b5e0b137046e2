"""``python -m campaigns create NAME --hero ID [--set KEY=VALUE ...]`` / ``list`` / ``show NAME [--json]``."""

from __future__ import annotations

import argparse
import json
import sys

from config.cli import print_record, report_error
from config.errors import GuildError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m campaigns", description="Long training runs of one hero.")
    sub = p.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create")
    create.add_argument("name")
    create.add_argument("--hero", dest="hero_id", required=True)
    create.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ls = sub.add_parser("list")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.add_argument("--plot", action="store_true", help="write the campaign's cumulative loss curve (PNG)")
    args = p.parse_args(argv)
    try:
        from campaigns.campaign import CampaignStore
        from config.settings import get_settings

        settings = get_settings()
        store = CampaignStore(settings.guild_home)
        if args.command == "create":
            from config.layers import Layer, canonical_key, parse_set_args, resolve
            from heroes.profile import load_hero
            from jobs.submit import create_campaign

            hero = load_hero(args.hero_id, settings.guild_home)
            sets = parse_set_args(args.sets)
            typed = resolve([Layer("campaign", sets, "--set", from_text=True)]).config.flat()
            overrides = {canonical_key(k): typed[canonical_key(k)] for k in sets}
            campaign = create_campaign(settings, hero, args.name, overrides)
            print(f"created campaign {campaign.id} (hero {campaign.hero_id}, {campaign.config_hash})")
            return 0
        if args.command == "list":
            campaigns = store.list()
            if args.json:
                print(json.dumps([c.to_dict() for c in campaigns], indent=2))
            else:
                for c in campaigns:
                    print(f"{c.id:24} {c.hero_id:16} step {c.current_step:<8} jobs {len(c.job_ids):<5} {c.status}")
            return 0
        campaign = store.get(args.name)
        if args.plot:
            print(f"loss plot: {_write_plot(settings, store, campaign)}")
        if args.json:
            print(json.dumps(campaign.to_dict(), indent=2))
        else:
            print_record(campaign.to_dict())
        return 0
    except GuildError as exc:
        return report_error(exc)
    except Exception as exc:  # noqa: BLE001 - Redis down or refusing the password: one line, never a traceback
        from jobs.errors_text import describe_unexpected

        print(f"error: {describe_unexpected(exc)}", file=sys.stderr)
        return 1


def _write_plot(settings, store, campaign):
    import redis

    from jobs.plots import write_campaign_plot
    from jobs.store import JobStore

    jobs = JobStore(redis.Redis.from_url(settings.redis_url), settings.guild_home).get_many(campaign.job_ids)
    records = [{"id": j.id, "loss_history": j.metadata.get("loss_history") or [],
                "val_history": j.metadata.get("val_history") or []} for j in jobs if j.status.value == "completed"]
    path = store.directory(campaign.hero_id, campaign.id) / "plots" / "campaign.png"
    return write_campaign_plot(path, records)


if __name__ == "__main__":
    sys.exit(main())
