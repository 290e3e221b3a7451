"""One error tree: each class knows its HTTP status; the API renders {"error": message}."""


class HatchError(Exception):
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(HatchError):
    status = 400


class Unauthorized(HatchError):
    status = 401


class QuotaExceeded(HatchError):
    status = 403


class NotFound(HatchError):
    status = 404


class Conflict(HatchError):
    status = 409


class PayloadTooLarge(HatchError):
    status = 413


class InternalError(HatchError):
    status = 500


class BadGateway(HatchError):
    """Something behind hatchd (a guest) answered nonsense."""

    status = 502


class NotSupported(HatchError):
    """The VM's VMM driver lacks a capability the operation needs."""

    status = 501


class BackendUnavailable(HatchError):
    status = 503


class GatewayTimeout(HatchError):
    """Something behind hatchd (a guest) stopped answering midway."""

    status = 504
