"""A small client for the Google Drive v3 and Sheets v4 REST APIs, over urllib3.

Google's answers become the typed errors of ``tools.errors``, each saying whether trying again
can help: a 401 asks the caller's ``refresh`` callback for a new access token once and repeats
the request; rate limits are retryable and carry ``retry_after_seconds``; a missing file, a
refused scope or a bad request are permanent.

Base URLs come from settings (GOOGLE_DRIVE_API_URL, GOOGLE_SHEETS_API_URL) so tests and
staging can point them at a stand-in.
"""

from __future__ import annotations

import email.utils
import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import certifi
import urllib3
from django.conf import settings

from ..errors import CredentialExpired, CredentialInvalid, ErrorCode, ToolexecError, UpstreamError, UpstreamRateLimited

PROVIDER = "google"
CHUNK_BYTES = 64 * 1024
ERROR_BODY_BYTES = 64 * 1024  # enough of an error answer to read Google's reason from
DEFAULT_RETRY_AFTER_SECONDS = 30
USER_AGENT = "toolexec-google-drive-reader/1.0"

# One pool for the process: connections to Google are reused across runs. Retries are ours
# to decide (a 401 refreshes, a rate limit goes back to the caller), so urllib3 does none.
http = urllib3.PoolManager(
    num_pools=4,
    maxsize=8,
    retries=False,
    timeout=urllib3.Timeout(connect=10.0, read=60.0),
    cert_reqs="CERT_REQUIRED",
    ca_certs=certifi.where(),
)

RATE_LIMIT_REASONS = frozenset(
    {"rateLimitExceeded", "userRateLimitExceeded", "sharingRateLimitExceeded", "RATE_LIMIT_EXCEEDED"}
)
QUOTA_REASONS = frozenset({"dailyLimitExceeded", "quotaExceeded"})
SCOPE_REASONS = frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"})

FILE_NOT_FOUND_MESSAGE = (
    "We couldn't find that file in your Google Drive, or it isn't shared with the connected account."
)
SCOPE_MESSAGE = (
    "the access it granted does not include reading your Drive files and spreadsheets. "
    "Reconnect it and allow read access to Google Drive and Google Sheets."
)
# Drive's 403 reasons that are about one file, not the account, in words.
FILE_REFUSALS = {
    "insufficientFilePermissions": "the connected account is not allowed to read this file.",
    "cannotDownloadFile": "the owner of this file has turned off downloading it.",
    "fileNotDownloadable": "this kind of Google file cannot be downloaded, only exported.",
    "exportSizeLimitExceeded": "the document is too large for Google to export as text.",
    "appNotAuthorizedToFile": "this app has not been given access to the file.",
    "domainPolicy": "your Google Workspace administrator does not allow this app to read Drive files.",
}


class FileNotFound(ToolexecError):
    """Drive or Sheets answered 404: no such file, or not shared with the account."""

    code = ErrorCode.NOT_FOUND


class AccessTokenRefused(CredentialExpired):
    """Google answered 401 to the access token."""


class BadRequest(UpstreamError):
    """Google answered 400 (e.g. a range it can't parse); ``google_message`` is its words."""

    def __init__(self, google_message: str, **kwargs: Any) -> None:
        super().__init__(google_message, **kwargs)
        self.google_message = google_message


class DownloadTooLarge(ToolexecError):
    code = ErrorCode.INPUT_INVALID


@dataclass(frozen=True)
class GoogleError:
    """The parts of a Google error answer that decide what it means."""

    status: int
    message: str
    reasons: frozenset[str]
    retry_after: int | None

    @classmethod
    def parse(cls, status: int, body: bytes, headers: Any) -> GoogleError:
        message, reasons = "", set()
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = {}
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            if error.get("status"):
                reasons.add(str(error["status"]))
            for item in _dicts(error.get("errors")):
                if item.get("reason"):
                    reasons.add(str(item["reason"]))
            for item in _dicts(error.get("details")):
                if item.get("reason"):
                    reasons.add(str(item["reason"]))
        elif isinstance(error, str):  # the OAuth endpoints' shape: {"error": "...", "error_description": "..."}
            reasons.add(error)
            message = str(data.get("error_description") or error)
        return cls(status, message, frozenset(reasons), retry_after_seconds(headers.get("Retry-After")))


def _dicts(value: Any) -> Iterable[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def retry_after_seconds(value: str | None) -> int | None:
    """A Retry-After header (seconds, or an HTTP date) as whole seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, int(when.timestamp() - time.time()))


def error_for(error: GoogleError, *, service: str) -> ToolexecError:
    """The typed error for a Google error answer (``service``: "Google Drive" or "Google Sheets")."""
    status, reasons = error.status, error.reasons
    if status == 401:
        return AccessTokenRefused(f"{service} refused the access token (401).", provider=PROVIDER)
    if status == 429 or reasons & RATE_LIMIT_REASONS or (status == 403 and "RESOURCE_EXHAUSTED" in reasons):
        return UpstreamRateLimited(
            f"{service} is limiting requests ({', '.join(sorted(reasons)) or status}).",
            provider=PROVIDER,
            retry_after_seconds=error.retry_after if error.retry_after is not None else DEFAULT_RETRY_AFTER_SECONDS,
        )
    if status == 403 and reasons & QUOTA_REASONS:
        return UpstreamRateLimited(
            f"{service}'s daily quota for this app is used up.",
            provider=PROVIDER,
            retry_after_seconds=error.retry_after if error.retry_after is not None else 3600,
        )
    if status == 403 and (reasons & SCOPE_REASONS or "insufficient authentication scopes" in error.message.lower()):
        return CredentialInvalid(SCOPE_MESSAGE, provider=PROVIDER)
    if status == 404:
        return FileNotFound(FILE_NOT_FOUND_MESSAGE, field_errors={"file_id": [FILE_NOT_FOUND_MESSAGE]})
    if status == 403:
        refusal = next((FILE_REFUSALS[r] for r in sorted(reasons) if r in FILE_REFUSALS), None)
        detail = refusal or f"{service} refused the request: {error.message or 'permission denied'}."
        return UpstreamError(detail, provider=PROVIDER, metadata={"can_retry": False})
    if status == 400:
        return BadRequest(
            f"{service} could not handle the request: {error.message or 'bad request'}.",
            provider=PROVIDER,
            metadata={"can_retry": False},
        )
    if status >= 500:
        return UpstreamError(
            f"{service} is having trouble right now (HTTP {status}); try again in a little while.",
            provider=PROVIDER,
        )
    return UpstreamError(
        f"{service} answered HTTP {status}: {error.message or 'unexpected answer'}.",
        provider=PROVIDER,
        metadata={"can_retry": False},
    )


def size_words(size: int) -> str:
    """A byte count as people say it: 50 MB, 200 KB, 512 bytes."""
    for unit, factor in (("MB", 1024 * 1024), ("KB", 1024)):
        if size >= factor:
            return f"{round(size / factor, 1):g} {unit}"
    return f"{size} bytes"


def too_large(limit: int) -> DownloadTooLarge:
    words = size_words(limit)
    message = f"The file is larger than {words}, the most Google Drive Reader reads."
    return DownloadTooLarge(message, field_errors={"file_id": [message]})


def a1_sheet_range(sheet_name: str) -> str:
    """The A1 range of a whole sheet: its name in single quotes, embedded quotes doubled, as
    the Sheets API requires."""
    return "'" + sheet_name.replace("'", "''") + "'"


def _path(value: str) -> str:
    return quote(value, safe="")


class GoogleClient:
    """Drive and Sheets calls with one access token.

    ``refresh`` returns a new access token; it is called at most once, on the first 401.
    """

    def __init__(self, access_token: str, *, refresh: Callable[[], str] | None = None) -> None:
        self._token = access_token
        self._refresh = refresh
        self._refreshed = False

    # --- Drive ---

    def file_metadata(self, file_id: str) -> dict[str, Any]:
        url = f"{settings.GOOGLE_DRIVE_API_URL}/files/{_path(file_id)}"
        fields = {"fields": "id,name,mimeType,size,modifiedTime", "supportsAllDrives": "true"}
        return self.get_json(url, fields, service="Google Drive")[0]

    def file_export(
        self, file_id: str, mime_type: str, *, limit: int, on_bytes: Callable[[int], None] | None = None
    ) -> bytes:
        url = f"{settings.GOOGLE_DRIVE_API_URL}/files/{_path(file_id)}/export"
        return self.download(url, {"mimeType": mime_type}, limit=limit, on_bytes=on_bytes, service="Google Drive")

    def file_media(self, file_id: str, *, limit: int, on_bytes: Callable[[int], None] | None = None) -> bytes:
        url = f"{settings.GOOGLE_DRIVE_API_URL}/files/{_path(file_id)}"
        fields = {"alt": "media", "supportsAllDrives": "true"}
        return self.download(url, fields, limit=limit, on_bytes=on_bytes, service="Google Drive")

    # --- Sheets ---

    def sheet_titles(self, spreadsheet_id: str) -> list[str]:
        url = f"{settings.GOOGLE_SHEETS_API_URL}/spreadsheets/{_path(spreadsheet_id)}"
        data, _ = self.get_json(url, {"fields": "sheets.properties"}, service="Google Sheets")
        sheets = sorted((s.get("properties", {}) for s in _dicts(data.get("sheets"))), key=lambda p: p.get("index", 0))
        return [str(p.get("title", "")) for p in sheets]

    def sheet_values(self, spreadsheet_id: str, a1_range: str, *, limit: int) -> tuple[dict[str, Any], int]:
        """``spreadsheets.values.get`` of ``a1_range``: the answer and its size in bytes."""
        url = f"{settings.GOOGLE_SHEETS_API_URL}/spreadsheets/{_path(spreadsheet_id)}/values/{_path(a1_range)}"
        return self.get_json(url, {"majorDimension": "ROWS"}, service="Google Sheets", limit=limit)

    # --- HTTP ---

    def get_json(
        self, url: str, fields: dict[str, str], *, service: str, limit: int | None = None
    ) -> tuple[dict[str, Any], int]:
        body = self.download(url, fields, limit=limit or settings.TOOLEXEC_MAX_DOWNLOAD_BYTES, service=service)
        try:
            data = json.loads(body)
        except ValueError:
            raise UpstreamError(f"{service} answered with something that is not JSON.", provider=PROVIDER) from None
        if not isinstance(data, dict):
            raise UpstreamError(f"{service} answered with unexpected JSON.", provider=PROVIDER)
        return data, len(body)

    def download(
        self,
        url: str,
        fields: dict[str, str],
        *,
        limit: int,
        service: str,
        on_bytes: Callable[[int], None] | None = None,
    ) -> bytes:
        """GET ``url`` and read its body in chunks, refusing it past ``limit`` bytes;
        ``on_bytes`` hears the running total after every chunk."""
        response = self._send(url, fields, service=service)
        buffer, total = io.BytesIO(), 0
        try:
            for chunk in response.stream(CHUNK_BYTES):
                total += len(chunk)
                if total > limit:
                    raise too_large(limit)
                buffer.write(chunk)
                if on_bytes is not None:
                    on_bytes(total)
        except BaseException as exc:
            response.close()  # a half-read connection must not go back to the pool
            if isinstance(exc, urllib3.exceptions.HTTPError):
                raise _unreachable(service, exc) from None
            raise
        finally:
            response.release_conn()
        return buffer.getvalue()

    def _send(self, url: str, fields: dict[str, str], *, service: str) -> urllib3.BaseHTTPResponse:
        while True:
            headers = {"Authorization": f"Bearer {self._token}", "User-Agent": USER_AGENT}
            try:
                response = http.request("GET", url, fields=fields, headers=headers, preload_content=False)
            except urllib3.exceptions.HTTPError as exc:
                raise _unreachable(service, exc) from None
            if response.status < 400:
                return response
            try:
                body = response.read(ERROR_BODY_BYTES)
            except urllib3.exceptions.HTTPError:
                body = b""
            finally:
                response.close()
                response.release_conn()
            error = GoogleError.parse(response.status, body, response.headers)
            if error.status == 401 and self._refresh is not None and not self._refreshed:
                self._refreshed = True
                self._token = self._refresh()
                continue
            raise error_for(error, service=service)


def _unreachable(service: str, exc: Exception) -> UpstreamError:
    # NewConnectionError is a ConnectTimeoutError too, for historical reasons: refused is not slow.
    slow = isinstance(exc, urllib3.exceptions.TimeoutError) and not isinstance(
        exc, urllib3.exceptions.NewConnectionError
    )
    kind = "did not answer in time" if slow else "could not be reached"
    return UpstreamError(f"{service} {kind}; try again in a little while.", provider=PROVIDER)
