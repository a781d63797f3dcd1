from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResultVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_VERDICT_UNSPECIFIED: _ClassVar[ResultVerdict]
    RESULT_VERDICT_ACCEPTED: _ClassVar[ResultVerdict]
    RESULT_VERDICT_REJECTED_LATE: _ClassVar[ResultVerdict]
    RESULT_VERDICT_PENDING_VERIFICATION: _ClassVar[ResultVerdict]
    RESULT_VERDICT_INVALID: _ClassVar[ResultVerdict]
RESULT_VERDICT_UNSPECIFIED: ResultVerdict
RESULT_VERDICT_ACCEPTED: ResultVerdict
RESULT_VERDICT_REJECTED_LATE: ResultVerdict
RESULT_VERDICT_PENDING_VERIFICATION: ResultVerdict
RESULT_VERDICT_INVALID: ResultVerdict

class DeviceReport(_message.Message):
    __slots__ = ("kind", "name", "memory_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    memory_bytes: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class PeerAuth(_message.Message):
    __slots__ = ("peer_id", "token", "spec_hash")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    token: str
    spec_hash: str
    def __init__(self, peer_id: _Optional[str] = ..., token: _Optional[str] = ..., spec_hash: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("public_key", "name", "timestamp", "signature", "device", "expected_spec_hash", "team", "invite")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    INVITE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    name: str
    timestamp: float
    signature: bytes
    device: DeviceReport
    expected_spec_hash: str
    team: str
    invite: str
    def __init__(self, public_key: _Optional[bytes] = ..., name: _Optional[str] = ..., timestamp: _Optional[float] = ..., signature: _Optional[bytes] = ..., device: _Optional[_Union[DeviceReport, _Mapping]] = ..., expected_spec_hash: _Optional[str] = ..., team: _Optional[str] = ..., invite: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("peer_id", "token", "spec_json", "spec_hash", "dht_maddrs", "heartbeat_interval_s", "swarm_maddrs", "receipt_public_key", "lease_seconds", "proof_segments")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    DHT_MADDRS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SWARM_MADDRS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROOF_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    token: str
    spec_json: str
    spec_hash: str
    dht_maddrs: _containers.RepeatedScalarFieldContainer[str]
    heartbeat_interval_s: float
    swarm_maddrs: _containers.RepeatedScalarFieldContainer[str]
    receipt_public_key: bytes
    lease_seconds: float
    proof_segments: int
    def __init__(self, peer_id: _Optional[str] = ..., token: _Optional[str] = ..., spec_json: _Optional[str] = ..., spec_hash: _Optional[str] = ..., dht_maddrs: _Optional[_Iterable[str]] = ..., heartbeat_interval_s: _Optional[float] = ..., swarm_maddrs: _Optional[_Iterable[str]] = ..., receipt_public_key: _Optional[bytes] = ..., lease_seconds: _Optional[float] = ..., proof_segments: _Optional[int] = ...) -> None: ...

class LeaseShardRequest(_message.Message):
    __slots__ = ("auth", "held_lease_ids", "inline_max_bytes")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    HELD_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    INLINE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    held_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    inline_max_bytes: int
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., held_lease_ids: _Optional[_Iterable[str]] = ..., inline_max_bytes: _Optional[int] = ...) -> None: ...

class WorkUnit(_message.Message):
    __slots__ = ("shard_id", "lease_id", "deadline", "byte_size", "sha256", "num_sequences", "data_pass", "data")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DATA_PASS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    lease_id: str
    deadline: float
    byte_size: int
    sha256: str
    num_sequences: int
    data_pass: int
    data: bytes
    def __init__(self, shard_id: _Optional[int] = ..., lease_id: _Optional[str] = ..., deadline: _Optional[float] = ..., byte_size: _Optional[int] = ..., sha256: _Optional[str] = ..., num_sequences: _Optional[int] = ..., data_pass: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LeaseShardResponse(_message.Message):
    __slots__ = ("work", "retry_after_s", "run_complete")
    WORK_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    RUN_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    work: WorkUnit
    retry_after_s: float
    run_complete: bool
    def __init__(self, work: _Optional[_Union[WorkUnit, _Mapping]] = ..., retry_after_s: _Optional[float] = ..., run_complete: _Optional[bool] = ...) -> None: ...

class FetchShardRequest(_message.Message):
    __slots__ = ("auth", "lease_id")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    lease_id: str
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., lease_id: _Optional[str] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("data", "offset", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ...) -> None: ...

class MicroBatchLoss(_message.Message):
    __slots__ = ("loss", "epoch")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    loss: float
    epoch: int
    def __init__(self, loss: _Optional[float] = ..., epoch: _Optional[int] = ...) -> None: ...

class SubmitResultRequest(_message.Message):
    __slots__ = ("auth", "lease_id", "samples", "losses", "compute_seconds", "proof_digests", "state_changes")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROOF_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGES_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    lease_id: str
    samples: int
    losses: _containers.RepeatedCompositeFieldContainer[MicroBatchLoss]
    compute_seconds: float
    proof_digests: _containers.RepeatedScalarFieldContainer[bytes]
    state_changes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., lease_id: _Optional[str] = ..., samples: _Optional[int] = ..., losses: _Optional[_Iterable[_Union[MicroBatchLoss, _Mapping]]] = ..., compute_seconds: _Optional[float] = ..., proof_digests: _Optional[_Iterable[bytes]] = ..., state_changes: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitResultResponse(_message.Message):
    __slots__ = ("verdict", "credit", "detail", "receipt", "proof_segment", "proof_max_bytes")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    PROOF_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    PROOF_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    verdict: ResultVerdict
    credit: float
    detail: str
    receipt: str
    proof_segment: int
    proof_max_bytes: int
    def __init__(self, verdict: _Optional[_Union[ResultVerdict, str]] = ..., credit: _Optional[float] = ..., detail: _Optional[str] = ..., receipt: _Optional[str] = ..., proof_segment: _Optional[int] = ..., proof_max_bytes: _Optional[int] = ...) -> None: ...

class SubmitProofRequest(_message.Message):
    __slots__ = ("auth", "lease_id", "segment", "offset", "total_size", "data")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    lease_id: str
    segment: int
    offset: int
    total_size: int
    data: bytes
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., lease_id: _Optional[str] = ..., segment: _Optional[int] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitProofResponse(_message.Message):
    __slots__ = ("received", "complete")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    received: int
    complete: bool
    def __init__(self, received: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("auth", "lease_id", "reason")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    lease_id: str
    reason: str
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("auth", "epoch", "samples_trained", "recent_loss", "samples_per_second", "dht_maddrs", "compute_utilization", "micro_batch", "paused", "pause_reason", "poison_reports")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    RECENT_LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DHT_MADDRS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    PAUSE_REASON_FIELD_NUMBER: _ClassVar[int]
    POISON_REPORTS_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    epoch: int
    samples_trained: int
    recent_loss: float
    samples_per_second: float
    dht_maddrs: _containers.RepeatedScalarFieldContainer[str]
    compute_utilization: float
    micro_batch: int
    paused: bool
    pause_reason: str
    poison_reports: _containers.RepeatedCompositeFieldContainer[PoisonReport]
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., epoch: _Optional[int] = ..., samples_trained: _Optional[int] = ..., recent_loss: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., dht_maddrs: _Optional[_Iterable[str]] = ..., compute_utilization: _Optional[float] = ..., micro_batch: _Optional[int] = ..., paused: _Optional[bool] = ..., pause_reason: _Optional[str] = ..., poison_reports: _Optional[_Iterable[_Union[PoisonReport, _Mapping]]] = ...) -> None: ...

class PoisonReport(_message.Message):
    __slots__ = ("libp2p_peer_id", "reason")
    LIBP2P_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    libp2p_peer_id: str
    reason: str
    def __init__(self, libp2p_peer_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("active_lease_ids", "global_step", "swarm_maddrs")
    ACTIVE_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    SWARM_MADDRS_FIELD_NUMBER: _ClassVar[int]
    active_lease_ids: _containers.RepeatedScalarFieldContainer[str]
    global_step: int
    swarm_maddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, active_lease_ids: _Optional[_Iterable[str]] = ..., global_step: _Optional[int] = ..., swarm_maddrs: _Optional[_Iterable[str]] = ...) -> None: ...

class ExtendLeaseRequest(_message.Message):
    __slots__ = ("auth", "lease_id", "samples_done")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    lease_id: str
    samples_done: int
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., lease_id: _Optional[str] = ..., samples_done: _Optional[int] = ...) -> None: ...

class ExtendLeaseResponse(_message.Message):
    __slots__ = ("granted", "deadline", "detail")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    deadline: float
    detail: str
    def __init__(self, granted: _Optional[bool] = ..., deadline: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("auth", "epoch", "reason")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    epoch: int
    reason: str
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("hold", "retry_after_s", "checkpoint_step")
    HOLD_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    hold: bool
    retry_after_s: float
    checkpoint_step: int
    def __init__(self, hold: _Optional[bool] = ..., retry_after_s: _Optional[float] = ..., checkpoint_step: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status_json",)
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    status_json: str
    def __init__(self, status_json: _Optional[str] = ...) -> None: ...

class FetchCheckpointRequest(_message.Message):
    __slots__ = ("min_step",)
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    min_step: int
    def __init__(self, min_step: _Optional[int] = ...) -> None: ...

class SwarmTokenRequest(_message.Message):
    __slots__ = ("auth", "libp2p_peer_id", "dht_public_key")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    LIBP2P_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    DHT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    auth: PeerAuth
    libp2p_peer_id: str
    dht_public_key: bytes
    def __init__(self, auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., libp2p_peer_id: _Optional[str] = ..., dht_public_key: _Optional[bytes] = ...) -> None: ...

class SwarmTokenResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    expires_at: float
    def __init__(self, token: _Optional[bytes] = ..., expires_at: _Optional[float] = ...) -> None: ...
