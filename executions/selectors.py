from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from .models import Execution


def execution_list(
    *,
    owner: AbstractBaseUser,
    instance_id: str | None = None,
    status: str | None = None,
    mode: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> QuerySet[Execution]:
    """The owner's executions, newest first, with the tool joined for its slug and name."""
    qs = Execution.objects.filter(owner=owner).select_related("tool")
    if instance_id:
        qs = qs.filter(instance_id=instance_id)
    if status:
        qs = qs.filter(status=status)
    if mode:
        qs = qs.filter(mode=mode)
    if created_after:
        qs = qs.filter(created_at__gte=created_after)
    if created_before:
        qs = qs.filter(created_at__lt=created_before)
    return qs
