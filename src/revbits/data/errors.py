"""The errors the data layer raises: each names its cause and, where it can, the way out."""

from __future__ import annotations


class DataError(RuntimeError):
    """Base class of every data-layer error."""


class MissingDataError(DataError, FileNotFoundError):
    """A data set is not in the cache. The message says how to get it."""


class UnknownDatasetError(DataError, KeyError):
    """A name that is not in the registry. The message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataFormatError(DataError, ValueError):
    """A file is corrupt, truncated, of the wrong format, or refused as unsafe."""


class SourceError(DataError):
    """One source could not deliver a data set (offline, tool missing, checksum mismatch...)."""


class FetchError(DataError):
    """Every source of a data set failed. The message lists why each one did."""
