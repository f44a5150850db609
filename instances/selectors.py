import uuid
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet

from toolexec.models import ApiToken
from toolexec.sql import Loader, LoaderPair

from .models import Credential, ToolInstance

# ``instance_list(owner=…).get(pk=…)``, its SQL written once: every run looks its instance up.
_OWNED = Loader(ToolInstance, related=("tool", "owner", "owner__credit_account"), where=("id", "owner"))
# The API token of a request (its user, their credit account) beside the instance its URL names
# (its tool): what token authentication and ``instance_of`` load, in one round trip.
_TOKEN_AND_INSTANCE = LoaderPair(
    Loader(ApiToken, related=("user", "user__credit_account"), where=("key_hash",)),
    Loader(ToolInstance, related=("tool",), where=("id",)),
)


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


def instance_of(*, owner: AbstractBaseUser, instance_id: Any) -> ToolInstance | None:
    """The owner's instance ``instance_id`` with what :func:`instance_list` joins; None if they
    have no such instance (or ``instance_id`` is no instance id at all)."""
    try:
        return _OWNED.load(instance_id, owner.pk)
    except ValidationError:
        return None


def token_and_instance(*, key_hash: str, instance_id: Any) -> tuple[ApiToken | None, ToolInstance | None]:
    """The API token whose key hashes to ``key_hash`` (with its user), and the instance
    ``instance_id`` as :func:`instance_of` gives it to that user: None if the user does not own
    it (or ``instance_id`` is no instance id at all)."""
    try:
        token, instance = _TOKEN_AND_INSTANCE.load((key_hash,), (instance_id,))
    except ValidationError:  # a malformed instance id: there is still a token to check
        return _TOKEN_AND_INSTANCE.first.load(key_hash), None
    if token is None or instance is None or instance.owner_id != token.user_id:
        return token, None
    instance.owner = token.user  # the same row, with the credit account instance_of joins
    return token, instance


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
        pinned = {v for v in mapped.values() if _is_uuid(v)}
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
            if _is_uuid(value):
                resolved[name] = next((c for c in owned if str(c.pk) == value), None)
                continue
            of_provider = [c for c in owned if c.provider == value and c.kind in slots[name]["kinds"]]
            active = [c for c in of_provider if c.status == Credential.Status.ACTIVE]
            resolved[name] = (active or of_provider or [None])[0]
        result[str(instance.pk)] = resolved
    return result


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def credential_list(*, owner: AbstractBaseUser, provider: str | None = None) -> QuerySet[Credential]:
    qs = Credential.objects.filter(owner=owner)
    return qs.filter(provider=provider) if provider else qs
