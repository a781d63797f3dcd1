"""The status document as a table, for ``hivefold status`` and ``hivefold demo`` (rich only).

Light on purpose: ``hivefold status`` must answer in a fraction of a second, so nothing here may
import torch, hivemind or numpy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import IO

from rich.console import Console, Group
from rich.table import Column, Table
from rich.text import Text

# Width when stdout is not a terminal and $COLUMNS is unset: rich would assume 80 columns and wrap
# rows mid-line, which breaks ``| grep`` and ``| cut``. Tables only take the width their cells need.
PIPE_WIDTH = 1000


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def ago(seconds: float) -> str:
    """``42s ago``, ``5m ago``, ``3h ago``, ``2d ago``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def make_console(file: IO[str] | None = None) -> Console:
    """A console on ``file`` (stdout) that never wraps the table when the output is piped or redirected."""
    console = Console(file=file)
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console  # rich uses the terminal's width, or $COLUMNS
    return Console(file=file, width=PIPE_WIDTH)


def keeper_lines(status: dict) -> list[Text]:
    """The keeper's health: last state download, checkpoint age, and its warning (empty for old coordinators)."""
    k = status.get("keeper")
    if not k:
        return []
    now = status.get("time") or time.time()  # the coordinator's clock: no skew with the timestamps
    line = Text("keeper: ", style="bold")
    if k["last_download_at"] is not None:
        line.append(f"state downloaded {ago(now - k['last_download_at'])} (step {k['last_download_step']})")
    else:
        line.append("no state download yet")
    if k["checkpoint_step"] is not None:
        line.append(f" · checkpoint at step {k['checkpoint_step']}, {k['checkpoint_age_steps']} swarm steps behind")
    else:
        line.append(" · no checkpoint yet")
    if k["checkpoint_every"] is not None:
        line.append(f" (checkpoint every {k['checkpoint_every']})")
    lines = [line]
    if k["warning"]:
        lines.append(Text.assemble(("warning: ", "bold red"), (k["warning"], "bold yellow")))
    elif k["last_error"]:
        at = f" {ago(now - k['last_error_at'])}" if k["last_error_at"] is not None else ""
        lines.append(Text(f"keeper: the last state download failed{at}: {k['last_error']}", style="yellow"))
    return lines


def percent(x: float | None) -> str:
    """A share (0 to 1) as a whole percentage; a dash when unknown."""
    return "—" if x is None else f"{100 * x:.0f}%"


def render(status: dict, *, clock: str = "") -> Group:
    """The swarm at a glance: a one-line summary, the keeper's health and a row per peer."""
    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(status["run_id"], style="bold"), clock, Text.assemble("step ", (str(status["global_step"]), "bold")),
        f"shards {status['shards']['done']}/{status['shards']['total']} (pass {status['data_pass']})",
        f"{status['samples_per_second']:.0f} samples/s", f"compute {percent(status.get('utilization'))}",
        f"train loss {fmt(status['train_loss'])}", f"val loss {fmt(status['val_loss'])}",
        status.get("averaging") or "",
    )
    # Never cut: the id's 8 digits (what `hivefold coordinator ban` takes), whether it is online, what was checked.
    # Eleven columns fit 80 characters only just: the samples each peer trained are in --json.
    peers = Table(Column("peer", no_wrap=True, min_width=8), "name", "device", "batch",
                  Column("online", no_wrap=True), Column("checked", no_wrap=True), "shards", "samples/s",
                  "compute", "loss", "step", box=None)
    for p in status["peers"]:
        # Names come from volunteers: Text keeps a '[' in one from being read as rich markup.
        peers.add_row(p["peer_id"][:8], Text(p["name"]), p.get("device") or "?", str(p.get("micro_batch") or "?"),
                      online_cell(p), checked_cell(p), str(p["shards_done"]),
                      f"{p['samples_per_second']:.1f}", percent(p.get("utilization")),
                      fmt(p["recent_loss"]), str(p["epoch"]))
    return Group(head, progress_line(status), *keeper_lines(status), *access_lines(status),
                 *verification_lines(status), peers, leaderboard(status))


def verification_lines(status: dict) -> list[Text]:
    """How much work the keeper checks and what it costs (absent from older coordinators)."""
    v, settings = status.get("verification"), (status.get("run") or {}).get("verification")
    if not v or not settings:
        return []
    if not settings["segments"]:
        why = f"{settings['off']}: " if settings.get("off") else ""
        return [Text(f"verification: off ({why}results are credited unchecked)", style="yellow")]
    line = Text(f"verification: {v['checked']} results checked ({percent(v['share_checked'])})"
                f" · {v['valid']} valid, {v['invalid']} invalid, {v['awaiting_proof'] + v['queued']} waiting")
    if v["keeper_seconds_per_check"] is not None:
        line.append(f" · keeper {v['keeper_seconds_per_check']:.2f}s a check "
                    f"(shards trained in {v['train_seconds_per_check']:.2f}s)")
    n = settings["ban_after_invalid"]
    line.append(f" · banned after {n} invalid" if n else " · never banned automatically")
    return [line]


def access_lines(status: dict) -> list[Text]:
    """How the run is protected: TLS or plaintext, open or invite-only, the swarm tokens' lifetime."""
    access = (status.get("run") or {}).get("access")
    if not access:  # an older coordinator
        return []
    line = Text("access: ")
    line.append("TLS" if access["tls"] else "PLAINTEXT (--insecure)", style=None if access["tls"] else "bold red")
    line.append(" · invite-only" if access["invite_only"] else " · open to anyone with the address")
    line.append(f" · swarm tokens live {access['swarm_token_seconds']:g} s")
    if "ban_after_reports" in access:
        n = access["ban_after_reports"]
        line.append(f" · poisoners banned after {n} reports" if n else " · poisoners never banned automatically")
    return [line]


def online_cell(peer: dict) -> str:
    """``yes``, ``no``, ``paused`` (online, not training: its volunteer paused it, its machine is busy, ...) or
    ``banned``; with ``, reported N`` when N peers caught it poisoning the averaging."""
    if peer.get("banned"):
        return "banned"
    cell = "no" if not peer["online"] else "paused" if peer.get("paused") else "yes"
    return cell + (f", reported {peer['poison_reports']}" if peer.get("poison_reports") else "")


def checked_cell(peer: dict) -> str:
    """Its results the keeper checked: ``—``, ``3 ok`` or ``2 ok 1 bad`` (its reputation follows from these two:
    ``--json`` has it)."""
    valid, invalid = peer.get("results_valid") or 0, peer.get("results_invalid") or 0
    if not valid and not invalid:
        return "—"
    return f"{valid} ok" + (f" {invalid} bad" if invalid else "")


def duration(seconds: float) -> str:
    """``42s``, ``5m 3s``, ``2h 10m``."""
    seconds = int(max(0, seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h {m}m" if h else f"{m}m {s}s" if m else f"{s}s"


def progress_line(status: dict) -> Text:
    """Tokens trained and how far the data pass (or the token budget) is, with an ETA at the current rate."""
    line = Text(f"tokens trained {status['tokens_trained']:,}")
    done = status.get("run_complete")
    if done:
        line.append(f" · run complete: {done['why']}", style="bold green")
        return line
    budget = status.get("token_budget")
    if budget:
        bar = int(round(20 * budget["fraction"]))
        line.append(f" of {budget['tokens']:,} [{'#' * bar}{'.' * (20 - bar)}] {percent(budget['fraction'])}")
        line.append(f" · ETA {duration(budget['eta_seconds'])}" if budget["eta_seconds"] is not None else " · ETA —")
        return line
    p = status.get("data_pass_progress")
    if p and p["fraction"] is not None:
        bar = int(round(20 * p["fraction"]))
        line.append(f" · data pass {status['data_pass']} [{'#' * bar}{'.' * (20 - bar)}] {percent(p['fraction'])}")
        line.append(f" · ETA {duration(p['eta_seconds'])}" if p["eta_seconds"] is not None else " · ETA —")
    return line


def leaderboard(status: dict, top: int = 5) -> Table:
    """The peers with the most credit, then the teams."""
    table = Table("#", "leaderboard", "team", "points", "shards", box=None)
    ranked = sorted(status["peers"], key=lambda p: p["credit"], reverse=True)[:top]
    for i, p in enumerate(ranked, 1):
        table.add_row(str(i), Text(p["name"]), Text(p.get("team") or ""), f"{p['credit']:.1f}", str(p["shards_done"]))
    for i, t in enumerate((status.get("teams") or [])[:top], 1):
        table.add_row(f"T{i}", Text(f"team {t['team']} ({t['peers']} peers)"), "", f"{t['points']:.1f}",
                      str(t["shards"]))
    return table


def print_status(status: dict, console: Console) -> None:
    """What ``hivefold status`` prints: the table, then where the latest checkpoint is."""
    console.print(render(status))
    ckpt = status["checkpoint"]
    console.print(Text(f"checkpoint: {ckpt['path']} (step {ckpt['step']})" if ckpt else "checkpoint: none yet"))


def watch(fetch: Callable[[], dict], *, every: float, console: Console) -> None:
    """Redraw the status in place every ``every`` seconds until Ctrl-C.

    A failed fetch keeps the last table on screen under a line saying why, and tries again.
    """
    from rich.live import Live

    from hivefold.errors import HivefoldError

    last: Group | None = None
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                clock = time.strftime("%H:%M:%S")
                try:
                    last = render(fetch(), clock=clock)
                    view = last
                except HivefoldError as e:
                    warning = Text(f"{clock}: {e}; retrying every {every:g}s", style="bold red")
                    view = Group(last, warning) if last is not None else warning
                live.update(view, refresh=True)
                time.sleep(every)
    except KeyboardInterrupt:
        pass
