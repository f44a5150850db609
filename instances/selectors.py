import uuid
from typing import Any

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
    return slot_credentials_many([instance]).get(str(instance.pk), {})


def _mapped(instance: ToolInstance) -> dict[str, str]:
    slots = {slot["name"] for slot in instance.tool.credential_slots}
    return {name: value for name, value in instance.credential_mappings.items() if name in slots and value}


def slot_credentials_many(instances: list[ToolInstance]) -> dict[str, dict[str, Credential | None]]:
    """:func:`slot_credentials` of each instance (keyed by its id), for all of them in one query."""
    wanted = Q()
    mapped_of: dict[str, dict[str, str]] = {}
    for instance in instances:
        mapped = _mapped(instance)
        if not mapped:
            continue
        mapped_of[str(instance.pk)] = mapped
        pinned = {v for v in mapped.values() if as_uuid(v) is not None}
        provider_keys = set(mapped.values()) - pinned
        wanted |= Q(owner_id=instance.owner_id) & (Q(pk__in=pinned) | Q(provider__in=provider_keys))
    if not mapped_of:
        return {}
    candidates = list(Credential.objects.filter(wanted).order_by("-updated_at"))
    result: dict[str, dict[str, Credential | None]] = {}
    for instance in instances:
        mapped = mapped_of.get(str(instance.pk))
        if mapped is None:
            continue
        slots = {slot["name"]: slot for slot in instance.tool.credential_slots}
        owned = [c for c in candidates if c.owner_id == instance.owner_id]
        resolved: dict[str, Credential | None] = {}
        for name, value in mapped.items():
            if as_uuid(value) is not None:
                resolved[name] = next((c for c in owned if str(c.pk) == value), None)
                continue
            of_provider = [c for c in owned if c.provider == value and c.kind in slots[name]["kinds"]]
            active = [c for c in of_provider if c.status == Credential.Status.ACTIVE]
            resolved[name] = (active or of_provider or [None])[0]
        result[str(instance.pk)] = resolved
    return result


def as_uuid(value: Any) -> uuid.UUID | None:
    """``value`` as a UUID (an id in a mapping or a request), or None when it is not one."""
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def credential_list(*, owner: AbstractBaseUser, provider: str | None = None) -> QuerySet[Credential]:
    qs = Credential.objects.filter(owner=owner)
    return qs.filter(provider=provider) if provider else qs


def credential_users(*, credential: Credential) -> list[ToolInstance]:
    """The owner's instances that would lose this credential if it went away: those pinning
    it, and those mapping its provider when no other ACTIVE credential of it remains."""
    others_of_provider = (
        Credential.objects.filter(
            owner_id=credential.owner_id, provider=credential.provider, status=Credential.Status.ACTIVE
        )
        .exclude(pk=credential.pk)
        .exists()
    )
    users = []
    for instance in ToolInstance.objects.filter(owner_id=credential.owner_id).order_by("name"):
        for value in instance.credential_mappings.values():
            if value == str(credential.pk) or (value == credential.provider and not others_of_provider):
                users.append(instance)
                break
    return users
