"""The one exception the data loaders raise."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data set could not be found, fetched or parsed.

    The message always says what was wrong (which file, which check failed) and what the
    user can do about it (which directory to pass, which file to replace, whether to go
    online). It subclasses :class:`ValueError` so that callers catching bad-input errors
    generically still see it.
    """
