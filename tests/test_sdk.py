"""The Tool SDK a tool author writes against (ExecutionContext, Tool, the registry) and the
input checks in tools/schemas.py, whose messages name fields but never repeat values."""

from __future__ import annotations

import json
import threading
import time
from decimal import Decimal

import pytest
from jsonschema.exceptions import SchemaError

from core.errors import ErrorCode
from tests.tools import NoopTool, PricedTool
from tools import registry
from tools.builtin.json_transform import JsonTransform
from tools.errors import Cancelled, CredentialMissing, ToolTimeout
from tools.schemas import ROOT, defaults_errors, errors_by_field, summary
from tools.sdk import ASYNC, SYNC, ExecutionContext, Tool

# --- ExecutionContext: progress ---------------------------------------------------------


def _context_with_sink(**kwargs) -> tuple[ExecutionContext, list[tuple[int, str]]]:
    calls: list[tuple[int, str]] = []
    ctx = ExecutionContext(execution_id="e-1", progress_sink=lambda p, s, i, n: calls.append((p, s)), **kwargs)
    return ctx, calls


def test_progress_is_clamped_between_0_and_100():
    ctx, calls = _context_with_sink()

    ctx.progress(-20, "warming up")
    assert ctx.percent == 0
    ctx.progress(250, "done")
    assert ctx.percent == 100

    assert calls == [(0, "warming up"), (100, "done")]


def test_progress_never_goes_down():
    ctx, calls = _context_with_sink()

    ctx.progress(60, "step 2")
    ctx.progress(30, "step 2")
    ctx.progress(59.9)

    assert (ctx.percent, ctx.step) == (60, "step 2")
    assert calls == [(60, "step 2")]


def test_progress_calls_the_sink_only_when_percent_or_step_changes():
    ctx, calls = _context_with_sink()

    ctx.progress(10, "Fetching")
    ctx.progress(10, "Fetching")
    ctx.progress(10.7)  # whole percents only: still 10
    ctx.progress(10, "Parsing")
    ctx.progress(20)  # keeps the current step
    ctx.progress(20, None)

    assert calls == [(10, "Fetching"), (10, "Parsing"), (20, "Parsing")]


def test_progress_without_a_sink_just_records():
    ctx = ExecutionContext(execution_id="e-1")

    ctx.progress(45, "Processing data")

    assert (ctx.percent, ctx.step) == (45, "Processing data")


def test_progress_is_a_cancellation_point():
    ctx, calls = _context_with_sink(cancel_probe=lambda: True)

    with pytest.raises(Cancelled):
        ctx.progress(5, "starting")


# --- ExecutionContext: usage, credentials -----------------------------------------------


def test_usage_accumulates_exactly_whatever_number_type_is_given():
    ctx = ExecutionContext(execution_id="e-1")

    ctx.usage(1)
    ctx.usage(0.1)
    ctx.usage(Decimal("2.5"))
    ctx.usage(0.2)

    assert ctx.units == Decimal("3.8")


def test_credential_gives_a_copy_of_the_mapped_secret():
    ctx = ExecutionContext(execution_id="e-1", credentials={"OAUTH_TOKEN": {"access_token": "abc"}})

    secret = ctx.credential("OAUTH_TOKEN")
    secret["access_token"] = "changed"

    assert ctx.credential("OAUTH_TOKEN") == {"access_token": "abc"}


def test_credential_of_an_unmapped_slot_raises_credential_missing():
    ctx = ExecutionContext(execution_id="e-1", credentials={"OAUTH_TOKEN": {"access_token": "abc"}})

    with pytest.raises(CredentialMissing) as caught:
        ctx.credential("API_KEY")

    assert caught.value.code == ErrorCode.CREDENTIAL_MISSING
    assert caught.value.params["slot"] == "API_KEY"


# --- ExecutionContext: stopping ---------------------------------------------------------


def test_check_cancelled_passes_before_the_deadline_and_without_a_cancel():
    ctx = ExecutionContext(execution_id="e-1", deadline=time.monotonic() + 60, cancel_probe=lambda: False)

    ctx.check_cancelled()


def test_check_cancelled_raises_tool_timeout_after_the_deadline():
    ctx = ExecutionContext(execution_id="e-1", deadline=time.monotonic() - 0.01, timeout_seconds=5)

    with pytest.raises(ToolTimeout) as caught:
        ctx.check_cancelled()

    assert caught.value.code == ErrorCode.TIMEOUT
    assert caught.value.envelope({"tool": "Slow"})["error_message"] == (
        "Slow did not finish within 5 seconds and was stopped."
    )
    with pytest.raises(ToolTimeout):  # and keeps raising it
        ctx.check_cancelled()


def test_check_cancelled_raises_cancelled_when_the_probe_says_so():
    cancelled = threading.Event()
    probes: list[bool] = []

    def probe() -> bool:
        probes.append(cancelled.is_set())
        return cancelled.is_set()

    ctx = ExecutionContext(execution_id="e-1", cancel_probe=probe)
    ctx.check_cancelled()
    cancelled.set()

    with pytest.raises(Cancelled):
        ctx.check_cancelled()
    with pytest.raises(Cancelled):
        ctx.check_cancelled()
    assert probes == [False, True]  # once stopped, the probe is not asked again


def test_the_first_stop_reason_wins():
    ctx = ExecutionContext(execution_id="e-1")

    ctx.stop("cancelled")
    ctx.stop("timeout")

    with pytest.raises(Cancelled):
        ctx.check_cancelled()


def test_sleep_wakes_at_once_when_the_run_is_stopped():
    ctx = ExecutionContext(execution_id="e-1")
    stopper = threading.Timer(0.1, ctx.stop, args=("cancelled",))
    started = time.monotonic()
    stopper.start()

    with pytest.raises(Cancelled):
        ctx.sleep(30)

    assert time.monotonic() - started < 5
    stopper.join()


def test_sleep_waits_its_time_when_nothing_stops_it():
    ctx = ExecutionContext(execution_id="e-1")
    started = time.monotonic()

    ctx.sleep(0.1)

    assert time.monotonic() - started >= 0.09


def test_sleep_does_not_sleep_past_the_deadline():
    ctx = ExecutionContext(execution_id="e-1", deadline=time.monotonic() + 0.1, timeout_seconds=1)
    started = time.monotonic()

    with pytest.raises(ToolTimeout):
        ctx.sleep(2)

    assert time.monotonic() - started < 1


def test_the_context_logger_carries_the_execution_id():
    ctx = ExecutionContext(execution_id="e-42", tool_slug="json-transform")

    assert ctx.logger.logger.name == "toolexec.tool.json-transform"
    assert ctx.logger.extra == {"execution_id": "e-42"}


# --- Tool -------------------------------------------------------------------------------


def test_credits_for_is_the_base_price_plus_units_rounded_to_four_places():
    assert PricedTool.credits_for(Decimal("0")) == Decimal("0.01")
    assert PricedTool.credits_for(Decimal("2.5")) == Decimal("1.26")
    assert PricedTool.credits_for(Decimal("0.00003")).as_tuple().exponent == -4
    assert PricedTool.credits_for(Decimal("0.00003")) == Decimal("0.0100")
    assert JsonTransform.credits_for(Decimal("1000")) == Decimal("0.01")
    assert NoopTool.credits_for(Decimal("7")) == Decimal("0")


def test_a_tools_run_must_be_written():
    class Unfinished(Tool):
        slug = "unfinished"
        name = "Unfinished"

    with pytest.raises(NotImplementedError):
        Unfinished().run({}, ExecutionContext(execution_id="e-1"))


# --- Registry ---------------------------------------------------------------------------


def test_registry_refuses_what_is_not_a_tool_class():
    class NotATool:
        slug = "not-a-tool"
        name = "Not a tool"

    for candidate in (NotATool, NoopTool(), "tests.tools.NoopTool", dict):
        with pytest.raises(TypeError):
            registry.register(candidate)
    assert registry.get_tool("not-a-tool") is None


def test_registry_refuses_a_tool_without_slug_or_name():
    class Nameless(Tool):
        slug = "test-nameless"

    class Slugless(Tool):
        name = "Slugless"

    for tool in (Nameless, Slugless):
        with pytest.raises(ValueError):
            registry.register(tool)
    assert registry.get_tool("test-nameless") is None


@pytest.mark.parametrize("modes", [frozenset(), frozenset({"batch"}), frozenset({SYNC, "stream"})])
def test_registry_refuses_a_tool_with_bad_modes(modes):
    bad = type("BadModes", (Tool,), {"slug": "test-bad-modes", "name": "Bad modes", "modes": modes})

    with pytest.raises(ValueError, match="modes"):
        registry.register(bad)
    assert registry.get_tool("test-bad-modes") is None


@pytest.mark.parametrize(
    "schema",
    [{"type": "objekt"}, {"type": "object", "properties": []}, {"type": "object", "required": "name"}],
)
def test_registry_refuses_an_invalid_input_schema(schema):
    bad = type("BadSchema", (Tool,), {"slug": "test-bad-schema", "name": "Bad schema", "input_schema": schema})

    with pytest.raises(SchemaError):
        registry.register(bad)
    assert registry.get_tool("test-bad-schema") is None


def test_registry_refuses_a_second_class_with_the_same_slug():
    class Impostor(Tool):
        slug = "json-transform"
        name = "Impostor"

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Impostor)

    assert registry.get_tool("json-transform") is JsonTransform


def test_registering_the_same_class_again_is_harmless():
    assert registry.register(JsonTransform) is JsonTransform
    assert registry.get_tool("json-transform") is JsonTransform


def test_registry_accepts_a_valid_tool_and_unregister_forgets_it():
    class Valid(Tool):
        slug = "test-valid-registration"
        name = "Valid"
        modes = frozenset({SYNC, ASYNC})

    try:
        registry.register(Valid)
        assert registry.get_tool("test-valid-registration") is Valid
        assert "test-valid-registration" in registry.registered_tools()
    finally:
        registry.unregister("test-valid-registration")
    assert registry.get_tool("test-valid-registration") is None
    registry.unregister("test-valid-registration")  # forgetting twice is fine


def test_load_implementation_turns_every_failure_into_import_error():
    for path in ("no_such_module.Tool", "tools.sdk.NoSuchTool", "json.dumps", "nodots"):
        with pytest.raises(ImportError):
            registry.load_implementation(path)
    assert registry.load_implementation("tools.builtin.json_transform.JsonTransform") is JsonTransform


# --- tools/schemas.py -------------------------------------------------------------------

SECRET = "sk_live_9f8e7d6c5b4a_SUPERSECRET"

STRICT_SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "mode": {"enum": ["fast", "slow"]},
        "version": {"const": 2},
        "code": {"type": "string", "maxLength": 5},
        "digits": {"type": "string", "pattern": "^[0-9]+$"},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "flag": {"type": "boolean"},
        "either": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
        "anything_but_text": {"not": {"type": "string"}},
        "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 5},
        "options": {
            "type": "object",
            "properties": {"depth": {"type": "integer"}, "name": {"type": "string"}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "rows": {
            "type": "array",
            "items": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
        },
    },
    "required": ["count", "mode"],
    "additionalProperties": False,
}


def test_valid_data_has_no_errors():
    assert errors_by_field(STRICT_SCHEMA, {"count": 1, "mode": "fast", "options": {"name": "x"}}) == {}


def test_errors_by_field_names_every_failing_field():
    data = {
        "count": "three",
        "code": "too long",
        "ratio": 3,
        "options": {"depth": "deep", "colour": "red"},
        "rows": [{"id": 1}, {}, {"id": "x"}],
        "surprise": 1,
    }

    errors = errors_by_field(STRICT_SCHEMA, data)

    assert errors == {
        "count": ["Must be of type integer."],
        "mode": ["This field is required."],
        "code": ["Must be at most 5 characters long."],
        "ratio": ["Must be at most 1."],
        "options.depth": ["Must be of type integer."],
        "options.name": ["This field is required."],
        "options.colour": ["Unknown field."],
        "rows.1.id": ["This field is required."],
        "rows.2.id": ["Must be of type integer."],
        "surprise": ["Unknown field."],
    }


def test_a_field_breaking_two_rules_gets_both_messages():
    schema = {"type": "object", "properties": {"pin": {"type": "string", "minLength": 4, "pattern": "^[0-9]+$"}}}

    errors = errors_by_field(schema, {"pin": "ab"})

    assert sorted(errors["pin"]) == ["Must be at least 4 characters long.", "Must match the pattern ^[0-9]+$."]


def test_a_non_object_body_is_a_root_error():
    assert errors_by_field(STRICT_SCHEMA, [1, 2]) == {ROOT: ["Must be of type object."]}


@pytest.mark.parametrize(
    "field",
    [
        "count",
        "mode",
        "version",
        "code",
        "digits",
        "ratio",
        "flag",
        "either",
        "anything_but_text",
        "tags",
        "options",
        "rows",
        "unknown_field",
    ],
)
def test_messages_never_repeat_a_submitted_value(field):
    data = {"count": 1, "mode": "fast", field: SECRET}

    errors = errors_by_field(STRICT_SCHEMA, data)

    assert errors, f"{field} should have failed"
    assert SECRET not in json.dumps(errors)
    assert "SUPERSECRET" not in summary(errors)


def test_messages_never_repeat_secrets_nested_or_at_the_root():
    data = {
        "count": 1,
        "mode": "fast",
        "tags": [1, SECRET, {"token": SECRET}],
        "options": {"name": "x", "depth": SECRET, "extra": SECRET},
        "rows": [{"id": SECRET}],
    }

    errors = errors_by_field(STRICT_SCHEMA, data)

    assert set(errors) == {"tags.1", "tags.2", "options.depth", "options.extra", "rows.0.id"}
    assert "SUPERSECRET" not in json.dumps(errors)
    assert "SUPERSECRET" not in json.dumps(errors_by_field(STRICT_SCHEMA, SECRET))


def test_summary_names_every_failing_field_in_one_sentence():
    errors = errors_by_field(STRICT_SCHEMA, {"count": "x"})

    assert summary(errors) == "The inputs are not valid. count: Must be of type integer.; mode: This field is required."


def test_pattern_properties_are_not_unknown_fields():
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "patternProperties": {"^x-": {"type": "string"}},
        "additionalProperties": False,
    }

    assert errors_by_field(schema, {"name": "a", "x-trace": "1", "bogus": 2}) == {"bogus": ["Unknown field."]}


def test_defaults_errors_ignores_required_fields():
    assert defaults_errors(STRICT_SCHEMA, {}) == {}
    assert defaults_errors(JsonTransform.input_schema, {"data": {"a": 1}}) == {}


def test_defaults_errors_still_checks_types_and_unknown_fields():
    errors = defaults_errors(STRICT_SCHEMA, {"count": SECRET, "nope": 1})

    assert errors == {"count": ["Must be of type integer."], "nope": ["Unknown field."]}
    assert SECRET not in json.dumps(errors)


def test_defaults_errors_keeps_required_inside_a_nested_default():
    # Inputs override defaults field by field at the top level only, so a nested default is
    # used whole and must be complete.
    assert defaults_errors(STRICT_SCHEMA, {"options": {}}) == {"options.name": ["This field is required."]}


def test_defaults_errors_does_not_change_the_schema():
    schema = json.loads(json.dumps(STRICT_SCHEMA))

    defaults_errors(schema, {})

    assert schema == STRICT_SCHEMA


@pytest.mark.django_db
def test_a_wrong_typed_secret_is_not_echoed_by_the_api(api, user, make_instance):
    instance = make_instance("test-priced", owner=user)

    response = api.post(f"/api/v1/instances/{instance.pk}/execute-sync", {"units": SECRET}, format="json")

    assert response.status_code == 400
    body = response.json()
    assert body["error_code"] == "INPUT_INVALID"
    assert body["metadata"]["field_errors"] == {"units": ["Must be of type number."]}
    assert "SUPERSECRET" not in response.content.decode()
