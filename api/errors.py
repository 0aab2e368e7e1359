"""The exceptions users see, and the exit status each one maps to.

- `PruneError`: a problem with the user's input or options, explained in one line (CLI exit status 1).
- `UsageError`: a command line or option value that cannot be meant (a NaN ratio, a negative seed); exit 2,
  as argparse does for malformed command lines.
- `OutputPathError`: a refused output path (it is a file the input model reads, a folder, in a missing
  folder, or two outputs are one file); a `PruneError`, raised before any work is done.
- `InvalidResultError`: onnx-prune built a model that fails its own checks before writing (a zero-sized
  dimension, onnxruntime refuses it).  That is a bug of ours, so it is not a `PruneError`: exit 3, and
  nothing is written.

Anything else escaping is a bug too (exit 3); `BUG_REPORT` says what to send.
"""

import contextvars
import functools
import re

# Who is calling: the CLI names options as flags (--target-macs), the Python API as keywords (target_macs).
SPELLING = contextvars.ContextVar("onnx_prune_spelling", default="api")

BUG_REPORT = ("this is a bug in onnx-prune: please report it with the command line, the output of "
              "`onnx-prune analyze --json IN` and, if you can share it, the model")


class PruneError(Exception):
    """A problem with the user's input or options, explained in one line."""

    exit_status = 1


class UsageError(PruneError):
    """An option value or command line that cannot be meant; the CLI exits with status 2."""

    exit_status = 2


class TooLittleDataError(PruneError):
    """The calibration data is too small for the asked method (e.g. obs needs feeds to fit and to check)."""


class OutputPathError(PruneError):
    """An output path that would overwrite something the run reads or writes, or cannot be written."""


class InvalidResultError(RuntimeError):
    """The model built for writing fails onnx-prune's own checks; nothing was written (a bug: exit 3)."""

    exit_status = 3


def exit_status(error: BaseException) -> int:
    """The CLI exit status for an exception: 1 user error, 2 usage error, 3 a bug of ours."""
    return getattr(error, "exit_status", 3) if isinstance(error, (PruneError, InvalidResultError)) else 3


def api_spelling(message: str, keywords) -> str:
    """`message` with every --flag that names one of `keywords` written as that keyword."""
    def keyword(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        return name if name in keywords else match.group(0)
    return re.sub(r"--([a-z][a-z0-9-]*)", keyword, message)


def spelled_for_caller(keywords):
    """Decorator for API entry points: PruneErrors name options the way the caller spelled them."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except PruneError as error:
                if SPELLING.get() == "api" and error.args and isinstance(error.args[0], str):
                    error.args = (api_spelling(error.args[0], keywords),) + error.args[1:]
                raise
        return wrapper
    return decorate
