"""Errors a user can cause.

Every exception raised because of something the user gave us (a path, an image, a model folder,
a dataset record, a flag) is a :class:`UserError`. The CLI prints its message on one line and exits
non-zero; ``--debug`` shows the traceback. Messages say what was wrong, where, and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user supplied is wrong; the message says what, where and what to do."""


class ImageError(UserError):
    """An image could not be read or is not usable."""


class ModelError(UserError):
    """A model folder, checkpoint or preset is missing, incomplete or inconsistent."""


class DataError(UserError):
    """A dataset file or record is invalid."""


class RuntimeNotAvailable(UserError):
    """A runtime backend is unknown, or its packages are not installed."""
