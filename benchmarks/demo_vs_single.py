"""`make demo` against one plain torch process: the demo as a user runs it, then a single process on its shards.

In one run on this machine: (1) ``hivefold demo`` unchanged (its peers, settings and minutes; the clock starts
when the coordinator is up, so the peers' start-up counts against the swarm), its final validation loss from
the keeper's last checkpoint and its text sample; (2) one plain torch process on all cores, over the demo's
own shards and validation set, for the same minutes of training at the tuned batch and learning rate of
``time_to_loss.py`` (its evaluations stop its clock). The goal: the demo within 5 % of the single process.

    python benchmarks/demo_vs_single.py [--minutes 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import keyword
import os
import random
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from time_to_loss import run_single  # noqa: E402 - after the path is set

from hivefold.tls import KNOWN_ENV  # noqa: E402

GOAL = 1.05  # the demo's final validation loss over the single process's


def python_likeness(text: str) -> dict:
    """A crude sign that a sample is Python rather than noise: Python keywords per 100 characters (the stdlib's
    own source has about 2; uniform printable noise about 0)."""
    words = re.findall(r"[A-Za-z_]+", text)
    return {"keywords_per_100_chars": round(100 * sum(keyword.iskeyword(w) for w in words) / max(1, len(text)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--single-batch", type=int, default=16, help="time_to_loss.py's tuned batch on 2 cores")
    parser.add_argument("--single-lr", type=float, default=3e-3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from rich.console import Console

    from hivefold.demo import run_demo

    root = Path(tempfile.mkdtemp(prefix="hivefold-demo-vs-single-"))
    os.environ[KNOWN_ENV] = str(root / "known_coordinators")
    with (root / "demo.out").open("w") as out:
        status = run_demo(peers=args.peers, minutes=args.minutes, workdir=root / "demo",
                          console=Console(file=out, width=120))
    demo_loss = status["val_loss"]
    single = run_single(root / "demo" / "coordinator",
                        types.SimpleNamespace(seconds=args.minutes * 60, single_batch=args.single_batch,
                                              single_lr=args.single_lr, eval_every=10.0, device="cpu"), root)
    single_loss = single["curve"][-1][2]
    noise = "".join(random.Random(0).choices([chr(c) for c in range(32, 127)] + ["\n"], k=300))  # an untrained model
    result = {
        "minutes": args.minutes, "peers": args.peers, "cores": len(os.sched_getaffinity(0)),
        "demo": {"val_loss": demo_loss, "val_loss_first": status["val_loss_first"],
                 "tokens_trained": status["tokens_trained"], "outer_steps": status["global_step"],
                 "sample": status["sample"], "python_likeness": python_likeness(status["sample"] or "")},
        "single": {"val_loss": single_loss, "tokens": single["curve"][-1][1], "batch": single["batch"],
                   "lr": single["lr"], "curve": single["curve"]},
        "noise_python_likeness": python_likeness(noise),
        "val_loss_ratio": demo_loss / single_loss if demo_loss else None,
    }
    ratio = result["val_loss_ratio"]
    print(f"make demo ({args.peers} peers, {args.minutes:g} min) against one process on {result['cores']} cores, "
          "same shards")
    print(f"validation loss  demo {demo_loss:.3f} ({status['tokens_trained']:,} tokens)   single {single_loss:.3f} "
          f"({single['curve'][-1][1]:,} tokens)   ratio {ratio:.3f} (goal <= {GOAL})")
    print(f"sample looks like Python: {result['demo']['python_likeness']} (printable noise: "
          f"{result['noise_python_likeness']})")
    print("sample:\n" + (status["sample"] or "")[:400])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
