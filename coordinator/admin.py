"""``hivefold coordinator invite|ban|unban``: the operator's say over who takes part, from another terminal.

They write to the run's ledger (the workdir's, or ``--ledger``'s) beside a running coordinator, which
sees a ban within ``TOKEN_CACHE_S``; an invite works at once. The CLI builds its parser from this module
whatever the command, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from hivefold.errors import ConfigError

COMMANDS = {
    "invite": "print a new invite for an invite-only run (its token is the last line)",
    "ban": "ban a peer: it can no longer lease, submit or register; its leases go back to the pool",
    "unban": "lift a ban",
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d`` or ``2w`` as seconds."""
    m = _DURATION.match(text.lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, 12h or 7d, got {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Optional subcommands of ``hivefold coordinator``: without one, it runs a coordinator as before."""
    sub = p.add_subparsers(dest="coordinator_command", metavar="{invite,ban,unban}",
                           help="manage who may take part in the run in --workdir (default: none, run a coordinator)")
    for command, text in COMMANDS.items():
        c = sub.add_parser(command, help=text, description=f"{text[0].upper()}{text[1:]}.")
        if command != "invite":
            c.add_argument("peer_id", help="the peer's id (16 hex digits, as its log shows), or its first 8 or more, "
                                           "as `hivefold status` shows")
        c.add_argument("--workdir", type=Path, default=argparse.SUPPRESS, required=True,
                       help="the coordinator's --workdir")
        c.add_argument("--ledger", default=argparse.SUPPRESS, metavar="PATH|URL",
                       help="the coordinator's --ledger, if it has one (default: the workdir's ledger.sqlite)")
        if command == "invite":
            c.add_argument("--uses", type=int, default=1, help="peers it admits (default %(default)s)")
            c.add_argument("--expires", type=duration, default=7 * 86400, metavar="DURATION",
                           help="valid for this long: 30m, 12h, 7d... (default 7d)")
            c.add_argument("--note", default="", help="a note kept with it, e.g. who it is for (default: none)")
        elif command == "ban":
            c.add_argument("--reason", default="", help="shown to the peer and in the ledger's events (default: none)")


def run_command(args: argparse.Namespace) -> int:
    from coordinator.ledger import Ledger
    from coordinator.run import SPEC_FILE, ledger_location

    workdir = args.workdir.expanduser()
    ledger_arg = getattr(args, "ledger", "") or ""
    if not ledger_arg and not (workdir / SPEC_FILE).exists():
        raise ConfigError(f"{workdir} holds no run: give the coordinator's --workdir (and its --ledger, if any)")
    ledger = Ledger(ledger_location(workdir, ledger_arg))
    try:
        now = time.time()
        if args.coordinator_command == "invite":
            if args.uses < 1:
                raise ConfigError(f"--uses must be >= 1, got {args.uses}")
            token = ledger.create_invite(uses=args.uses, expires_at=now + args.expires, now=now, note=args.note[:200])
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(now + args.expires))
            print(f"invite for run {ledger.get_meta('run_id')}: {args.uses} use(s), valid until {until}")
            print("the volunteer starts their peer with --invite and this token (shown only once):")
            print(token)
        elif args.coordinator_command == "ban":
            peer_id = ledger.resolve_peer(args.peer_id)
            released = ledger.ban(peer_id, reason=args.reason[:200], now=now)
            print(f"peer {peer_id} banned; {released} active lease(s) went back to the pool")
        else:
            peer_id = ledger.resolve_peer(args.peer_id)
            ledger.unban(peer_id, now=now)
            print(f"peer {peer_id} unbanned; it may register again")
    finally:
        ledger.close()
    return 0
