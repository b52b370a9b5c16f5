"""The agent's exception tree, the only one the rest of the code raises.

    EdgeAgentError
    ├── ConfigError            config or profile is wrong; carries every problem found
    ├── PayloadError           one device message cannot be decoded (counted, set aside)
    ├── RetriableError         try again later (connection lost, timeout, 5xx, 429)
    │   └── NotConnected       a connector/sink is not connected; the supervisor reconnects
    ├── PermanentError         will never succeed as sent (4xx, schema); dead-lettered
    └── StoreError             the outbox cannot be opened or is not durable as configured

Library errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong in a config or profile file, located for the user."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class ConfigError(EdgeAgentError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class PayloadError(EdgeAgentError):
    """A device message could not be decoded; ``reason`` is a short stable cause name."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class RetriableError(EdgeAgentError):
    """A transient failure: the same operation may succeed later.

    ``retry_after_secs`` is the peer's own hint (HTTP Retry-After), when it gave one.
    """

    def __init__(self, message: str, *, retry_after_secs: float | None = None):
        self.retry_after_secs = retry_after_secs
        super().__init__(message)


class NotConnected(RetriableError):
    """The component lost (or never had) its connection; the supervisor restarts it."""


class PermanentError(EdgeAgentError):
    """The peer rejected this for good; retrying the same request cannot help."""


class StoreError(EdgeAgentError):
    """The outbox database cannot be used safely (not durable, corrupt, not writable)."""
