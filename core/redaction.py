"""Keeping secrets out of records, logs and error messages.

Two layers: values under secret-looking keys are masked wherever inputs are recorded, and the
secret values a run has resolved are remembered (in a context variable, for the run's thread)
so a logging filter and the error recorder can blank them wherever they turn up in text.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

REDACTED = "[REDACTED]"
_SECRET_KEY = re.compile(
    r"(pass(word|wd)?|secret|token|api[-_]?key|authorization|credential|private[-_]?key|cookie|session)",
    re.IGNORECASE,
)
# "Authorization: Bearer abc", "token=abc", '"password": "abc"' and the like, in free text.
_SECRET_TEXT = re.compile(
    r"(?P<lead>(?:authorization|proxy-authorization)\s*[:=]\s*(?:bearer|basic|token)?\s*"
    r"|[\"']?(?:access_token|refresh_token|id_token|client_secret|password|api[-_]?key|token|secret)[\"']?\s*[:=]\s*[\"']?)"
    r"(?P<value>[^\s\"'&,;}]+)",
    re.IGNORECASE,
)
MIN_SECRET_LENGTH = 4  # shorter values would blank ordinary words

# A set per secrets_in_play block; threads started inside it (with a copied context) share it,
# so a secret added mid-run (a refreshed token) is blanked everywhere the run writes.
_known_secrets: contextvars.ContextVar[frozenset[str] | set[str]] = contextvars.ContextVar(
    "toolexec_secrets", default=frozenset()
)


def redact(value: Any) -> Any:
    """A copy of ``value`` with the values of secret-looking keys replaced, at any depth."""
    if isinstance(value, dict):
        return {
            key: REDACTED if isinstance(key, str) and _SECRET_KEY.search(key) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return scrub(value)
    return value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


@contextmanager
def secrets_in_play(secrets: Iterable[Any]) -> Iterator[None]:
    """Within the block, every string inside ``secrets`` is blanked by :func:`scrub`."""
    found = {s for secret in secrets for s in _strings(secret) if len(s) >= MIN_SECRET_LENGTH}
    token = _known_secrets.set(set(_known_secrets.get()) | found)
    try:
        yield
    finally:
        _known_secrets.reset(token)


def secrets_add(secret: Any) -> None:
    """Blank ``secret`` too, for the rest of the current secrets_in_play block (if any)."""
    current = _known_secrets.get()
    if isinstance(current, set):
        current.update(s for s in _strings(secret) if len(s) >= MIN_SECRET_LENGTH)


def scrub(text: str) -> str:
    """``text`` with known secret values and secret-looking assignments blanked."""
    for secret in sorted(_known_secrets.get(), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SECRET_TEXT.sub(lambda m: m.group("lead") + REDACTED, text)


def scrub_known(value: Any) -> Any:
    """``value`` (any JSON) with the known secret values blanked; nothing else is touched."""
    known = sorted(_known_secrets.get(), key=len, reverse=True)
    if not known:
        return value
    if isinstance(value, str):
        for secret in known:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {key: scrub_known(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_known(item) for item in value]
    return value


def scrub_envelope(body: dict[str, Any]) -> dict[str, Any]:
    """An error envelope with every string in it scrubbed."""
    return _scrub_all(body)


def _scrub_all(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: _scrub_all(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub_all(item) for item in value]
    return value


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a bad format string: logging reports it on emit
        return
    cleaned = scrub(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and record.exc_info[1] is not None:
        traceback_text = logging.Formatter().formatException(record.exc_info)
        cleaned = scrub(traceback_text)
        if cleaned != traceback_text:
            # The traceback goes into the message, scrubbed; the raw one is dropped.
            record.msg, record.args = f"{record.getMessage()}\n{cleaned}", None
            record.exc_info, record.exc_text = None, None


def install_log_redaction() -> None:
    """Scrub every log record as it is made, whichever handler (file, console, test capture,
    RQ's) ends up writing it."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "toolexec_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _scrub_record(record)
        return record

    factory.toolexec_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
