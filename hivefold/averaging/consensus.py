"""Whose outer state the keeper takes: the state most of the newest members hold, not the one that claims most.

hivemind's state download takes the member that declares the highest priority (outer step + fingerprint),
and a hostile member can declare anything. The keeper would then checkpoint, evaluate and finally hand
the operator a poisoner's state: ``benchmarks/poisoning.py`` saw its validation loss jump from 2.95 to
9.98 until the poisoner was banned. So the keeper downloads the states of the ``CANDIDATES`` members that
declare the highest priorities, one at a time, groups those that agree (the same outer step, samples within
``RELATIVE`` of each other: members that averaged together hold one state up to float rounding), and
takes its state from the largest group, then the newest. One hostile member among three cannot be followed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration

from hivefold.averaging import agreement

log = logging.getLogger(__name__)

CANDIDATES = 3  # members whose states are compared (of twice as many asked, highest priority first)
RELATIVE = 1e-5  # two states agree when their samples differ by this much of their size (rms), or less


def declared(dht, prefix: str, own: str) -> list[str]:
    """The libp2p peer ids of the members that declare their state under ``prefix``, highest priority first."""
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    entries = found.value if isinstance(found, ValueWithExpiration) and isinstance(found.value, dict) else {}
    ranked = []
    for subkey, info in entries.items():
        if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int)):
            try:
                peer = PeerID(subkey).to_base58()
            except Exception:  # noqa: BLE001 - a malformed record names nobody
                continue
            if peer != own:
                ranked.append((float(info.value), peer))
    return [peer for _, peer in sorted(ranked, reverse=True)]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and _rms(a - b) <= RELATIVE * max(_rms(a), 1e-12)


def consensus_sources(candidates: list[str], download: Callable[[str], tuple], n_params: int) -> list[str] | None:
    """The members to take the state from: ``download(peer)`` gives ``(outer step, tensors, ...)``, the step None if
    it served nothing usable; the first ``n_params`` tensors are the parameters. None when fewer than two
    candidates served a state (nothing to compare: any member will do)."""
    states = {}
    for peer in candidates[:2 * CANDIDATES]:  # members that serve nothing do not take a place
        epoch, tensors, *_ = download(peer)
        if epoch is not None:
            states[peer] = (epoch, agreement.sample(tensors[:n_params]))
        if len(states) == CANDIDATES:
            break
    if len(states) < 2:
        return None
    # the largest group, then the newest, then the highest declared priority
    chosen = agreement.largest_group(states, _agree, rank=lambda p: -candidates.index(p))
    if len(chosen) < len(states):  # often only a round landed at some members already: info, not a warning
        log.info("the members' outer states differ: taking the one %d of %d hold (%s)", len(chosen), len(states),
                 ", ".join(p[-8:] for p in chosen))
    return chosen
