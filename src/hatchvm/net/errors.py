"""Errors of the host network layer, with messages a person can act on."""


class NetworkError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
