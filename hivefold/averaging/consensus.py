"""Whose outer state to download: the state most of the newest members hold, not the one that claims most.

hivemind's state download takes the member that declares the highest priority (outer step + fingerprint),
and a hostile member can declare anything. A newcomer would then start from a poisoner's state, and the
keeper would checkpoint, evaluate and finally hand the operator one: ``benchmarks/poisoning.py`` saw the
keeper's validation loss jump from 2.95 to 9.98 until the poisoner was banned.

So before a download (:func:`download_agreed`) the downloader asks the ``2 × CANDIDATES`` members that
declare the highest priorities for their outer step and a sample of their parameters (a few bytes each:
``OuterStateAverager.rpc_state_sample``), groups the first ``CANDIDATES`` that answer by agreement (the
same step, samples within ``RELATIVE`` of each other: members that averaged together hold one state up to
float rounding), and downloads from the largest group, then the newest, one member at a time. A member
whose served state is not the one it declared is skipped. One hostile member among three cannot be
followed; one download, not three (the keeper downloaded three whole states per checkpoint before).

A downloader that already holds the state the chosen members declare (the same step and sample) downloads
nothing: every newcomer to a swarm still at step 0 holds the run's initial state, built from its seed, and
two of them downloading it from each other cost each 88 MB of a home uplink for `small`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration

from hivefold.averaging import agreement

log = logging.getLogger(__name__)

SAMPLE_TIMEOUT_S = 3.0  # for the members' answers to what state they hold
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


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and agreement.rms(a - b) <= RELATIVE * max(agreement.rms(a), 1e-12)


Declared = tuple[int, np.ndarray]  # a member's outer step and the sample of its parameters (agreement.sample)


def agreed(candidates: list[str], samples: dict[str, Declared]) -> list[tuple[str, int, np.ndarray]] | None:
    """The members to download from, each with the step and sample it declared: of the first ``CANDIDATES``
    candidates (highest priority first) that answered, the largest group that agrees, then the newest, then the
    highest priority. None when fewer than two answered (nothing to compare: any member will do)."""
    states = {peer: samples[peer] for peer in candidates if peer in samples}
    states = dict(list(states.items())[:CANDIDATES])
    if len(states) < 2:
        return None
    chosen = agreement.largest_group(states, _agree, rank=lambda p: -candidates.index(p))
    if len(chosen) < len(states):  # often only a round landed at some members already: info, not a warning
        log.info("the members' outer states differ: taking the one %d of %d hold (%s)", len(chosen), len(states),
                 ", ".join(p[-8:] for p in chosen))
    return [(peer, *states[peer]) for peer in chosen]


def download_agreed(candidates: list[str], ask: Callable[[list[str]], dict], download: Callable[[str], tuple],
                    n_params: int, held: Declared | None = None) -> tuple | None:
    """Download the state the candidates agree on: ``ask(peers)`` gives their declared ``{peer: (step, sample)}``,
    ``download(peer)`` a state ``(step, tensors, ...)`` (the step None if it served nothing), the first
    ``n_params`` tensors being the parameters. None when fewer than two candidates answered (the caller takes
    any member's state); ``(None, None, True)`` when no member of the chosen group served the state it declared
    but one moved on to a newer step meanwhile (ask again), ``(None, None, None)`` when none did;
    ``(step, None, False)`` when the state they declare is ``held``, the downloader's own (step, sample)."""
    samples = ask(candidates[:2 * CANDIDATES]) if candidates else {}
    chosen = agreed(candidates, samples) if len(candidates) > 1 else None
    # the one member that answered vouches for nothing, but if it holds what this one does there is nothing to fetch
    first = chosen[0] if chosen else next(((p, *samples[p]) for p in candidates if p in samples), None)
    if held is not None and first is not None and first[1] == held[0] and _agree(first[2], held[1]):
        return held[0], None, False
    if chosen is None:
        return None
    moved = None
    for peer, epoch, declared_sample in chosen:
        got = download(peer)
        if got[0] is None:
            continue
        if got[0] == epoch and _agree(agreement.sample(got[1][:n_params]), declared_sample):
            return got
        if got[0] == epoch:
            log.warning("member %s served another state than the one it declared at step %d: skipping it", peer,
                        epoch)
        else:  # a round landed there since it answered: its new state is not the one the others vouched for
            log.info("member %s moved on to step %s since it declared step %d; trying another", peer, got[0],
                     epoch)
            moved = True
    return None, None, moved


class StateDownloads:
    """DiLoCo's outer-state downloads through ``averager`` (an ``OuterStateAverager`` sharing under ``prefix``):
    each one ``(outer step, tensors, whether a round is in flight there)``, or three Nones."""

    def __init__(self, averager, prefix: str, shapes: list, swarm_epoch: Callable[[], int | None]):
        self.averager, self.prefix, self.shapes, self.swarm_epoch = averager, prefix, shapes, swarm_epoch

    def fetch(self, timeout: float | None, sources: list[str] | None, held: Declared | None = None) -> tuple:
        """From ``sources`` (libp2p peer ids) if given, else from the members that agree (:func:`download_agreed`;
        tensors None: they hold ``held``, this member's own step and sample, so nothing was downloaded)."""
        if sources is None:
            got = download_agreed(declared(self.averager.dht, self.prefix, str(self.averager.peer_id)), self._ask,
                                  lambda peer: self.one(timeout, [peer]), len(self.shapes) // 2, held)
            if got is not None and got[0] is not None and got[1] is None:  # held: is a round landing meanwhile?
                swarm = self.swarm_epoch()
                return got[0], None, swarm is not None and got[0] + 1 < swarm
            if got is not None:
                return got
        return self.one(timeout, sources)

    def _ask(self, peers: list[str]) -> dict:
        try:
            return self.averager.state_samples(peers, timeout=SAMPLE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - nobody to compare: hivemind's choice, as before consensus.py
            log.warning("could not ask the members what state they hold (%r); taking the newest declared", e)
            return {}

    def one(self, timeout: float | None, sources: list[str] | None) -> tuple:
        """One download as hivemind makes it: the highest priority first, among ``sources`` if given."""
        try:
            loaded = self.averager.load_state_from_peers(timeout=timeout, sources=sources)
        except FutureTimeout:  # no state, not a crash (see hivefold.averaging)
            log.info("no peer served the outer state within %ss; going on with this peer's", timeout)
            return None, None, None
        if loaded is None:
            return None, None, None
        metadata, tensors = loaded
        epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
        if not isinstance(epoch, int) or len(tensors) != len(self.shapes) or any(
                t.shape != s for t, s in zip(tensors, self.shapes, strict=True)):
            log.warning("ignoring a malformed outer state from a peer")
            return None, None, None
        swarm = self.swarm_epoch()
        return epoch, tensors, metadata.get("in_flight") or (swarm is not None and epoch + 1 < swarm)
