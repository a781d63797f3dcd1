"""The diloco averager: shares the outer state, serves only swarm members (hivefold.swarm_access), and
all-reduces through the Byzantine-tolerant runner of ``robust.py``."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import multiprocessing as mp
import time
from typing import AsyncIterator  # noqa: UP035 - hivemind reads typing hints (their _name) to find streams

import hivemind.averaging.averager
import hivemind.averaging.matchmaking
import numpy as np
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.p2p import P2PContext, P2PHandlerError, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture

from hivefold.averaging.robust import guarded_runner
from hivefold.dht import die_with_parent

log = logging.getLogger(__name__)

EXCLUDE_S = 600.0  # a member this averager caught poisoning is not averaged with for this long
# libp2p peer id -> until when: members caught poisoning, in the averager's process (one averager per process)
_EXCLUDED: dict[str, float] = {}
# the members a state download in progress may come from (None: any), in that download's asyncio task
_SOURCES: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("sources", default=None)
_NOT_A_SOURCE = "not among the round's consensus"
LOOKUP_GAP_S = 0.2  # the least time between two of matchmaking's DHT lookups of who is waiting for a group


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
    """False for hivemind's log line about a member a download skipped because it is not a chosen source: the
    keeper's consensus skips one on every checkpoint ("Failed to download state from ..."), by design."""
    return _NOT_A_SOURCE not in record.getMessage()


class OuterStateAverager(DecentralizedAverager):
    """A ``DecentralizedAverager`` that shares the DiLoCo outer state instead of its averaged tensors.

    With ``swarm_key``, a group join or a state download is served only to a libp2p peer whose token, as
    published in the DHT, the coordinator signed and has not expired. Without a group join nobody takes
    part in an all-reduce: its parts are accepted from the group's members only.

    A member that the robust all-reduce flags (robust.py) is not served for ``EXCLUDE_S``; the flags reach
    the owning process through :meth:`take_flags`.

    Each member also answers what state it holds, in a few bytes: its outer step and a sample of its global
    parameters (:meth:`publish_sample`, ``agreement.sample``). Before a download, a newcomer or the keeper
    compares the samples of several members and downloads from those that agree (consensus.py).
    """

    # hivemind caches a servicer's rpc_* handlers per class, and a subclass would inherit its parent's list,
    # without rpc_state_sample: collect this class's own
    _rpc_handlers = None
    _stub_type = None

    def __init__(self, *args, state_fn, swarm_key: bytes | None = None, max_weight: float = 0.0,
                 sample_size: int = 4096, **kwargs):
        self._state_fn, self._swarm_key, self._members, self._max_weight = state_fn, swarm_key, None, max_weight
        # owner -> averager process: the latest published sample; _sample_meta = [writes begun, writes done, step,
        # length], so that a reader can tell a sample being written from a whole one
        self._sample = mp.Array("f", max(1, sample_size), lock=False)
        self._sample_meta = mp.Array("q", [0, 0, -1, 0], lock=False)
        self._flags = mp.SimpleQueue()  # averager process -> owner: (libp2p peer id, why)
        # owner -> averager process: the guard's recent range and ceiling (guard.py)
        self._recent_norm = mp.Value("d", 0.0, lock=False)
        self._ceiling = mp.Value("d", 0.0, lock=False)
        self._declare_now: asyncio.Event | None = None  # made in the averager process's event loop
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        die_with_parent()  # runs in the forked averager process: it must not outlive a killed peer
        logging.getLogger(hivemind.averaging.averager.__name__).addFilter(_planned_skip)
        # this process's all-reduces check what members send and return (the module global is what hivemind uses)
        hivemind.averaging.averager.AllReduceRunner = guarded_runner(self._flag, self._is_excluded,
                                                                     self._range, self._max_weight)
        hivemind.averaging.matchmaking.GroupKeyManager = PacedKeyManager
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

    @classmethod
    def get_stub(cls, p2p, peer, *, namespace=None):
        """Every call to another member goes through here (matchmaking, downloads, all-reduce): none to one
        caught poisoning, and no state download from outside the chosen sources (hivemind logs the refusal and
        moves on to the next member)."""
        if cls._is_excluded(peer.to_base58()):
            # the error hivemind's matchmaking expects from a failed call: it moves on to the next leader
            raise P2PHandlerError(f"not calling {peer}: it was caught poisoning the averaging")
        sources = _SOURCES.get()
        if sources is not None and peer.to_base58() not in sources:
            raise P2PHandlerError(f"not downloading the state from {peer}: {_NOT_A_SOURCE}")
        return super().get_stub(p2p, peer, namespace=namespace)

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None,
                              sources: list[str] | None = None):
        """hivemind's, from ``sources`` (libp2p peer ids in base58) only if given: the members that agree on the
        round's state (agreement.to_follow), so that a hostile member that declares itself newest is not the
        one followed."""
        future = MPFuture()
        self._outer_pipe.send(("_load_state_from_peers", [], dict(timeout=timeout, future=future, sources=sources)))
        return future.result(timeout=timeout) if wait else future

    async def _load_state_from_peers(self, future: MPFuture, timeout: float | None = None,
                                     sources: list[str] | None = None):
        _SOURCES.set(frozenset(sources) if sources is not None else None)  # this download's task only
        await super()._load_state_from_peers(future, timeout=timeout)

    def publish_sample(self, epoch: int, values: np.ndarray) -> None:
        """What :meth:`rpc_state_sample` answers from now on (in the owning process)."""
        n = min(len(values), len(self._sample))
        meta = self._sample_meta
        meta[0] += 1
        self._sample[:n] = values[:n].tolist()
        meta[2], meta[3] = epoch, n
        meta[1] = meta[0]

    def _read_sample(self) -> tuple[int, bytes] | None:
        meta = self._sample_meta
        for _ in range(3):
            begun = meta[0]
            if meta[1] == begun:
                epoch, n = meta[2], meta[3]
                values = np.array(self._sample[:n], dtype=np.float32)
                if meta[0] == begun and epoch >= 0:
                    return int(epoch), values.tobytes()
        return None

    async def rpc_state_sample(self, request: averaging_pb2.DownloadRequest,
                               context: P2PContext) -> averaging_pb2.DownloadData:
        """This member's outer step and parameter sample, as msgpack in ``metadata``; empty if it shares no state."""
        got = self._read_sample() if self.allow_state_sharing and await self._admits(context) else None
        if got is None:
            return averaging_pb2.DownloadData()
        return averaging_pb2.DownloadData(metadata=self.serializer.dumps({"epoch": got[0], "sample": got[1]}))

    def state_samples(self, peers: list[str], timeout: float) -> dict[str, tuple[int, np.ndarray]]:
        """Ask ``peers`` (libp2p ids) at once for their step and sample; those that answered in ``timeout``."""
        future = MPFuture()
        self._outer_pipe.send(("_state_samples", [], dict(peers=peers, timeout=timeout, future=future)))
        return future.result(timeout=timeout + 10.0)

    async def _state_samples(self, peers: list[str], timeout: float, future: MPFuture) -> None:
        async def ask(peer: str):
            try:
                stub = self.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
                answer = await asyncio.wait_for(stub.rpc_state_sample(averaging_pb2.DownloadRequest()), timeout)
                doc = self.serializer.loads(answer.metadata) if answer.metadata else None
                epoch, raw = (doc.get("epoch"), doc.get("sample")) if isinstance(doc, dict) else (None, None)
                if isinstance(epoch, int) and isinstance(raw, bytes) and len(raw) % 4 == 0:
                    return peer, (epoch, np.frombuffer(raw, dtype=np.float32).copy())
            except Exception as e:  # noqa: BLE001 - a member that cannot answer is one fewer to compare
                log.debug("no state sample from %s: %r", peer, e)
            return peer, None

        try:
            answers = await asyncio.gather(*(ask(peer) for peer in peers))
            future.set_result({peer: got for peer, got in answers if got is not None})
        except BaseException as e:  # noqa: BLE001 - the owner waits on this future
            if not future.done():
                future.set_exception(e)
            raise

    def set_range(self, recent_norm: float, ceiling: float) -> None:
        """The norm of the swarm's recent averaged updates (0: unknown) and the most any honest update can be (inf:
        unknown): both bound every member's slice and every averaged part (robust.py)."""
        self._recent_norm.value = recent_norm
        self._ceiling.value = ceiling if math.isfinite(ceiling) else 0.0

    def _range(self) -> tuple[float, float]:
        return self._recent_norm.value, self._ceiling.value

    def take_flags(self) -> list[tuple[str, str]]:
        """The members flagged since the last call, as ``(libp2p peer id, why)`` (in the owning process)."""
        flags = []
        while not self._flags.empty():
            flags.append(self._flags.get())
        return flags

    def _declare_event(self) -> asyncio.Event:
        if self._declare_now is None:
            self._declare_now = asyncio.Event()
        return self._declare_now

    async def _trigger_declare_load_state(self):
        self._declare_event().set()  # the sharing priority (our outer step) changed, or sharing was switched

    async def _declare_for_download_periodically(self):
        """hivemind's, except that it re-declares when the sharing priority changes (once a round) and every
        ``declare_state_period``, not also each time an all-reduce lands a tensor: hivemind wakes it per tensor,
        and every wake is a signed DHT store on every node (480 a minute per peer with ``tiny``'s 40 tensors,
        four fifths of all the swarm's DHT requests)."""
        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        event, was_allowed = self._declare_event(), self.allow_state_sharing
        while True:
            expiration = get_dht_time() + self.declare_state_period
            if self.allow_state_sharing or was_allowed:  # switched off: overwrite the declaration with None
                store = self.dht.store(key, subkey=self.peer_id.to_bytes(), expiration_time=expiration,
                                       value=self.state_sharing_priority if self.allow_state_sharing else None,
                                       return_future=True)
                asyncio.create_task(asyncio.wait_for(store, timeout=self.declare_state_period))
                was_allowed = self.allow_state_sharing
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), timeout=max(0.0, expiration - get_dht_time()))
            except asyncio.TimeoutError:
                pass

    def get_current_state(self):
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

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
