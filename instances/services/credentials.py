"""Credentials: create, update, delete, revoke, re-encrypt and test them, with an audit entry
for each change; map them to an instance's slots; and, at run time, decrypt the ones a run
resolved (refreshing OAuth tokens about to expire) and record what a tool found wrong with one."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from core.errors import ErrorCode, ToolexecError
from core.redaction import scrub, secrets_add
from tools.errors import CredentialExpired, CredentialInvalid, InputInvalid
from tools.schemas import nul_errors

from ..crypto import SecretUnreadable, reseal
from ..models import Credential, CredentialAuditEntry, ToolInstance
from ..providers import provider_get, providers, reconnect_path
from ..selectors import as_uuid, credential_users

# The secret's fields per kind (DESIGN.md §3): required, then optional.
SECRET_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    Credential.Kind.OAUTH2: (
        frozenset({"access_token"}),
        frozenset({"refresh_token", "token_type", "scope", "id_token"}),
    ),
    Credential.Kind.API_KEY: (frozenset({"api_key"}), frozenset()),
    Credential.Kind.BEARER: (frozenset({"token"}), frozenset()),
    Credential.Kind.BASIC: (frozenset({"username", "password"}), frozenset()),
}


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


class CredentialInUse(ToolexecError):
    code = ErrorCode.INVALID_TRANSITION


def _secret_errors(kind: str, secret: Any) -> dict[str, list[str]]:
    if not isinstance(secret, dict):
        return {"secret": ["Must be an object."]}
    required, optional = SECRET_FIELDS[kind]
    errors: dict[str, list[str]] = {}
    for name in sorted(required - set(secret)):
        errors[f"secret.{name}"] = ["This field is required."]
    for name, value in secret.items():
        if name not in required | optional:
            allowed = ", ".join(sorted(required | optional))
            errors[f"secret.{name}"] = [f"Unknown field for a {kind} secret; it takes: {allowed}."]
        elif not isinstance(value, str) or not value.strip():
            errors[f"secret.{name}"] = ["Must be a non-empty string."]
    return errors


def _check_credential(*, provider: str, kind: str, secret: Any | None, metadata: Any) -> None:
    errors: dict[str, list[str]] = {}
    known = providers()
    if provider not in known:
        errors["provider"] = [f"Unknown provider; use one of: {', '.join(sorted(known))}."]
    elif kind not in known[provider].kinds:
        errors["kind"] = [
            f"{known[provider].display_name} credentials are of kind: {', '.join(known[provider].kinds)}."
        ]
    if kind not in SECRET_FIELDS:
        errors["kind"] = [f"Must be one of: {', '.join(SECRET_FIELDS)}."]
    elif secret is not None:
        errors.update(_secret_errors(kind, secret))
    if not isinstance(metadata, dict):
        errors["metadata"] = ["Must be an object."]
    elif nul_errors(metadata):
        errors.update({f"metadata.{path}": messages for path, messages in nul_errors(metadata).items()})
    elif "header_name" in metadata and not (
        isinstance(metadata["header_name"], str) and HEADER_NAME.fullmatch(metadata["header_name"])
    ):
        errors["metadata.header_name"] = ["Must be an HTTP header name, e.g. X-API-Key."]
    if errors:
        raise InputInvalid("The credential is not valid: " + "; ".join(errors), field_errors=errors)


def credential_check(*, provider: str, kind: str, secret: Any | None, metadata: Any) -> None:
    """Raise INPUT_INVALID (with field errors) unless these make a valid credential; what
    credential_create checks, for forms that want to say so before saving."""
    _check_credential(provider=provider, kind=kind, secret=secret, metadata=metadata)


def credential_create(
    *,
    owner: AbstractBaseUser,
    provider: str,
    kind: str,
    secret: dict[str, Any],
    label: str = "",
    expires_at: datetime | None = None,
    metadata: dict[str, Any] | None = None,
    actor: AbstractBaseUser | None = None,
) -> Credential:
    metadata = metadata or {}
    _check_credential(provider=provider, kind=kind, secret=secret, metadata=metadata)
    credential = Credential(
        owner=owner, provider=provider, kind=kind, label=label, expires_at=expires_at, metadata=metadata
    )
    credential.set_secret(secret)
    with transaction.atomic():
        credential.save()
        given = ["provider", "kind", "label", "secret", "expires_at", "metadata"]
        credential_audit(credential=credential, action=CredentialAuditEntry.Action.CREATED, fields=given, actor=actor)
    return credential


def credential_audit(
    *,
    credential: Credential,
    action: str,
    fields: list[str] | tuple[str, ...] = (),
    actor: AbstractBaseUser | None = None,
    note: str = "",
) -> CredentialAuditEntry:
    """Record a change to ``credential``: the field names, never their values."""
    return CredentialAuditEntry.objects.create(
        credential=credential,
        credential_ref=credential.pk,
        owner_id=credential.owner_id,
        actor=actor if actor is not None and actor.is_authenticated else None,
        action=action,
        fields=sorted(set(fields)),
        note=scrub(note)[:300],
    )


def credential_update(*, credential: Credential, actor: AbstractBaseUser | None = None, **changes: Any) -> Credential:
    """Change label, secret, expires_at or metadata. A new secret makes the credential ACTIVE."""
    allowed = {"label", "secret", "expires_at", "metadata"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"credential_update cannot change {sorted(unknown)}")
    _check_credential(
        provider=credential.provider,
        kind=credential.kind,
        secret=changes.get("secret"),
        metadata=changes.get("metadata", credential.metadata),
    )
    fields = ["updated_at"]
    changed = sorted(changes)
    if "secret" in changes:
        credential.set_secret(changes.pop("secret"))
        credential.status, credential.last_error = Credential.Status.ACTIVE, ""
        fields += ["secret", "fingerprint", "refreshable", "status", "last_error"]
    for name, value in changes.items():
        setattr(credential, name, value)
        fields.append(name)
    with transaction.atomic():
        credential.save(update_fields=fields)
        credential_audit(credential=credential, action=CredentialAuditEntry.Action.UPDATED, fields=changed, actor=actor)
    return credential


def credential_delete(*, credential: Credential, actor: AbstractBaseUser | None = None) -> None:
    """Delete a credential no instance depends on; otherwise refuse, naming the instances."""
    with transaction.atomic():
        Credential.objects.select_for_update().filter(pk=credential.pk).first()
        users = credential_users(credential=credential)
        if users:
            names = ", ".join(f"{i.name!r}" for i in users)
            raise CredentialInUse(
                f"This credential is used by {len(users)} instance{'s' if len(users) != 1 else ''}: {names}. "
                "Map those instances to another credential first.",
                instances=[str(i.pk) for i in users],
            )
        credential_audit(credential=credential, action=CredentialAuditEntry.Action.DELETED, actor=actor)
        credential.delete()


def credential_mark_failed(
    *, credential_id: str, status: str, reason: str, actor: AbstractBaseUser | None = None
) -> bool:
    """A tool found the credential expired, revoked or invalid: record it, once."""
    with transaction.atomic():
        moved = bool(
            Credential.objects.filter(pk=credential_id)
            .exclude(status=status)
            .update(status=status, last_error=reason[:1000], updated_at=timezone.now())
        )
        if moved:
            credential = Credential.objects.only("pk", "owner_id").get(pk=credential_id)
            credential_audit(
                credential=credential,
                action=CredentialAuditEntry.Action.STATUS_CHANGED,
                fields=["status", "last_error"],
                actor=actor,
                note=f"now {status}",
            )
    return moved


def credential_revoke(*, credential: Credential, actor: AbstractBaseUser | None = None) -> bool:
    """Mark ``credential`` REVOKED (runs using it are refused); False if it already was."""
    now = timezone.now()
    with transaction.atomic():
        moved = bool(
            Credential.objects.filter(pk=credential.pk)
            .exclude(status=Credential.Status.REVOKED)
            .update(status=Credential.Status.REVOKED, last_error="Revoked by an operator.", updated_at=now)
        )
        if moved:
            credential_audit(
                credential=credential, action=CredentialAuditEntry.Action.REVOKED, fields=["status"], actor=actor
            )
    if moved:
        credential.status, credential.updated_at = Credential.Status.REVOKED, now
    return moved


def credential_reencrypt(*, credential: Credential, actor: AbstractBaseUser | None = None) -> None:
    """Re-encrypt one secret with the newest (first) key. Raises SecretUnreadable when the
    stored secret does not open with any configured key (it must then be entered again)."""
    with transaction.atomic():
        locked = Credential.objects.select_for_update().get(pk=credential.pk)
        locked.reveal_secret()  # proves it opens, and belongs to this row
        locked.secret = reseal(locked.secret)
        Credential.objects.filter(pk=locked.pk).update(secret=locked.secret)
        credential_audit(
            credential=locked, action=CredentialAuditEntry.Action.REENCRYPTED, fields=["secret"], actor=actor
        )
    credential.secret = locked.secret


def credential_test_connection(*, credential: Credential, actor: AbstractBaseUser | None = None) -> tuple[bool, str]:
    """Ask the provider whether the credential works, with the cheapest call it offers
    (the provider's ``connection_tester``); returns (works, what happened in words)."""
    provider = provider_get(credential.provider)
    if not provider.connection_tester:
        ok, message = (
            False,
            f"{provider.display_name} credentials can't be tested from here: there is no cheap call "
            "that proves them. Run a tool that uses this credential instead.",
        )
    else:
        try:
            ok, message = import_string(provider.connection_tester)(credential=credential)
        except SecretUnreadable:
            ok, message = False, "The stored secret can no longer be read; enter it again."
        except ToolexecError as exc:
            ok, message = False, scrub(exc.detail or exc.code.value)
    message = scrub(message)
    credential_audit(
        credential=credential,
        action=CredentialAuditEntry.Action.TESTED,
        actor=actor,
        note=("works: " if ok else "failed: ") + message,
    )
    return ok, message


def credentials_mark_used(*, credential_ids: list[str]) -> None:
    if credential_ids:
        Credential.objects.filter(pk__in=credential_ids).update(last_used_at=timezone.now())


def credential_rotate_keys(*, batch_size: int = 500) -> tuple[int, list[str]]:
    """Re-encrypt every secret with the first key; returns (re-encrypted, unreadable ids).

    Safe to run again at any time: each pass just re-encrypts with the current first key.
    """
    rotated, unreadable = 0, []
    ids = list(Credential.objects.order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(ids), batch_size):
        with transaction.atomic():
            batch = list(Credential.objects.select_for_update().filter(pk__in=ids[start : start + batch_size]))
            changed = []
            for credential in batch:
                try:
                    credential.reveal_secret()  # proves it opens, and belongs to this row
                    credential.secret = reseal(credential.secret)
                except SecretUnreadable:
                    unreadable.append(str(credential.pk))
                    continue
                changed.append(credential)
            Credential.objects.bulk_update(changed, ["secret"])
            CredentialAuditEntry.objects.bulk_create(
                CredentialAuditEntry(
                    credential=c,
                    credential_ref=c.pk,
                    owner_id=c.owner_id,
                    action=CredentialAuditEntry.Action.REENCRYPTED,
                    fields=["secret"],
                    note="key rotation",
                )
                for c in changed
            )
            rotated += len(changed)
    return rotated, unreadable


# --- Credential mappings ------------------------------------------------------------------


def instance_configure_credentials(*, instance: ToolInstance, mappings: Any) -> ToolInstance:
    """Map the tool's credential slots: a value is a provider key (resolved at run time) or the
    id of one of the owner's credentials (pinned); ``null`` removes a slot's mapping. The
    instance becomes ACTIVE once every required slot is mapped."""
    if not isinstance(mappings, dict) or not mappings:
        raise InputInvalid(
            "credential_mappings must map slot names to a provider or a credential id.",
            field_errors={"credential_mappings": ["Must be a non-empty object."]},
        )
    slots = {slot["name"]: slot for slot in instance.tool.credential_slots}
    pinned_ids = {as_uuid(v) for v in mappings.values() if isinstance(v, str)} - {None}
    owned = {str(c.pk): c for c in Credential.objects.filter(owner_id=instance.owner_id, pk__in=pinned_ids)}
    errors: dict[str, list[str]] = {}
    for name, value in mappings.items():
        path = f"credential_mappings.{name}"
        slot = slots.get(name)
        if slot is None:
            names = ", ".join(slots) or "none"
            errors[path] = [f"{instance.tool.name} has no credential slot {name!r}; its slots are: {names}."]
        elif value is None:
            continue
        elif not isinstance(value, str) or not value:
            errors[path] = ["Must be a provider key or a credential id."]
        elif as_uuid(value) is not None:
            credential = owned.get(str(as_uuid(value)))
            if credential is None:
                errors[path] = ["You have no credential with this id."]
            elif credential.provider != slot["provider"]:
                errors[path] = [f"This slot takes a {slot['provider']} credential, not {credential.provider}."]
            elif credential.kind not in slot["kinds"]:
                errors[path] = [
                    f"This slot takes a credential of kind {' or '.join(slot['kinds'])}, not {credential.kind}."
                ]
        elif value != slot["provider"]:
            errors[path] = [f"This slot takes the provider {slot['provider']!r}, not {value!r}."]
    if errors:
        raise InputInvalid("Some credential mappings are not valid: " + "; ".join(errors), field_errors=errors)

    with transaction.atomic():
        locked = ToolInstance.objects.select_for_update().get(pk=instance.pk)
        merged = dict(locked.credential_mappings)
        for name, value in mappings.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = str(as_uuid(value) or value)
        instance.credential_mappings = merged
        complete = all(merged.get(slot["name"]) for slot in instance.tool.required_slots)
        now = timezone.now()
        updates: dict[str, Any] = {"credential_mappings": merged, "updated_at": now}
        if locked.status == ToolInstance.Status.DRAFT and complete:
            updates["status"] = ToolInstance.Status.ACTIVE
        ToolInstance.objects.filter(pk=instance.pk).update(**updates)
    instance.status = updates.get("status", locked.status)
    instance.updated_at = now
    return instance


# --- Run time -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedCredential:
    slot: str
    credential_id: str
    provider: str
    secret: dict[str, Any] = field(repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)  # non-secret, e.g. an API key's header_name


def credentials_resolve(*, credentials: dict[str, Credential | None]) -> dict[str, ResolvedCredential]:
    """Decrypt the credentials readiness resolved, just before a run, and mark them used.

    A secret that no longer decrypts (keys lost, row tampered with) turns the credential to
    ERROR and refuses the run with CREDENTIAL_INVALID. An OAuth token that expires within
    OAUTH_REFRESH_AHEAD is refreshed first (:func:`credential_secret_fresh`).
    """
    resolved: dict[str, ResolvedCredential] = {}
    for slot, credential in credentials.items():
        if credential is None:
            continue
        try:
            secret = credential.reveal_secret()
        except SecretUnreadable:
            reason = "The stored secret can no longer be read; enter it again."
            credential_mark_failed(credential_id=str(credential.pk), status=Credential.Status.ERROR, reason=reason)
            raise CredentialInvalid(
                reason, **credential_error_params(provider=credential.provider, credential_id=str(credential.pk))
            ) from None
        secret = credential_secret_fresh(credential=credential, secret=secret)
        resolved[slot] = ResolvedCredential(
            slot, str(credential.pk), credential.provider, secret, metadata=dict(credential.metadata)
        )
    credentials_mark_used(credential_ids=[r.credential_id for r in resolved.values()])
    return resolved


def credential_error_params(*, provider: str, credential_id: str | None) -> dict[str, str]:
    """Message parameters of a credential error: the provider's name and where to fix it."""
    return {
        "provider": provider_get(provider).display_name,
        "reconnect_path": reconnect_path(provider=provider, credential_id=credential_id),
    }


_STATUS_FOR_CODE = {
    ErrorCode.CREDENTIAL_EXPIRED: Credential.Status.EXPIRED,
    ErrorCode.CREDENTIAL_REVOKED: Credential.Status.REVOKED,
    ErrorCode.CREDENTIAL_INVALID: Credential.Status.ERROR,
}


def credential_failure_record(*, error: ToolexecError, resolved: dict[str, ResolvedCredential]) -> dict[str, str]:
    """A tool said a credential is expired, revoked or invalid: move that credential to the
    matching status and return the parameters its error message needs.

    The credential is the one of the slot the error names, else the one of its provider, else
    the only one the run had.
    """
    slot = error.params.get("slot")
    candidates = list(resolved.values())
    match = resolved.get(slot) if slot else None
    if match is None and error.provider:
        match = next((r for r in candidates if r.provider == error.provider), None)
    if match is None and len(candidates) == 1:
        match = candidates[0]
    if match is None:
        return {}
    credential_mark_failed(
        credential_id=match.credential_id,
        status=_STATUS_FOR_CODE[error.code],
        reason=scrub(error.detail) or error.code.value,
    )
    return credential_error_params(provider=match.provider, credential_id=match.credential_id)


def credential_refresh(*, credential_id: str, actor: AbstractBaseUser | None = None) -> dict[str, Any]:
    """Refresh an OAuth credential through its provider's refresher; returns the new secret.

    Raises CredentialExpired (and the refresher marks the credential EXPIRED) when the provider
    refuses, or when there is nothing to refresh with.
    """
    credential = Credential.objects.get(pk=credential_id)
    provider = provider_get(credential.provider)
    if not (credential.refreshable and provider.token_refresher):
        raise CredentialExpired(
            "There is no refresh token to renew this access with.",
            **credential_error_params(provider=credential.provider, credential_id=credential_id),
        )
    secret = import_string(provider.token_refresher)(credential=credential)
    secrets_add(secret)
    credential_audit(
        credential=credential,
        action=CredentialAuditEntry.Action.REFRESHED,
        fields=["secret", "expires_at"],
        actor=actor,
    )
    return secret


# --- OAuth tokens refreshed ahead of use --------------------------------------------------

# A run starts with a token that stays good for at least this long, or a refreshed one.
OAUTH_REFRESH_AHEAD = timedelta(minutes=5)

logger = logging.getLogger(__name__)


def credential_secret_fresh(*, credential: Credential, secret: dict[str, Any]) -> dict[str, Any]:
    """``secret``, or a refreshed one when the OAuth token expires within OAUTH_REFRESH_AHEAD.

    The provider's refresher serializes concurrent refreshes of one credential. A refused
    refresh raises CredentialExpired (the credential is then EXPIRED). When the refresh can't
    happen now (the provider out of reach, this server's OAuth client not set up), the run goes
    ahead with the token it has: the tool refreshes on the provider's 401, or says why not.
    """
    provider = provider_get(credential.provider)
    if not (
        credential.kind == Credential.Kind.OAUTH2
        and credential.refreshable
        and credential.expires_at is not None
        and provider.token_refresher
    ):
        return secret
    now = timezone.now()
    if credential.expires_at - now > OAUTH_REFRESH_AHEAD:
        return secret
    try:
        fresh = import_string(provider.token_refresher)(credential=credential)
    except ToolexecError as exc:
        if exc.code not in (ErrorCode.UPSTREAM_ERROR, ErrorCode.UPSTREAM_RATE_LIMITED):
            raise
        logger.warning("Could not refresh credential %s ahead of a run; using the current token", credential.pk)
        return secret
    secrets_add(fresh)
    return fresh
