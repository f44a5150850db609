"""workflows/definition.py: a workflow definition parsed into steps in dependency order, every
problem reported at once at its path, checked against the owner's instances, and its
$expr/$template references evaluated."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tests.factories import InstanceFactory
from tools.errors import InputInvalid
from workflows.definition import (
    DEFAULT_RETRY_ON,
    ExpressionError,
    Retry,
    Step,
    definition_check,
    definition_of,
    definition_parse,
    definition_validate,
    evaluate,
    is_expression,
)

A = "5f0f6f3c-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
B = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"


def step(step_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "instance": A, **fields}


def expr(source: str) -> dict[str, str]:
    return {"$expr": source}


def problems(raw: Any) -> dict[str, list[str]]:
    """The field errors definition_parse reports for ``raw``."""
    with pytest.raises(InputInvalid) as caught:
        definition_parse(raw)
    return caught.value.metadata["field_errors"]


def problems_at(raw: Any, path: str) -> str:
    """The one message reported at ``path``."""
    found = problems(raw)
    assert path in found, found
    return " ".join(found[path])


EXAMPLE = {
    "inputs": {"type": "object", "properties": {"month": {"type": "string"}}},
    "steps": [
        step("summary", depends_on=["read"], inputs={"data": expr("steps.read.output")}),
        step("list", inputs={"folder_id": "abc"}),
        step("read", for_each=expr("steps.list.output.files"), inputs={"file_id": expr("item.id")}),
        step("audit", instance=B, depends_on=["list"]),
    ],
    "output": expr("steps.summary.output"),
}


# --- structure ---------------------------------------------------------------------------


def test_steps_come_in_dependency_order_with_ties_as_written() -> None:
    definition = definition_parse(EXAMPLE)
    assert list(definition.steps) == ["list", "read", "summary", "audit"]
    assert definition.steps["summary"].position == 0


def test_a_reference_to_a_step_adds_it_to_depends_on() -> None:
    definition = definition_parse(EXAMPLE)
    assert definition.steps["read"].depends_on == ("list",)
    assert definition.steps["read"].refs == {"list"}
    assert definition.steps["audit"].refs == frozenset()


def test_defaults_of_a_plain_and_a_fan_out_step() -> None:
    steps = definition_parse(EXAMPLE).steps
    assert (steps["list"].concurrency, steps["read"].concurrency) == (None, 10)
    assert steps["list"].retry == Retry() and steps["list"].retry.on == DEFAULT_RETRY_ON
    assert (steps["list"].on_error, steps["list"].on_upstream_skipped) == ("fail", "skip")
    assert steps["list"].instance_id == A


def test_descendants_dependents_instances_and_output_refs() -> None:
    definition = definition_parse(EXAMPLE)
    assert definition.dependents("list") == ["read", "audit"]
    assert definition.descendants("list") == {"read", "summary", "audit"}
    assert definition.descendants("summary") == set()
    assert definition.instance_ids == {A, B}
    assert definition.output_refs == {"summary"}
    assert Step.for_output(definition).refs == {"summary"}


def test_retry_delay_grows_by_its_factor() -> None:
    retry = definition_parse({"steps": [step("a", retry={"max_attempts": 4, "backoff_seconds": 2, "factor": 3})]})
    delays = [retry.steps["a"].retry.delay(attempt) for attempt in (1, 2, 3)]
    assert delays == [2, 6, 18]


def test_a_definition_that_is_not_an_object_is_refused() -> None:
    assert problems_at([], "definition") == 'Must be an object with "steps".'


def test_steps_must_be_a_non_empty_list() -> None:
    assert problems_at({"steps": []}, "definition.steps") == "Must have at least 1 step."
    assert problems_at({"steps": {}}, "definition.steps") == "Must be a list of steps."


def test_a_cycle_names_its_steps() -> None:
    raw = {"steps": [step("a"), step("b", depends_on=["c"]), step("c", inputs={"x": expr("steps.b.output")})]}
    assert "b → c → b" in problems_at(raw, "definition.steps[1].depends_on")


def test_unknown_step_in_depends_on() -> None:
    raw = {"steps": [step("a"), step("b", depends_on=["a", "nope"])]}
    assert problems_at(raw, "definition.steps[1].depends_on[1]") == "No step has the id 'nope'."


def test_a_step_cannot_depend_on_itself() -> None:
    raw = {"steps": [step("a", depends_on=["a"])]}
    assert problems_at(raw, "definition.steps[0].depends_on[0]") == "A step cannot depend on itself."


def test_duplicate_id_is_reported_on_the_later_step() -> None:
    found = problems({"steps": [step("a"), step("a")]})
    assert list(found) == ["definition.steps[1].id"]


def test_bad_id_says_what_an_id_is() -> None:
    message = problems_at({"steps": [step("Read-Files")]}, "definition.steps[0].id")
    assert "lowercase letters, digits or underscores, starting with a letter" in message


def test_instance_must_be_a_uuid() -> None:
    assert "UUID" in problems_at({"steps": [step("a", instance="42")]}, "definition.steps[0].instance")


def test_a_step_cannot_read_its_own_output() -> None:
    raw = {"steps": [step("a", inputs={"x": expr("steps.a.output")})]}
    assert "own" in problems_at(raw, "definition.steps[0].inputs.x")


def test_reference_to_an_unknown_step() -> None:
    raw = {"steps": [step("a", inputs={"nested": {"list": [expr("steps.ghost.output")]}})]}
    message = problems_at(raw, "definition.steps[0].inputs.nested.list[0]")
    assert message == "Reads step 'ghost', which this workflow does not have."


@pytest.mark.parametrize("source", ["steps", "steps.*.output", "steps[0]", "keys(steps)"])
def test_steps_without_a_step_name(source: str) -> None:
    raw = {"steps": [step("a"), step("b", inputs={"x": expr(source)})]}
    assert problems_at(raw, "definition.steps[1].inputs.x") == "Name the step: steps.<id>.output."


@pytest.mark.parametrize("source", ["steps.a.foo", "steps.a[0]"])
def test_only_output_status_or_error_follow_a_step(source: str) -> None:
    raw = {"steps": [step("a"), step("b", inputs={"x": expr(source)})]}
    assert "comes .output, .status or .error" in problems_at(raw, "definition.steps[1].inputs.x")


def test_names_inside_a_projection_are_not_references() -> None:
    raw = {"steps": [step("a", inputs={"x": expr("input.rows[?steps == `1`].item")})]}
    assert definition_parse(raw).steps["a"].refs == frozenset()


def test_an_unknown_root_name_is_refused() -> None:
    raw = {"steps": [step("a", inputs={"x": expr("inputs.month")})]}
    assert "Unknown name 'inputs'" in problems_at(raw, "definition.steps[0].inputs.x")


def test_item_outside_a_for_each_steps_inputs() -> None:
    raw = {"steps": [step("a", inputs={"x": expr("item.id")}), step("b", for_each=[1], when=expr("index == `0`"))]}
    found = problems(raw)
    assert found["definition.steps[0].inputs.x"] == ["item and index exist only in the inputs of a step with for_each."]
    assert "definition.steps[1].when" in found


def test_expr_that_does_not_parse() -> None:
    raw = {"steps": [step("a", inputs={"x": expr("input.[")})]}
    assert "Not a valid JMESPath expression" in problems_at(raw, "definition.steps[0].inputs.x")


def test_template_with_a_bad_part() -> None:
    raw = {"steps": [step("a", inputs={"title": {"$template": "Hi {{ input.name }}, {{ length( }}"}})]}
    message = problems_at(raw, "definition.steps[0].inputs.title")
    assert message.startswith("In {{ length( }}: Not a valid JMESPath expression")


def test_unknown_function() -> None:
    raw = {"steps": [step("a", inputs={"x": expr("upper(input.name)")})]}
    assert problems_at(raw, "definition.steps[0].inputs.x") == "Unknown function upper()."


def test_expression_objects_take_no_other_keys() -> None:
    raw = {"steps": [step("a", inputs={"x": {"$expr": "input.a", "default": 1}})]}
    assert "no other keys" in problems_at(raw, "definition.steps[0].inputs.x")


def test_literal_for_each_over_the_fan_out_limit(settings) -> None:
    settings.TOOLEXEC_WORKFLOW_MAX_FANOUT = 3
    raw = {"steps": [step("a", for_each=[1, 2, 3, 4])]}
    assert problems_at(raw, "definition.steps[0].for_each") == "Must have at most 3 items."


def test_too_many_steps(settings) -> None:
    settings.TOOLEXEC_WORKFLOW_MAX_STEPS = 2
    raw = {"steps": [step("a"), step("b"), step("c")]}
    assert problems_at(raw, "definition.steps") == "Must have at most 2 steps."


def test_bad_retry_values() -> None:
    retry = {"max_attempts": 11, "backoff_seconds": -1, "factor": 0.5, "on": ["NOPE"], "jitter": True}
    found = problems({"steps": [step("a", retry=retry)]})
    path = "definition.steps[0].retry"
    assert found[f"{path}.max_attempts"] == ["Must be from 1 to 10."]
    assert found[f"{path}.backoff_seconds"] == ["Must be from 0 to 3600."]
    assert found[f"{path}.factor"] == ["Must be from 1 to 10."]
    assert f"{path}.on[0]" in found and f"{path}.jitter" in found


def test_unknown_keys_in_a_step_and_the_definition() -> None:
    found = problems({"steps": [step("a", name="A")], "version": 2})
    assert "Unknown field" in found["definition.steps[0].name"][0]
    assert "Unknown field" in found["definition.version"][0]


def test_concurrency_needs_for_each() -> None:
    found = problems({"steps": [step("a", concurrency=5), step("b", for_each=[1], concurrency=0)]})
    assert found["definition.steps[0].concurrency"] == ["Only a step with for_each takes concurrency."]
    assert found["definition.steps[1].concurrency"] == ["Must be from 1 to 1000."]


def test_when_is_a_boolean_or_an_expression() -> None:
    assert "true, false" in problems_at({"steps": [step("a", when="yes")]}, "definition.steps[0].when")
    assert definition_parse({"steps": [step("a", when=False)]}).steps["a"].when is False


def test_on_error_and_on_upstream_skipped_choices() -> None:
    found = problems({"steps": [step("a", on_error="ignore", on_upstream_skipped="maybe")]})
    assert found["definition.steps[0].on_error"] == ['Must be "fail" or "continue".']
    assert found["definition.steps[0].on_upstream_skipped"] == ['Must be "skip" or "run".']


def test_bad_inputs_schema() -> None:
    found = problems({"inputs": {"type": "array", "minItems": "two"}, "steps": [step("a")]})
    assert any("Not a valid JSON Schema" in message for message in found["definition.inputs"])
    assert 'its "type" is "object"' in found["definition.inputs"][-1]


def test_every_problem_is_reported_at_once() -> None:
    raw = {"steps": [step("a", depends_on=["zz"]), step("A"), "not a step"], "output": expr("steps.q.output")}
    with pytest.raises(InputInvalid) as caught:
        definition_parse(raw)
    found = caught.value.metadata["field_errors"]
    assert set(found) == {
        "definition.steps[0].depends_on[0]",
        "definition.steps[1].id",
        "definition.steps[2]",
        "definition.output",
    }
    assert caught.value.detail.startswith("The workflow definition has 4 problems; the first is definition.steps[0]")


# --- evaluation --------------------------------------------------------------------------

CONTEXT = {
    "input": {"month": "May", "count": 3, "none": None, "tags": ["a", "b"]},
    "steps": {"list": {"output": {"files": [{"id": "f1"}, {"id": "f2"}]}, "status": "SUCCEEDED", "error": None}},
    "item": {"id": "f2"},
    "index": 1,
}


def test_evaluate_resolves_expressions_and_templates_nested_anywhere() -> None:
    value = {
        "ids": expr("steps.list.output.files[*].id"),
        "deep": [{"file": expr("item.id"), "at": expr("index")}, "literal", 7],
        "title": {"$template": "Report {{ input.month }} ({{ input.count }} files)"},
    }
    assert evaluate(value, CONTEXT) == {
        "ids": ["f1", "f2"],
        "deep": [{"file": "f2", "at": 1}, "literal", 7],
        "title": "Report May (3 files)",
    }


def test_template_renders_null_as_nothing_and_other_values_as_json() -> None:
    template = {"$template": "[{{ input.none }}|{{ input.tags }}|{{ `1.5` }}|{{ `true` }}]"}
    assert evaluate(template, CONTEXT) == '[|["a","b"]|1.5|true]'


def test_a_function_given_the_wrong_type_raises_in_words_without_the_value() -> None:
    with pytest.raises(ExpressionError) as caught:
        evaluate({"data": {"n": expr("length(input.count)")}}, CONTEXT, path="inputs")
    assert caught.value.path == "inputs.data.n"
    assert caught.value.message == "length() cannot take number; it takes string, array or object."


def test_is_expression_looks_everywhere() -> None:
    assert is_expression({"a": [1, {"b": {"$template": "x"}}]})
    assert not is_expression({"a": [1, {"$expr": "x", "other": 1}]})


def test_definition_of_parses_a_version_once() -> None:
    first = definition_of("version-1", EXAMPLE)
    assert definition_of("version-1", {"not": "looked at"}) is first


# --- checks against the owner's instances ------------------------------------------------

JSON_TRANSFORM_SCHEMA = {
    "type": "object",
    "properties": {"expression": {"type": "string", "minLength": 1}, "data": {}},
    "required": ["expression", "data"],
    "additionalProperties": False,
}


def instance(config: dict[str, Any] | None = None) -> SimpleNamespace:
    tool = SimpleNamespace(name="JSON Transform", slug="json-transform", input_schema=JSON_TRANSFORM_SCHEMA)
    return SimpleNamespace(pk=A, config=config or {}, tool=tool)


def check_problems(inputs: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, list[str]]:
    definition = definition_parse({"steps": [step("a", inputs=inputs)]})
    with pytest.raises(InputInvalid) as caught:
        definition_check(definition, instances={A: instance(config)})
    return caught.value.metadata["field_errors"]


def test_an_instance_that_is_not_the_owners_is_not_found() -> None:
    definition = definition_parse({"steps": [step("a"), step("b", instance=B)]})
    with pytest.raises(InputInvalid) as caught:
        definition_check(definition, instances={A: instance({"expression": "x", "data": 1})})
    found = caught.value.metadata["field_errors"]
    assert found == {"definition.steps[1].instance": ["No instance of yours has this id."]}


def test_a_literal_input_is_checked_against_the_tools_schema() -> None:
    found = check_problems({"expression": 5, "data": 1})
    assert found == {"definition.steps[0].inputs.expression": ["Must be of type string."]}


def test_an_expression_input_is_left_for_run_time() -> None:
    definition = definition_parse({"steps": [step("a", inputs={"expression": expr("input.e"), "data": 1})]})
    definition_check(definition, instances={A: instance()})


def test_a_required_input_missing_everywhere() -> None:
    found = check_problems({"data": 1})
    assert found == {"definition.steps[0].inputs.expression": ["Required; give it here or in the instance's config."]}


def test_a_required_input_the_instances_config_gives() -> None:
    definition = definition_parse({"steps": [step("a", inputs={"data": 1})]})
    definition_check(definition, instances={A: instance({"expression": "@"})})


def test_an_input_the_tool_does_not_take() -> None:
    found = check_problems({"expression": "a", "data": 1, "extra": True})
    assert found == {"definition.steps[0].inputs.extra": ["JSON Transform has no input named 'extra'."]}


@pytest.mark.django_db
def test_definition_validate_with_a_real_instance() -> None:
    owned = InstanceFactory(config={"expression": "a"})
    raw = {"steps": [{"id": "a", "instance": str(owned.pk), "inputs": {"data": expr("input")}}]}
    with pytest.raises(InputInvalid):
        definition_validate(raw, instances={})
    assert list(definition_validate(raw, instances={str(owned.pk): owned}).steps) == ["a"]
