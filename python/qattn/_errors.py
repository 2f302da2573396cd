"""One exception class per qattn_status, each carrying the library's message.

Every class derives from QattnError and, where one fits, from the builtin
exception a Python caller would expect (ValueError for bad arguments,
MemoryError for allocation failures, ...), so `except ValueError` works too.
"""
from __future__ import annotations

from ._capi import Status


class QattnError(Exception):
    """A qattn call failed. `status` is the qattn_status, `message` the text of
    qattn_last_error (or, for checks the binding makes itself before calling
    the library, the binding's own message)."""

    status = None  # set on each subclass

    def __init__(self, message, status=None):
        if status is not None:
            self.status = Status(status) if status in Status._value2member_map_ else status
        self.message = message
        name = "QATTN_" + self.status.name if isinstance(self.status, Status) else "status %s" % self.status
        super().__init__("%s: %s" % (name, message) if message else name)


class InvalidArgumentError(QattnError, ValueError):
    status = Status.ERR_INVALID_ARGUMENT


class UnsupportedError(QattnError):
    status = Status.ERR_UNSUPPORTED


class OutOfMemoryError(QattnError, MemoryError):
    status = Status.ERR_OUT_OF_MEMORY


class BackendError(QattnError, RuntimeError):
    status = Status.ERR_BACKEND


class DeviceLostError(QattnError, RuntimeError):
    status = Status.ERR_DEVICE_LOST


class NotFoundError(QattnError, LookupError):
    status = Status.ERR_NOT_FOUND


class UnavailableError(QattnError, RuntimeError):
    status = Status.ERR_UNAVAILABLE


class NonfiniteInputError(QattnError, ValueError):
    status = Status.ERR_NONFINITE_INPUT


class InternalError(QattnError, RuntimeError):
    status = Status.ERR_INTERNAL


ERROR_CLASSES = {cls.status: cls for cls in (InvalidArgumentError, UnsupportedError, OutOfMemoryError, BackendError,
                                              DeviceLostError, NotFoundError, UnavailableError, NonfiniteInputError,
                                              InternalError)}


def error_for(status, message):
    """The exception for a non-OK status (a plain QattnError for a status this
    binding does not know, so a newer library's status is still reported)."""
    cls = ERROR_CLASSES.get(status)
    if cls is None:
        return QattnError(message, status=int(status))
    return cls(message)
