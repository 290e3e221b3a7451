"""Errors of guest images and VM disks. The API maps them (api/errors.py): bad user_data is
the caller's mistake (400); a disk that cannot be made is a failure inside (500)."""

from __future__ import annotations


class ImageError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserDataError(ImageError):
    """user_data (or another VM input the disk is made from) is not acceptable."""


class DiskError(ImageError):
    """The VM's disk could not be made."""
