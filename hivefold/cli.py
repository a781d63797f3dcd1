"""The ``hivefold`` command: ``coordinator``, ``peer``, ``doctor``, ``status``, ``demo``, ``generate``.

The one module that wires the roles together. Building the parser imports only the light config
modules; torch and hivemind are imported inside the commands that need them, so ``--help``, flag
errors and ``status`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from hivefold.errors import HivefoldError
from hivefold.tls import add_trust_arguments, trust_from_args


def _fetch_status(client, address: str) -> dict:
    import grpc

    from hivefold.client import describe_rpc_error
    from hivefold.tls import TrustError

    try:
        return client.status()
    except TrustError:
        raise
    except grpc.RpcError as e:
        raise HivefoldError(f"coordinator at {address} answered {describe_rpc_error(e)}") from None
    except HivefoldError as e:
        raise HivefoldError(f"cannot reach the coordinator at {address}: {e}. Is it running, and is the "
                            "address right?") from None


def _status_cmd(args: argparse.Namespace) -> int:
    from hivefold.client import CoordinatorClient
    from hivefold.status_view import make_console, print_status, watch

    if args.watch is not None and args.json:
        raise HivefoldError("--watch redraws a table; use --json alone for scripts (or poll it)")
    client = CoordinatorClient(args.coordinator, trust=trust_from_args(args), give_up_after=args.timeout)
    try:
        if args.watch is not None:
            # Ctrl-C ends --watch even when this process was started with SIGINT ignored (by a background job's
            # shell, or a parent that runs hivemind, which ignores it): Python then keeps the inherited SIG_IGN.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            watch(lambda: _fetch_status(client, args.coordinator), every=args.watch, console=make_console())
            return 0
        status = _fetch_status(client, args.coordinator)
    finally:
        client.close()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print_status(status, make_console())
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.2 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.2 and 3600 seconds, got {text}")
    return value


def _receipts_cmd(args: argparse.Namespace) -> int:
    from hivefold.receipts import ReceiptBook

    key = None
    if args.public_key:
        try:
            key = bytes.fromhex(args.public_key)
        except ValueError:
            raise HivefoldError("--public-key must be the coordinator's key in hex (see /api/credit)") from None
    book = ReceiptBook(args.workdir.expanduser())
    if not book.path.exists():
        raise HivefoldError(f"no receipts in {args.workdir}: has a peer with this --workdir had results accepted?")
    summary = book.summary(key)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(f"{summary['receipts']} receipts verified: {summary['points']:.3f} points for {summary['tokens']:,} "
              f"tokens (runs: {', '.join(summary['runs']) or '-'})")
        for bad in summary["invalid"]:
            print(f"line {bad['line']}: {bad['error']}", file=sys.stderr)
    return 1 if summary["invalid"] else 0


def _generate_cmd(args: argparse.Namespace) -> int:
    from hivefold.generate import generate_text

    print(generate_text(args.checkpoint, args.prompt, tokens=args.tokens, temperature=args.temperature,
                        top_k=args.top_k or None, seed=args.seed))
    return 0


def _coordinator_cmd(args: argparse.Namespace) -> int:
    if args.coordinator_command is not None:
        from coordinator.admin import run_command

        return run_command(args)
    if args.workdir is None:
        args.coordinator_parser.error("the following arguments are required: --workdir")
    from coordinator.config import config_from_args

    config = config_from_args(args)  # bad flags fail here, before hivemind loads or the workdir is touched
    from coordinator.main import run
    from hivefold.logs import setup_logging
    from hivefold.signals import install_stop_handlers

    setup_logging("coordinator")
    stop = threading.Event()
    install_stop_handlers(stop, what="stopping (the keeper takes a final checkpoint first)")
    run(config, stop)
    return 0


def _peer_cmd(args: argparse.Namespace) -> int:
    if args.peer_command is not None:
        return _peer_control_cmd(args)
    if args.coordinator is None:
        args.peer_parser.error("the following arguments are required: --coordinator")
    from peer.config import config_from_args

    config = config_from_args(args)
    from hivefold.logs import setup_logging
    from hivefold.signals import install_stop_handlers
    from peer.daemon import STOP_MESSAGE, run

    setup_logging("peer")
    stop = threading.Event()
    install_stop_handlers(stop, what=STOP_MESSAGE)
    run(config, stop)
    return 0


def _peer_control_cmd(args: argparse.Namespace) -> int:
    """``hivefold peer pause|resume|finish``: ask the peer running in ``--workdir``."""
    from peer.control import send_command

    ok, message = send_command(args.workdir.expanduser(), args.peer_command)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _doctor_cmd(args: argparse.Namespace) -> int:
    from peer.doctor import run_doctor

    return run_doctor(coordinator=args.coordinator, device=args.device, as_json=args.json, timeout=args.timeout,
                      trust=trust_from_args(args))


def _demo_cmd(args: argparse.Namespace) -> int:
    from hivefold.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    status = run_demo(peers=args.peers, minutes=args.minutes, corpus=args.corpus, workdir=args.workdir,
                      model=args.model)
    if status["checkpoint"] is None:
        raise HivefoldError("the demo finished without a checkpoint; see the logs in its workdir")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from coordinator.admin import add_arguments as coordinator_admin_arguments
    from coordinator.config import add_arguments as coordinator_arguments
    from peer.config import add_arguments as peer_arguments
    from peer.config import add_control_arguments as peer_control_arguments

    parser = argparse.ArgumentParser(prog="hivefold", description="Volunteer-computing training of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("coordinator", help="define a run and hand out work units; or invite, ban or unban peers",
                       usage="%(prog)s --workdir DIR [options]\n       %(prog)s {invite,ban,unban} ... --workdir DIR",
                       description="Run a coordinator (hivefold coordinator --workdir DIR ...), or manage who may take "
                                   "part in its run from another terminal (hivefold coordinator invite --workdir DIR).")
    coordinator_arguments(p)
    p.set_defaults(func=_coordinator_cmd, coordinator_parser=p)
    coordinator_admin_arguments(p)
    p = sub.add_parser("peer", help="contribute this machine to a run; or pause, resume or finish a running peer",
                       usage="%(prog)s --coordinator HOST:PORT [options]\n       %(prog)s {pause,resume,finish} "
                             "[--workdir DIR]",
                       description="Run a peer (hivefold peer --coordinator HOST:PORT ...), or control the one running "
                                   "in --workdir from another terminal (hivefold peer pause --workdir DIR).")
    peer_arguments(p)
    p.set_defaults(func=_peer_cmd, peer_parser=p)
    peer_control_arguments(p)
    p = sub.add_parser("doctor", help="check this machine before joining a run (versions, network, device)")
    p.add_argument("--coordinator", help="coordinator gRPC HOST:PORT (default: none; the coordinator and DHT "
                   "bootstrap checks are skipped)")
    add_trust_arguments(p)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="the device to test, as for hivefold peer (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--timeout", type=float, default=15.0,
                   help="seconds each network check may take (default %(default)s)")
    p.set_defaults(func=_doctor_cmd)
    p = sub.add_parser("status", help="show a run's progress")
    p.add_argument("--coordinator", required=True, help="coordinator gRPC HOST:PORT")
    add_trust_arguments(p)
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.add_argument("--watch", nargs="?", type=_seconds, const=2.0, metavar="SECONDS",
                   help="redraw in place every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to keep trying to reach the coordinator (default %(default)s)")
    p.set_defaults(func=_status_cmd)
    p = sub.add_parser("demo", help="a local swarm: coordinator + peers on this machine")
    p.add_argument("--peers", type=int, default=2, help="number of peer processes (default %(default)s)")
    p.add_argument("--minutes", type=float, default=3.0, help="how long to train (default %(default)s)")
    p.add_argument("--corpus", default="stdlib",
                   help="'stdlib', a text file, directory or .jsonl file (default %(default)s)")
    p.add_argument("--workdir", type=Path, help="where the run and logs go (default ./hivefold-demo/run-<time>)")
    p.add_argument("--model", default="tiny", help="model size (default %(default)s)")
    p.set_defaults(func=_demo_cmd)
    p = sub.add_parser("receipts", help="verify a peer's credit receipts and total its points")
    p.add_argument("--workdir", type=Path, required=True, help="the peer's --workdir")
    p.add_argument("--public-key", help="accept only receipts signed by this coordinator key (hex, see /api/credit)")
    p.add_argument("--json", action="store_true", help="print the totals as JSON")
    p.set_defaults(func=_receipts_cmd)
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="a .pt file written by the keeper")
    p.add_argument("--prompt", default="", help="text to continue (default: none)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=40,
                   help="sample among the k likeliest tokens; 0 = all (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.set_defaults(func=_generate_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HivefoldError as e:
        print(f"hivefold {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
