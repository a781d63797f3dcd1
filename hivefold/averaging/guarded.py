"""What every hivefold averager adds to hivemind's: it serves swarm members only, all-reduces through the robust
runner of ``robust.py``, and stops averaging with a member that runner caught poisoning.

:class:`Guarded` is a mixin for ``DecentralizedAverager`` subclasses: diloco's outer-state averager (members.py)
and sync's gradient and state averagers (sync_members.py). Each averager runs in a process of its own, where
hivemind looks up its all-reduce runner and key manager as module globals: :meth:`Guarded.run` replaces them there.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable
from typing import AsyncIterator  # noqa: UP035 - hivemind reads typing hints (their _name) to find streams

import hivemind.averaging.averager
import hivemind.averaging.matchmaking
import torch
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.p2p import P2PContext, P2PHandlerError
from hivemind.proto import averaging_pb2
from hivemind.utils.mpfuture import MPFuture

from hivefold.averaging.robust import guarded_runner
from hivefold.dht import die_with_parent

log = logging.getLogger(__name__)

EXCLUDE_S = 600.0  # a member this averager caught poisoning is not averaged with for this long
# libp2p peer id -> until when: members caught poisoning, in the averager's process (one averager of each kind per
# process; sync's two averagers live in two processes, each with its own list)
_EXCLUDED: dict[str, float] = {}
LOOKUP_GAP_S = 0.2  # the least time between two of matchmaking's DHT lookups of who is waiting for a group

# the members a state download in progress may come from (None: any), in that download's asyncio task
_SOURCES: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("sources", default=None)
_NOT_A_SOURCE = "not among the chosen sources"
_CAUGHT = "it was caught poisoning the averaging"

# (the runner's local tensors) -> (recent norm, ceiling), see robust.robust_combine; computed in the averager process
Limits = Callable[[list[torch.Tensor]], tuple[float, float]]


class PacedKeyManager(GroupKeyManager):
    """hivemind's, with its lookups of the averagers waiting for a group at most one per ``LOOKUP_GAP_S``:
    while no leader is found, matchmaking repeats the lookup as soon as the last one answers, a DHT get on
    every node each time (about 40 per round and peer on loopback, most of the DHT's remaining requests)."""

    _next_lookup = 0.0

    async def get_averagers(self, *args, **kwargs):
        wait = self._next_lookup - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._next_lookup = time.monotonic() + LOOKUP_GAP_S
        return await super().get_averagers(*args, **kwargs)


def _planned_skip(record: logging.LogRecord) -> bool:
    """False for hivemind's log line (an error, with a traceback) about a member a download skipped by design:
    not a chosen source (the keeper's consensus skips one on every checkpoint) or caught poisoning."""
    message = record.getMessage()
    return _NOT_A_SOURCE not in message and _CAUGHT not in message


class Guarded:
    """Mixed in before a ``DecentralizedAverager`` class; call :meth:`_guard` before its ``__init__`` (which forks).

    With ``swarm_key``, a group join or a state download is served only to a libp2p peer whose token, as
    published in the DHT, the coordinator signed and has not expired. Without a group join nobody takes
    part in an all-reduce: its parts are accepted from the group's members only.

    A member that the robust all-reduce flags is not served, called or grouped with for ``EXCLUDE_S``; the flags
    reach the owning process through :meth:`take_flags`.
    """

    def _guard(self, *, swarm_key: bytes | None, max_weight: float, limits: Limits, outliers: bool = True) -> None:
        self._swarm_key, self._members, self._max_weight = swarm_key, None, max_weight
        self._limits, self._outliers = limits, outliers
        self._flags = mp.SimpleQueue()  # averager process -> owner: (libp2p peer id, why)
        self._excluded_by_owner: dict[str, float] = {}  # what exclude() sent, as the owner's process knows it

    def run(self) -> None:
        die_with_parent()  # runs in the forked averager process: it must not outlive a killed peer
        # this process's all-reduces check what members send and return (the module global is what hivemind uses)
        hivemind.averaging.averager.AllReduceRunner = guarded_runner(self._flag, self._is_excluded, self._limits,
                                                                     self._max_weight, outliers=self._outliers)
        hivemind.averaging.matchmaking.GroupKeyManager = PacedKeyManager
        logging.getLogger(hivemind.averaging.averager.__name__).addFilter(_planned_skip)
        super().run()

    def _flag(self, peer: str, why: str) -> None:
        if self._is_excluded(peer):
            return  # caught already, in another part: once per exclusion (the owner drains the queue once a round)
        log.error("averaging: member %s %s; not averaging with it for %.0fs", peer, why, EXCLUDE_S)
        _EXCLUDED[peer] = time.monotonic() + EXCLUDE_S
        self._flags.put((peer, why))

    @staticmethod
    def _is_excluded(peer: str) -> bool:
        return _EXCLUDED.get(peer, 0.0) > time.monotonic()

    def exclude(self, peer: str) -> None:
        """(owner, from the thread that drives this averager: hivemind's pipe is not thread-safe) Stop averaging
        with ``peer`` in this averager's process too: another averager or a check in the owning process caught it."""
        self._excluded_by_owner[peer] = time.monotonic() + EXCLUDE_S
        if self.is_alive():
            self._outer_pipe.send(("_exclude", [peer], {}))

    def excluded(self, peer: str) -> bool:
        """(owner) Whether :meth:`exclude` was called for ``peer`` within ``EXCLUDE_S``."""
        return self._excluded_by_owner.get(peer, 0.0) > time.monotonic()

    async def _exclude(self, peer: str) -> None:
        _EXCLUDED[peer] = max(_EXCLUDED.get(peer, 0.0), time.monotonic() + EXCLUDE_S)

    @classmethod
    def get_stub(cls, p2p, peer, *, namespace=None):
        """Every call to another member goes through here (matchmaking, downloads, all-reduce): none to one
        caught poisoning, and no state download from outside the chosen sources (hivemind logs the refusal and
        moves on to the next member)."""
        sources = _SOURCES.get()
        if sources is not None and peer.to_base58() not in sources:
            raise P2PHandlerError(f"not downloading the state from {peer}: {_NOT_A_SOURCE}")
        if cls._is_excluded(peer.to_base58()):
            # the error hivemind's matchmaking expects from a failed call: it moves on to the next leader
            raise P2PHandlerError(f"not calling {peer}: {_CAUGHT}")
        return super().get_stub(p2p, peer, namespace=namespace)

    def _download(self, timeout: float | None, sources: list[str] | None) -> MPFuture:
        """(owner) hivemind's state download, from ``sources`` (libp2p peer ids in base58) only if given: a future
        of its ``(metadata, tensors)``, or of None if nobody served one."""
        future = MPFuture()
        self._outer_pipe.send(("_load_state_from_peers", [], dict(timeout=timeout, future=future, sources=sources)))
        return future

    async def _load_state_from_peers(self, future: MPFuture, timeout: float | None = None,
                                     sources: list[str] | None = None):
        _SOURCES.set(frozenset(sources) if sources is not None else None)  # this download's task only
        await super()._load_state_from_peers(future, timeout=timeout)

    def take_flags(self) -> list[tuple[str, str]]:
        """The members flagged since the last call, as ``(libp2p peer id, why)`` (in the owning process)."""
        flags = []
        while not self._flags.empty():
            flags.append(self._flags.get())
        return flags

    async def _admits(self, context) -> bool:
        if self._is_excluded(context.remote_id.to_base58()):
            return False
        if self._swarm_key is None:
            return True
        if self._members is None:  # made in the averager's process, where its handlers run
            from hivefold.swarm_access import MemberCheck
            self._members = MemberCheck(self.dht, self._swarm_key)
        return await self._members.allowed(context.remote_id)

    # hivemind finds its handlers' message types in their annotations
    async def rpc_join_group(self, request: averaging_pb2.JoinRequest,
                             context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._admits(context):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_DECLARED)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._admits(context):
            return
        async for response in super().rpc_download_state(request, context):
            yield response


class Caught:
    """The owner's side of the flags: which members its averagers caught, and which are still to report."""

    def __init__(self):
        self.flagged: dict[str, str] = {}  # libp2p peer id -> why
        self._unreported: deque[tuple[str, str]] = deque()  # appended by training, drained by the heartbeat thread

    def collect(self, flags: list[tuple[str, str]], where: str) -> None:
        for peer, why in flags:
            if peer not in self.flagged:
                log.error("%s: member %s was caught poisoning (%s); reporting it", where, peer, why)
            self.flagged[peer] = why
            self._unreported.append((peer, why))

    def take(self) -> list[tuple[str, str]]:
        """Members caught since the last call: ``(libp2p peer id, why)``, to report."""
        flags = []
        while self._unreported:
            flags.append(self._unreported.popleft())
        return flags
