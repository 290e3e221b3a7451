"""Public identifiers: a prefix and random lowercase letters/digits."""

import secrets
import string

_ALPHABET = string.ascii_lowercase + string.digits


def random_token(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_id(prefix: str, length: int = 12) -> str:
    """new_id("vm") -> 'vm_k3j9x0a1b2c3'."""
    return f"{prefix}_{random_token(length)}"


DEFAULT_IMAGE_ID = "img_default"
