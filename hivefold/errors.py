"""Domain errors shared by both roles; each message says what to fix."""


class HivefoldError(Exception):
    """Base class: an error a user can act on. The CLI prints its message without a traceback."""


class ConfigError(HivefoldError, ValueError):
    """A flag, config value or input file is invalid."""


class CorpusError(ConfigError):
    """The corpus is missing, empty or unreadable."""


class IntegrityError(HivefoldError):
    """Bytes did not match their pinned sha256 (shard, checkpoint or run spec)."""
