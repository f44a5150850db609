from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from .models import ToolInstance


def instance_list(
    *, owner: AbstractBaseUser, workflow_id: str | None = None, status: str | None = None
) -> QuerySet[ToolInstance]:
    """The owner's instances with what readiness and the API touch already joined."""
    qs = ToolInstance.objects.filter(owner=owner).select_related("tool", "owner__credit_account")
    if workflow_id:
        qs = qs.filter(workflow_id=workflow_id)
    if status:
        qs = qs.filter(status=status)
    return qs
