import uuid

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q, QuerySet

from .models import Credential, ToolInstance


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


def slot_credentials(*, instance: ToolInstance) -> dict[str, Credential | None]:
    """The credential each mapped slot of ``instance`` resolves to now, in one query.

    A credential id is pinned; a provider key resolves to the owner's newest ACTIVE credential
    of that provider whose kind the slot accepts, or, when none is active, to the newest one
    of any status, so readiness can say what is wrong with it.
    """
    slots = {slot["name"]: slot for slot in instance.tool.credential_slots}
    mapped = {name: value for name, value in instance.credential_mappings.items() if name in slots and value}
    if not mapped:
        return {}
    pinned, provider_keys = set(), set()
    for value in mapped.values():
        (pinned if _is_uuid(value) else provider_keys).add(value)
    candidates = list(
        Credential.objects.filter(owner_id=instance.owner_id)
        .filter(Q(pk__in=pinned) | Q(provider__in=provider_keys))
        .order_by("-updated_at")
    )
    resolved: dict[str, Credential | None] = {}
    for name, value in mapped.items():
        if _is_uuid(value):
            resolved[name] = next((c for c in candidates if str(c.pk) == value), None)
            continue
        of_provider = [c for c in candidates if c.provider == value and c.kind in slots[name]["kinds"]]
        active = [c for c in of_provider if c.status == Credential.Status.ACTIVE]
        resolved[name] = (active or of_provider or [None])[0]
    return resolved


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def credential_list(*, owner: AbstractBaseUser, provider: str | None = None) -> QuerySet[Credential]:
    qs = Credential.objects.filter(owner=owner)
    return qs.filter(provider=provider) if provider else qs
