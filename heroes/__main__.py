"""``python -m heroes list`` / ``python -m heroes show ID [--json]``."""

from __future__ import annotations

import argparse
import json
import sys

from config.cli import print_record, report_error
from config.errors import GuildError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m heroes", description="Model profiles.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from config.settings import get_settings
    from heroes.profile import list_heroes, load_hero

    home = get_settings().guild_home
    try:
        if args.command == "list":
            heroes, errors = list_heroes(home)
            if args.json:
                print(json.dumps([h.to_dict(home) for h in heroes], indent=2))
            else:
                for h in heroes:
                    print(f"{h.id:20} {h.architecture:20} {h.hf_name:24} {h.name}")
            for e in errors:
                print(f"error: {e}", file=sys.stderr)
            return 2 if errors else 0
        hero = load_hero(args.id, home)
        data = hero.to_dict(home)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print_record(data)
        return 0
    except GuildError as exc:
        return report_error(exc)


if __name__ == "__main__":
    sys.exit(main())
