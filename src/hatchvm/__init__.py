"""hatchvm: self-hosted microVMs behind one REST API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hatchvm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
