"""Uploaded files: store one (hashed and measured as it streams, refused past the limit),
delete one, and open an owner's file for a run."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import IO, Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files import File
from django.db import transaction

from core.errors import ErrorCode, ToolexecError
from tools.errors import InputInvalid

from ..models import UploadedFile
from ..selectors import as_uuid


class FileTooLarge(ToolexecError):
    code = ErrorCode.FILE_TOO_LARGE


def file_too_large() -> FileTooLarge:
    """FILE_TOO_LARGE, naming TOOLEXEC_MAX_UPLOAD_BYTES (the catalog says it in words; the
    metadata keeps the bytes)."""
    limit = settings.TOOLEXEC_MAX_UPLOAD_BYTES
    return FileTooLarge(limit=limit, metadata={"max_bytes": limit})


class _MeteredFile(File):
    """An upload as storage reads it: hashed and counted on the way, refused past ``limit``.

    Without a ``temporary_file_path`` storage copies it chunk by chunk instead of moving the
    temporary file, so every byte stored is a byte hashed.
    """

    def __init__(self, source: File, limit: int) -> None:
        super().__init__(source, name=source.name)
        self.source = source
        self.limit = limit
        self.digest = hashlib.sha256()
        self.bytes_read = 0

    def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
        for chunk in self.source.chunks(chunk_size):
            self.bytes_read += len(chunk)
            if self.bytes_read > self.limit:
                raise file_too_large()
            self.digest.update(chunk)
            yield chunk


def file_upload(*, owner: AbstractBaseUser, uploaded: File) -> UploadedFile:
    """Store an upload under a name made from its id and record it, with its size and SHA-256
    computed while it streams to storage. Larger than TOOLEXEC_MAX_UPLOAD_BYTES raises
    FILE_TOO_LARGE, and nothing is kept."""
    limit = settings.TOOLEXEC_MAX_UPLOAD_BYTES
    if (uploaded.size or 0) > limit:
        raise file_too_large()
    upload = UploadedFile(
        owner=owner,
        name=(uploaded.name or "").strip()[:255] or "upload",
        content_type=(getattr(uploaded, "content_type", "") or "application/octet-stream")[:255],
    )
    storage = upload.file.storage
    path = upload.file.field.generate_filename(upload, upload.name)  # made from the id alone
    metered = _MeteredFile(uploaded, limit)
    try:
        stored = storage.save(path, metered)
    except BaseException:
        storage.delete(path)  # whatever part was written before the failure
        raise
    upload.file.name = stored
    upload.size_bytes = metered.bytes_read
    upload.sha256 = metered.digest.hexdigest()
    try:
        upload.save(force_insert=True)
    except BaseException:
        storage.delete(stored)
        raise
    return upload


def file_delete(*, file: UploadedFile) -> None:
    """Delete the record and, once that has committed, the stored bytes."""
    storage, path = file.file.storage, file.file.name
    file.delete()
    transaction.on_commit(lambda: storage.delete(path))


def file_meta(upload: UploadedFile) -> dict[str, Any]:
    """What a tool is told about a file (never where it is stored)."""
    return {
        "id": str(upload.pk),
        "name": upload.name,
        "size_bytes": upload.size_bytes,
        "content_type": upload.content_type,
        "sha256": upload.sha256,
    }


NO_UPLOADED_FILE = "No uploaded file with this id."


def file_open_for_run(*, owner_id: int, file_id: str) -> tuple[UploadedFile, IO[bytes]]:
    """The owner's upload ``file_id`` and its bytes opened for reading (the caller closes them).

    Raises INPUT_INVALID naming ``file_id`` when the owner has no such file, and when its
    stored bytes are gone.
    """
    pk = as_uuid(file_id)
    upload = UploadedFile.objects.filter(owner_id=owner_id, pk=pk).first() if pk else None
    if upload is None:
        raise InputInvalid(
            "There is no uploaded file with this id among your files. Upload it with POST /api/v1/files/ "
            "and pass the id it returns.",
            field_errors={"file_id": [NO_UPLOADED_FILE]},
        )
    try:
        stream = upload.file.storage.open(upload.file.name, "rb")
    except FileNotFoundError:
        message = "The contents of this file are no longer stored. Upload it again and use the new id."
        raise InputInvalid(message, field_errors={"file_id": [message]}) from None
    return upload, stream


def file_opener(*, owner_id: int) -> Callable[[str], tuple[dict[str, Any], IO[bytes]]]:
    """What a run of ``owner_id``'s gets as ``ExecutionContext.files``: a file id in, the file's
    metadata and its opened bytes out (see :func:`file_open_for_run`)."""

    def open_file(file_id: str) -> tuple[dict[str, Any], IO[bytes]]:
        upload, stream = file_open_for_run(owner_id=owner_id, file_id=file_id)
        return file_meta(upload), stream

    return open_file
