"""Errors calibdrop raises for bad input: each says what was wrong and what to do."""


class CalibdropError(Exception):
    """Base of calibdrop's user-facing errors; the CLI prints them without a traceback."""


class InputError(CalibdropError, ValueError):
    """An argument or an input file is not usable as given."""


class NonFiniteActivationError(CalibdropError, FloatingPointError):
    """A residual-stream activation is NaN or infinite."""


class ChecksumError(CalibdropError):
    """A downloaded or cached artifact does not have its pinned sha256."""


class FetchError(CalibdropError):
    """A built-in model or data source could not be fetched from its registry."""


class CalibdropWarning(UserWarning):
    """calibdrop recovered from something the user should know about: a discarded cache entry, a substituted
    Debian revision, a text cut to ``max_length``."""
