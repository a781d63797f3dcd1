"""The diloco averager: shares the outer state, serves only swarm members (hivefold.swarm_access), and
all-reduces through the Byzantine-tolerant runner of ``robust.py`` (guarded.py)."""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp

import numpy as np
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture

from hivefold.averaging.guarded import Guarded

log = logging.getLogger(__name__)

class OuterStateAverager(Guarded, DecentralizedAverager):
    """A ``DecentralizedAverager`` that shares the DiLoCo outer state instead of its averaged tensors.

    It serves swarm members only and all-reduces through the robust runner (guarded.py), bounded by the range
    its owner sets (:meth:`set_range`).

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
        self._state_fn = state_fn
        self._guard(swarm_key=swarm_key, max_weight=max_weight, limits=lambda tensors: self._range())
        # owner -> averager process: the latest published sample; _sample_meta = [writes begun, writes done, step,
        # length], so that a reader can tell a sample being written from a whole one
        self._sample = mp.Array("f", max(1, sample_size), lock=False)
        self._sample_meta = mp.Array("q", [0, 0, -1, 0], lock=False)
        # owner -> averager process: the guard's recent range and ceiling (guard.py)
        self._recent_norm = mp.Value("d", 0.0, lock=False)
        self._ceiling = mp.Value("d", 0.0, lock=False)
        self._declare_now: asyncio.Event | None = None  # made in the averager process's event loop
        super().__init__(*args, **kwargs)

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None,
                              sources: list[str] | None = None):
        """hivemind's, from ``sources`` (libp2p peer ids in base58) only if given: the members that agree on the
        round's state (agreement.to_follow), so that a hostile member that declares itself newest is not the
        one followed."""
        future = self._download(timeout, sources)
        return future.result(timeout=timeout) if wait else future

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
