"""``python -m campaigns create NAME --hero ID [--set KEY=VALUE ...]`` / ``list`` / ``show NAME [--json]`` /
``export NAME OUT [--merged] [--checkpoint PATH] [--json]``."""

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
    export = sub.add_parser("export", help="write a plain Hugging Face model directory (campaigns/export.py)")
    export.add_argument("name")
    export.add_argument("out", help="a new (or empty) directory")
    export.add_argument("--merged", action="store_true", help="LoRA/QLoRA: merge the adapter into the base")
    export.add_argument("--checkpoint", help="a checkpoint directory (default: the campaign's latest)")
    export.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        from campaigns.campaign import CampaignStore
        from config.settings import get_settings

        settings = get_settings()
        store = CampaignStore(settings.guild_home)
        if args.command == "create":
            from campaigns.campaign import create_campaign
            from config.layers import Layer, canonical_key, parse_set_args, resolve
            from heroes.profile import load_hero

            hero = load_hero(args.hero_id, settings.guild_home)
            sets = parse_set_args(args.sets)
            typed = resolve([Layer("campaign", sets, "--set", from_text=True)]).flat()
            overrides = {canonical_key(k): typed[canonical_key(k)] for k in sets}
            campaign = create_campaign(settings.guild_home, hero, args.name, overrides)
            print(f"created campaign {campaign.id} (hero {campaign.hero_id}, {campaign.config_hash})")
            return 0
        if args.command == "export":
            return _export(settings, args)
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


def _write_plot(settings, store, campaign):
    from jobs.plots import write_campaign_plot
    from jobs.store import JobStore

    jobs = JobStore.connect(settings.redis_url, settings.guild_home).get_many(campaign.job_ids)
    records = [{"id": j.id, "loss_history": j.metadata.get("loss_history") or [],
                "val_history": j.metadata.get("val_history") or []} for j in jobs if j.status.value == "completed"]
    path = store.directory(campaign.hero_id, campaign.id) / "plots" / "campaign.png"
    return write_campaign_plot(path, records)


if __name__ == "__main__":
    sys.exit(main())
