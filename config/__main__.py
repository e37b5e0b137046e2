"""``python -m config explain [--hero ID] [--campaign NAME] [--set KEY=VALUE ...] [--json]``.

Prints every resolved field, its value and the layer that set it (defaults, hero, campaign, project, cli).
"""

from __future__ import annotations

import argparse
import json
import sys

from config.cli import report_error
from config.errors import GuildError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m config", description="Show how the trainer config resolves.")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="every field, its value and the layer that set it")
    ex.add_argument("--hero", dest="hero_id")
    ex.add_argument("--campaign")
    ex.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ex.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        from campaigns.campaign import CampaignStore
        from config.layers import parse_set_args, resolve_job_config
        from config.settings import get_settings
        from heroes.profile import DEFAULT_HERO, load_hero

        settings = get_settings()
        overrides = None
        hero_id = args.hero_id
        if args.campaign:
            campaign = CampaignStore(settings.guild_home).get(args.campaign)
            overrides = campaign.config_overrides
            hero_id = hero_id or campaign.hero_id
        hero = load_hero(hero_id or DEFAULT_HERO, settings.guild_home)
        resolved = resolve_job_config(settings.guild_home, hero, overrides, parse_set_args(args.sets))
    except GuildError as exc:
        return report_error(exc)
    table = resolved.explain()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    width = max(len(k) for k in table)
    for key, entry in table.items():
        print(f"{key.ljust(width)}  {json.dumps(entry['value']):>24}  {entry['source']}")
    print(f"\nconfig_hash: {resolved.config.config_hash()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
