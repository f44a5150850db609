"""``toolexec.sql.Loader``: a select_related query for one row, its SQL written once, which must
load what the ORM loads, relations included, in one statement (used by token authentication,
the instance a run looks up, and the job a worker claims)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from instances.models import CreditAccount, ToolInstance
from instances.selectors import instance_of
from toolexec.models import ApiToken, token_hash
from toolexec.sql import Loader, LoaderPair

pytestmark = [pytest.mark.django_db]

OWNED = Loader(ToolInstance, related=("tool", "owner", "owner__credit_account"), where=("id", "owner"))


def fields(obj) -> dict:
    return {field.attname: getattr(obj, field.attname) for field in obj._meta.concrete_fields}


def test_it_loads_what_select_related_loads_in_one_statement(make_instance, user, django_assert_num_queries):
    CreditAccount.objects.update_or_create(owner=user, defaults={"balance": Decimal("2.5")})
    instance = make_instance("test-noop", owner=user, config={"echo": "default"})
    expected = ToolInstance.objects.select_related("tool", "owner__credit_account").get(pk=instance.pk)

    with CaptureQueriesContext(connection) as captured:
        loaded = OWNED.load(str(instance.pk), user.pk)  # an id as text, prepared as the ORM would
    with django_assert_num_queries(0):
        pairs = [
            (loaded, expected),
            (loaded.tool, expected.tool),
            (loaded.owner, expected.owner),
            (loaded.owner.credit_account, expected.owner.credit_account),
        ]
        assert loaded.owner.credit_account.owner is loaded.owner  # the one-to-one, both ways

    assert len(captured) == 1
    for got, want in pairs:
        assert fields(got) == fields(want), type(want).__name__  # JSON, decimals, times converted alike
        assert not got._state.adding and got._state.db == "default"


def test_a_reverse_one_to_one_with_no_row_is_known_absent(make_instance, user, django_assert_num_queries):
    instance = make_instance("test-noop", owner=user)
    CreditAccount.objects.filter(owner=user).delete()

    loaded = OWNED.load(instance.pk, user.pk)

    with django_assert_num_queries(0):
        assert getattr(loaded.owner, "credit_account", None) is None


def test_no_matching_row_loads_as_none(make_instance, user, other_user):
    instance = make_instance("test-noop", owner=user)
    assert OWNED.load(instance.pk, other_user.pk) is None  # every where column must match
    assert instance_of(owner=other_user, instance_id=instance.pk) is None


def test_a_value_that_is_no_id_is_refused_as_the_orm_refuses_it(user):
    with pytest.raises(ValidationError):
        OWNED.load("not-a-uuid", user.pk)
    assert instance_of(owner=user, instance_id="not-a-uuid") is None


def test_a_token_loads_with_its_user():
    user = get_user_model().objects.create(username="token-owner")
    token, key = ApiToken.issue(user=user)
    loaded = Loader(ApiToken, related=("user",), where=("key_hash",)).load(token_hash(key))
    assert loaded.pk == token.pk and fields(loaded.user) == fields(user)


TOKEN = Loader(ApiToken, related=("user",), where=("key_hash",))
BY_ID = Loader(ToolInstance, related=("tool",), where=("id",))


def test_a_pair_loads_both_rows_as_their_loaders_do_in_one_statement(make_instance, user, other_user):
    _, key = ApiToken.issue(user=user)
    instance = make_instance("test-noop", owner=other_user, config={"echo": "default"})

    with CaptureQueriesContext(connection) as captured:
        token, loaded = LoaderPair(TOKEN, BY_ID).load((token_hash(key),), (str(instance.pk),))

    assert len(captured) == 1
    want_token, want_instance = TOKEN.load(token_hash(key)), BY_ID.load(instance.pk)
    for got, want in [(token, want_token), (token.user, want_token.user), (loaded, want_instance)]:
        assert fields(got) == fields(want), type(want).__name__
    assert fields(loaded.tool) == fields(want_instance.tool)


def test_a_pair_without_its_second_row_gives_none_for_it(user):
    _, key = ApiToken.issue(user=user)

    token, loaded = LoaderPair(TOKEN, BY_ID).load((token_hash(key),), ("00000000-0000-0000-0000-000000000000",))

    assert token.user == user and loaded is None


def test_a_pair_without_its_first_row_gives_neither(make_instance, user):
    instance = make_instance("test-noop", owner=user)

    assert LoaderPair(TOKEN, BY_ID).load(("no such hash",), (instance.pk,)) == (None, None)


def test_a_pair_refuses_a_value_that_is_no_id_as_its_loader_does(user):
    with pytest.raises(ValidationError):
        LoaderPair(TOKEN, BY_ID).load(("a hash",), ("not-a-uuid",))


@pytest.mark.postgres
def test_the_locked_relation_is_named_in_the_statement(make_instance, user):
    sql, _ = Loader(ToolInstance, related=("tool", "owner"), where=("id",), lock="owner").sql()
    assert sql.endswith("FOR NO KEY UPDATE OF t2")  # the owner's row, not the instance's or the tool's
