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
            from heroes.memory import GIB, hero_estimates

            heroes, errors = list_heroes(home)
            rows = []
            for h in heroes:
                try:
                    mode, estimates = hero_estimates(h)
                except GuildError as exc:
                    mode, estimates = "?", {}
                    errors.append(f"{h.source}: training_defaults: {exc}")
                rows.append((h, mode, {m: round(e.total / GIB, 1) for m, e in estimates.items()}))
            if args.json:
                print(json.dumps([{**h.to_dict(home), "finetune_mode": mode, "memory_gib": gib}
                                  for h, mode, gib in rows], indent=2))
            else:
                # GiB on one GPU at the hero's default batch and length, for each finetune mode (heroes/memory.py).
                print(f"{'ID':20} {'MODEL':20} {'DEFAULT':8} {'FULL':>8} {'LORA':>8} {'QLORA':>8}  NAME")
                for h, mode, gib in rows:
                    cells = "".join(f"{(str(gib[m]) + 'G') if m in gib else '-':>9}" for m in ("full", "lora", "qlora"))
                    print(f"{h.id:20} {h.hf_name:20} {mode:8}{cells}  {h.name}")
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
