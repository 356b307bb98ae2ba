"""Mistakes a user can fix, and the entry-point wrapper that reports them as one plain message.

Code raises `UserError` (or a subclass, e.g. `DatasetError`) with a message that names the file or
config key and the fix. Every CLI's main function is wrapped in `report_user_errors`: such an error
-- also when it arrives wrapped, e.g. in Hydra's InstantiationException -- prints `error: <message>`
to stderr and exits with status 2, without a traceback or Hydra's hint. `HYDRA_FULL_ERROR=1` or
`MOBILESAM_SE_DEBUG=1` re-raise it, traceback included.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Optional, Tuple, Type, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input (config, data, checkpoint, missing download): the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; also a ValueError, for callers that catch those."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be loaded into the model: the message names the file and the keys."""


def debug_enabled() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HYDRA_FULL_ERROR", "MOBILESAM_SE_DEBUG"))


def _user_error_types(extra: Tuple[Type[BaseException], ...]) -> Tuple[Type[BaseException], ...]:
    # Imported lazily: this module must stay light.
    from omegaconf.errors import MissingMandatoryValue

    return (UserError, MissingMandatoryValue, *extra)


def find_user_error(exc: BaseException, types: Tuple[Type[BaseException], ...]) -> Optional[BaseException]:
    """The first exception of `types` in `exc`'s cause / context chain (instantiate wraps ours)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def message_of(exc: BaseException) -> str:
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "a key"
        return f"config key {key} has no value (it is ???): set it on the command line, e.g. {key}=<value>"
    text = str(exc)
    return text.strip("'\"") if isinstance(exc, KeyError) else text


def report_user_errors(fn: Optional[F] = None, *, extra: Tuple[Type[BaseException], ...] = ()) -> Any:
    """Decorator for a CLI main: user errors become `error: <message>` on stderr and exit status 2.

    `extra`: more exception types this CLI reports as user errors (e.g. FileNotFoundError)."""

    def wrap(f: F) -> F:
        @functools.wraps(f)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return f(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - filtered below; everything else re-raised as is
                found = find_user_error(exc, _user_error_types(extra))
                if found is None or debug_enabled():
                    raise
                print(f"error: {message_of(found)}", file=sys.stderr, flush=True)
                sys.exit(EXIT_USER_ERROR)

        return inner  # type: ignore[return-value]

    return wrap(fn) if fn is not None else wrap


__all__ = ["UserError", "ConfigError", "report_user_errors", "find_user_error", "debug_enabled", "EXIT_USER_ERROR"]
