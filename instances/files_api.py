"""Uploaded files: ``POST /api/v1/files/`` (multipart ``file``), list, retrieve, delete.

Tools that read files (the spreadsheet reader) take the id an upload returns. Every file
belongs to its uploader; anyone else's id answers 404.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import NewestFirstPagination
from core.schema import error_responses

from .models import UploadedFile
from .services.files import file_delete, file_too_large, file_upload

# A multipart body is the file plus its framing (boundaries, part headers, the file name):
# a body declaring more than the limit plus this much cannot hold a file within the limit.
MULTIPART_ALLOWANCE_BYTES = 64 * 1024


class FileSerializer(serializers.ModelSerializer):
    class Meta:
        model = UploadedFile
        fields = ["id", "name", "size_bytes", "content_type", "sha256", "created_at"]
        read_only_fields = fields


class FileUploadSerializer(serializers.Serializer):
    file = serializers.FileField(
        use_url=False,
        help_text="The file, as a multipart/form-data part named file. "
        "Its size may be at most TOOLEXEC_MAX_UPLOAD_BYTES (50 MB by default).",
    )


class UploadLimit(FileUploadHandler):
    """The first upload handler of an upload request: refuses a body declared too large before
    any of it is read, and stops a file at the limit while it streams in (so a body that lies
    about its length, or sends no length, is cut off too)."""

    def __init__(self, request: Any = None, *, limit: int) -> None:
        super().__init__(request)
        self.limit = limit
        self.received = 0

    def handle_raw_input(
        self, input_data: Any, META: dict[str, Any], content_length: int, boundary: bytes, encoding: str | None = None
    ) -> None:
        upload_refuse_declared(content_length, self.limit)

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        if self.received > self.limit:
            raise file_too_large()
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the handlers after this one keep the file


def upload_refuse_declared(content_length: int | None, limit: int) -> None:
    if content_length and content_length > limit + MULTIPART_ALLOWANCE_BYTES:
        raise file_too_large()


@extend_schema_view(
    create=extend_schema(
        request={"multipart/form-data": FileUploadSerializer},
        responses={201: FileSerializer, **error_responses(413)},
        description="Upload a file (multipart/form-data, part name file). Larger than "
        "TOOLEXEC_MAX_UPLOAD_BYTES answers 413 FILE_TOO_LARGE.",
    ),
)
class FileViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your uploaded files, newest first; tools such as the spreadsheet reader take their ids."""

    serializer_class = FileSerializer
    pagination_class = NewestFirstPagination
    parser_classes = [MultiPartParser]

    def get_queryset(self) -> QuerySet[UploadedFile]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return UploadedFile.objects.none()
        return UploadedFile.objects.filter(owner=self.request.user)

    def get_serializer_class(self) -> type[serializers.Serializer]:
        return FileUploadSerializer if self.action == "create" else FileSerializer

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        if self.action == "create":
            # Before authentication: a session's CSRF check reads the body, and the limit
            # must be in place before anything does.
            limit = settings.TOOLEXEC_MAX_UPLOAD_BYTES
            upload_refuse_declared(_declared_length(request), limit)
            request.upload_handlers.insert(0, UploadLimit(request, limit=limit))
        super().initial(request, *args, **kwargs)

    def create(self, request: Request) -> Response:
        data = FileUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        upload = file_upload(owner=request.user, uploaded=data.validated_data["file"])
        return Response(FileSerializer(upload).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: UploadedFile) -> None:
        file_delete(file=instance)


def _declared_length(request: Request) -> int | None:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
