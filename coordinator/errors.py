"""Domain errors raised by handlers and the ledger; the servicer maps each to one gRPC status code."""

from hivefold.errors import HivefoldError


class DomainError(HivefoldError):
    """Base: the request cannot be served as sent; the message says what to fix."""


class InvalidArgument(DomainError):
    """A field is malformed or out of range."""


class NotFound(DomainError):
    """The named lease, shard, peer or checkpoint does not exist."""


class FailedPrecondition(DomainError):
    """The request is well-formed but the run is not in a state to accept it (e.g. spec hash differs)."""


class PermissionDenied(DomainError):
    """The caller may not do this (someone else's lease, a banned peer, a bad signature)."""


class Unauthenticated(DomainError):
    """The peer id / token pair is unknown: register again."""


class Unavailable(DomainError):
    """A transient failure on the coordinator's side (its ledger database cannot be reached): retry."""
