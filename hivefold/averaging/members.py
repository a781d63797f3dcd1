"""The diloco averager: shares the outer state, and serves only swarm members (hivefold.swarm_access)."""

from __future__ import annotations

from typing import AsyncIterator  # noqa: UP035 - hivemind reads typing hints (their _name) to find streams

from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from hivefold.dht import die_with_parent


class OuterStateAverager(DecentralizedAverager):
    """A ``DecentralizedAverager`` that shares the DiLoCo outer state instead of its averaged tensors.

    With ``swarm_key``, a group join or a state download is served only to a libp2p peer whose token, as
    published in the DHT, the coordinator signed and has not expired. Without a group join nobody takes
    part in an all-reduce: its parts are accepted from the group's members only.
    """

    def __init__(self, *args, state_fn, swarm_key: bytes | None = None, **kwargs):
        self._state_fn, self._swarm_key, self._members = state_fn, swarm_key, None
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        die_with_parent()  # runs in the forked averager process: it must not outlive a killed peer
        super().run()

    def get_current_state(self):
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

    async def _admits(self, context) -> bool:
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
