"""What can go wrong talking to a guest agent. Each message is fit for a VM's state_reason."""

from __future__ import annotations


class AgentError(Exception):
    """The guest agent could not do what was asked; the message says why."""


class AgentUnavailable(AgentError):
    """There is no agent port to talk to (the VM's VMM does not run, or never had one)."""


class AgentTimeout(AgentError):
    """The agent did not answer in time (absent from the image, not started, stuck)."""


class AgentRefused(AgentError):
    """The agent answered with an ERROR frame: its code, the guest's errno behind it (if
    any), the request field at fault (if any), and its message (the exception's text)."""

    def __init__(
        self,
        code: int,
        message: str,
        errno: int | None = None,
        field: str | None = None,
        detail: str = "",
    ) -> None:
        self.code = code
        self.errno = errno
        self.field = field
        self.detail = detail or message  # the agent's own words
        super().__init__(message)


class ProtocolError(AgentError):
    """The peer broke the framing or the protocol: this connection cannot go on."""
