"""Workflow definitions (DESIGN.md §10): the JSON a workflow version saves, checked into a
:class:`Definition`, and the JMESPath references inside it evaluated.

A step's ``inputs``, ``when`` and ``for_each`` and the workflow's ``output`` may hold
``{"$expr": "<JMESPath>"}`` (the expression's value) and ``{"$template": "text {{ <JMESPath> }}"}``
(a string) anywhere inside them. Expressions read a context of ``input`` (the run's inputs),
``steps.<id>.output|status|error`` and, in the inputs of a ``for_each`` step, ``item`` and
``index``. Nothing else is ever evaluated: only JMESPath's built-in functions exist.

Messages in errors never repeat the values a run passes: those may hold secrets.
"""

from __future__ import annotations

import heapq
import json
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Any

import jmespath
from django.conf import settings
from jmespath.exceptions import (
    ArityError,
    EmptyExpressionError,
    IncompleteExpressionError,
    JMESPathError,
    JMESPathTypeError,
    LexerError,
    ParseError,
    VariadictArityError,
)
from jmespath.parser import ParsedResult
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from core.errors import ErrorCode
from tools.errors import FieldErrors, InputInvalid
from tools.schemas import errors_by_field

STEP_ID = re.compile(r"[a-z][a-z0-9_]{0,62}")
DEFINITION_KEYS = ("inputs", "steps", "output")
STEP_KEYS = (
    "id",
    "instance",
    "inputs",
    "depends_on",
    "for_each",
    "concurrency",
    "when",
    "retry",
    "on_error",
    "on_upstream_skipped",
)
RETRY_KEYS = ("max_attempts", "backoff_seconds", "factor", "on")
ON_ERROR = ("fail", "continue")
ON_UPSTREAM_SKIPPED = ("skip", "run")
DEFAULT_CONCURRENCY = 10
MAX_CONCURRENCY = 1000
# What a step retries on when its retry names no error codes: the failures that may pass.
DEFAULT_RETRY_ON = frozenset(
    {ErrorCode.UPSTREAM_ERROR, ErrorCode.UPSTREAM_RATE_LIMITED, ErrorCode.TIMEOUT, ErrorCode.WORKER_LOST}
)

ERROR_CODES = frozenset(code.value for code in ErrorCode)

CONTEXT_NAMES = ("input", "steps", "item", "index")
STEP_FIELDS = ("output", "status", "error")
# The functions of the JMESPath specification, the only ones an expression may call.
JMESPATH_FUNCTIONS = frozenset(
    "abs avg ceil contains ends_with floor join keys length map max max_by merge min min_by not_null "
    "reverse sort sort_by starts_with sum to_array to_number to_string type values".split()
)
# A "}}" ends a template part, so a part cannot hold one: write "{a: {b: c} }" with a space.
TEMPLATE_PART = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)

ID_WORDS = "Must be 1 to 63 lowercase letters, digits or underscores, starting with a letter."
ITEM_WORDS = "item and index exist only in the inputs of a step with for_each."


@dataclass(frozen=True)
class Retry:
    max_attempts: int = 1
    backoff_seconds: float = 0
    factor: float = 1
    on: frozenset[str] = DEFAULT_RETRY_ON  # never empty: an empty "on" in JSON means this default

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``, once attempt ``attempt`` failed."""
        return self.backoff_seconds * self.factor ** (attempt - 1)


@dataclass(frozen=True)
class Step:
    id: str
    instance_id: str  # str(uuid), canonical form
    inputs: dict[str, Any]  # as written: may hold $expr/$template anywhere
    depends_on: tuple[str, ...]  # explicit and implicit (from refs), in the order the steps are written
    for_each: Any | None  # {"$expr": ...}, a literal list, or None
    concurrency: int | None  # iterations in flight at once for a for_each step; None for a plain one
    when: Any | None  # {"$expr": ...}, a boolean, or None
    retry: Retry
    on_error: str  # "fail" | "continue"
    on_upstream_skipped: str  # "skip" | "run"
    refs: frozenset[str]  # the steps its expressions read (a subset of depends_on)
    position: int  # its index in the definition's "steps" list: error paths name it

    @cached_property
    def input_refs(self) -> frozenset[str]:
        """The steps its inputs read (its ``when`` and ``for_each`` may read others): what an
        iteration's hand-over loads, not a fan-out's whole list again for each item."""
        found: set[str] = set()
        for source in _sources(self.inputs):
            found |= _reading(source).steps
        return frozenset(found & self.refs)

    @classmethod
    def for_output(cls, definition: Definition) -> Step:
        """A stand-in step for evaluating the workflow's output: it reads what the output reads."""
        refs = definition.output_refs
        return cls(
            id="",
            instance_id="",
            inputs={},
            depends_on=tuple(step_id for step_id in definition.steps if step_id in refs),
            for_each=None,
            concurrency=None,
            when=None,
            retry=Retry(),
            on_error="fail",
            on_upstream_skipped="run",
            refs=refs,
            position=-1,
        )


@dataclass(frozen=True)
class Definition:
    inputs_schema: dict[str, Any]  # JSON Schema of a run's inputs; {} takes any object
    steps: dict[str, Step]  # a topological order: dependencies first, ties in the order written
    output: Any  # as written, may hold expressions; None when absent

    @cached_property
    def _dependents(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {step_id: [] for step_id in self.steps}
        for step in self.steps.values():
            for dependency in step.depends_on:
                found[dependency].append(step.id)
        return found

    def dependents(self, step_id: str) -> list[str]:
        """The steps that depend on ``step_id`` directly, in topological order."""
        return list(self._dependents[step_id])

    def descendants(self, step_id: str) -> set[str]:
        """Every step downstream of ``step_id``, not itself."""
        found: set[str] = set()
        todo = [step_id]
        while todo:
            for dependent in self._dependents[todo.pop()]:
                if dependent not in found:
                    found.add(dependent)
                    todo.append(dependent)
        return found

    @property
    def instance_ids(self) -> set[str]:
        return {step.instance_id for step in self.steps.values()}

    @cached_property
    def output_refs(self) -> frozenset[str]:
        """The steps the workflow's output reads."""
        found: set[str] = set()
        for source in _sources(self.output):
            found |= _reading(source).steps
        return frozenset(found & set(self.steps))


class ExpressionError(Exception):
    """An expression failed while it was evaluated (a function given the wrong type); ``path``
    says where it is, e.g. "inputs.file_id"."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


# Expressions -----------------------------------------------------------------------------


def _expression_kind(value: Any) -> str | None:
    """ "$expr" or "$template" when ``value`` is an expression object (that one key alone)."""
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        if key in ("$expr", "$template"):
            return key
    return None


def is_expression(value: Any) -> bool:
    """Whether ``value`` holds a $expr or $template anywhere inside it."""
    if _expression_kind(value):
        return True
    if isinstance(value, dict):
        return any(is_expression(item) for item in value.values())
    if isinstance(value, list):
        return any(is_expression(item) for item in value)
    return False


def _sources(value: Any) -> Iterator[str]:
    """The JMESPath source of every expression and template part inside ``value``."""
    kind = _expression_kind(value)
    if kind == "$expr" and isinstance(value["$expr"], str):
        yield value["$expr"]
    elif kind == "$template" and isinstance(value["$template"], str):
        yield from (part.strip() for part in TEMPLATE_PART.findall(value["$template"]))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _sources(item)
    elif isinstance(value, list):
        for item in value:
            yield from _sources(item)


@lru_cache(maxsize=1024)
def _compiled(source: str) -> ParsedResult:
    return jmespath.compile(source)


def _child(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def evaluate(value: Any, context: dict[str, Any], path: str = "") -> Any:
    """``value`` with every $expr and $template inside it replaced by what it gives in
    ``context``; literals are returned as they are."""
    kind = _expression_kind(value)
    if kind == "$expr":
        return _search(value["$expr"], context, path)
    if kind == "$template":
        return TEMPLATE_PART.sub(lambda part: _text(_search(part[1].strip(), context, path)), value["$template"])
    if isinstance(value, dict):
        return {key: evaluate(item, context, _child(path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [evaluate(item, context, f"{path}[{index}]") for index, item in enumerate(value)]
    return value


def _search(source: str, context: dict[str, Any], path: str) -> Any:
    try:
        return _compiled(source).search(context)
    except JMESPathError as exc:
        raise ExpressionError(path, _runtime_words(exc)) from None


def _text(value: Any) -> str:
    """A value as a template writes it: strings as they are, null as nothing, the rest as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _syntax_words(exc: JMESPathError) -> str:
    if isinstance(exc, EmptyExpressionError):
        return "The expression is empty."
    if isinstance(exc, IncompleteExpressionError):
        return "The expression ends too early."
    if isinstance(exc, LexerError):
        return f"Unexpected character {exc.lexer_value!r} at position {exc.lexer_position}."
    if isinstance(exc, ParseError):
        return f"Unexpected {exc.token_value!r} at position {exc.lex_position}."
    return str(exc).strip().splitlines()[0]


def _runtime_words(exc: JMESPathError) -> str:
    # Built from the error's fields: its str() repeats the value, which may be a secret.
    if isinstance(exc, JMESPathTypeError):
        return f"{exc.function_name}() cannot take {exc.actual_type}; it takes {_either(exc.expected_types)}."
    if isinstance(exc, VariadictArityError):
        return f"{exc.function_name}() takes at least {exc.expected_arity} arguments, not {exc.actual_arity}."
    if isinstance(exc, ArityError):
        return f"{exc.function_name}() takes {exc.expected_arity} arguments, not {exc.actual_arity}."
    return _syntax_words(exc)


# Path: the field names that lead from the context's root to what a node reads (() is the root
# itself), or None once anything else (a projection's element, a function's result) is between.
Path = tuple[str, ...] | None


@dataclass(frozen=True)
class _Reading:
    """What one expression reads from the context."""

    steps: frozenset[str]  # the step ids of every steps.<id>
    uses_item: bool  # it reads item or index
    problems: tuple[str, ...]  # misreadings, in words


@lru_cache(maxsize=1024)
def _reading(source: str) -> _Reading:
    """What the expression ``source`` (which must compile) reads: a walk of JMESPath's parsed tree."""
    reader = _Reader()
    reader.use(reader.read(_compiled(source).parsed, ()))
    return _Reading(frozenset(reader.steps), reader.uses_item, tuple(dict.fromkeys(reader.problems)))


class _Reader:
    """Walks a parsed expression, following which nodes read from the context's root.

    A field read at the root (``steps``) or along a chain of fields from it (``steps.a.output``,
    ``@.steps.a``, ``steps.a | output``) names a place in the context; anything read against a
    projection's elements (``x[*].steps``, ``x[?steps]``) or inside ``&expr`` does not, since
    JMESPath has no way back to the root from there. ``read`` returns the :data:`Path` a node
    stands for; ``use`` is called on every value that is not followed by a further field (used
    as a whole, or projected, indexed, flattened), which is where a bare ``steps`` is wrong.
    """

    def __init__(self) -> None:
        self.steps: set[str] = set()
        self.uses_item = False
        self.problems: list[str] = []

    def read(self, node: dict[str, Any], at: Path) -> Path:
        kind, children = node["type"], node["children"]
        if kind in ("literal", "index", "slice"):
            return None
        if kind == "field":
            return self._field(at, node["value"]) if at is not None else None
        if kind in ("current", "identity"):
            return at
        if kind == "subexpression":  # a.b.c: each child reads what the one before gave
            for child in children:
                at = self.read(child, at)
            return at
        if kind == "pipe":
            return self.read(children[1], self.read(children[0], at))
        if kind in ("projection", "value_projection", "filter_projection", "flatten", "index_expression"):
            self.use(self.read(children[0], at), whole=False)
            for child in children[1:]:  # the right side reads each element of the left
                self.read(child, None)
            return None
        if kind == "expref":  # &expr: the function applies it to elements
            self.read(children[0], None)
            return None
        if kind == "function_expression" and node["value"] not in JMESPATH_FUNCTIONS:
            self.problems.append(f"Unknown function {node['value']}().")
        # Function arguments, comparisons, and/or/not, multi-selects: each reads the same node.
        for child in children:
            self.use(self.read(child, at))
        return None

    def _field(self, at: tuple[str, ...], name: str) -> tuple[str, ...]:
        path = (*at, name)
        if len(path) == 1 and name not in CONTEXT_NAMES:
            self.problems.append(f"Unknown name {name!r}: an expression starts from input, steps, item or index.")
        if path in (("item",), ("index",)):
            self.uses_item = True
        if path[0] == "steps" and len(path) == 2:
            self.steps.add(name)
        if path[0] == "steps" and len(path) == 3 and name not in STEP_FIELDS:
            self.problems.append(f"After steps.{path[1]} comes .output, .status or .error, not .{name}.")
        return path

    def use(self, path: Path, *, whole: bool = True) -> None:
        """``path`` is used as a whole (``whole``) or projected, indexed or flattened."""
        if path == ():
            self.problems.append("Name what it reads: input, steps.<id>.output, item or index.")
        elif path == ("steps",):
            self.problems.append("Name the step: steps.<id>.output.")
        elif path is not None and len(path) == 2 and path[0] == "steps" and not whole:
            self.problems.append(f"After steps.{path[1]} comes .output, .status or .error.")


# Parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    """Where an expression stands: which steps it may read and whether item is set."""

    step_ids: frozenset[str]
    own: str | None = None
    item: bool = False


def definition_parse(raw: Any) -> Definition:
    """The definition ``raw`` describes, in topological order. Raises :class:`InputInvalid`
    with every structural problem found, at paths like "definition.steps[2].id"."""
    return _Parser().parse(raw)


class _Parser:
    def __init__(self) -> None:
        self.errors = FieldErrors()
        self.ids: dict[str, int] = {}  # valid, unique step id → its position
        self.id_problems: dict[int, str] = {}

    def parse(self, raw: Any) -> Definition:
        if not isinstance(raw, dict):
            self.errors.add("definition", 'Must be an object with "steps".')
            _raise_for(self.errors)
        for key in raw:
            if key not in DEFINITION_KEYS:
                self.errors.add(f"definition.{key}", "Unknown field; a definition has inputs, steps and output.")
        inputs_schema = self.inputs_schema(raw.get("inputs", {}))
        steps = self.steps(raw)
        output = raw.get("output")
        self.scan(output, "definition.output", _Scope(frozenset(self.ids)))
        ordered = self.order(steps)
        _raise_for(self.errors)
        return Definition(inputs_schema=inputs_schema, steps={step.id: step for step in ordered}, output=output)

    def inputs_schema(self, schema: Any) -> dict[str, Any]:
        path = "definition.inputs"
        if not isinstance(schema, dict):
            self.errors.add(path, "Must be a JSON Schema object.")
            return {}
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            where = ".".join(str(part) for part in exc.absolute_path)
            self.errors.add(path, f"Not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}.")
        if schema.get("type", "object") != "object":
            self.errors.add(path, 'Must describe an object: its "type" is "object".')
        return schema

    def steps(self, raw: dict[str, Any]) -> list[Step]:
        path, raw_steps, limit = "definition.steps", raw.get("steps"), settings.TOOLEXEC_WORKFLOW_MAX_STEPS
        if not isinstance(raw_steps, list):
            self.errors.add(path, "Required: a list of steps." if raw_steps is None else "Must be a list of steps.")
            return []
        if not raw_steps:
            self.errors.add(path, "Must have at least 1 step.")
            return []
        if len(raw_steps) > limit:
            self.errors.add(path, f"Must have at most {limit} steps.")
            return []
        for position, raw_step in enumerate(raw_steps):
            if isinstance(raw_step, dict):
                self.step_id(raw_step.get("id"), position, "id" in raw_step)
        parsed = [self.step(raw_step, position) for position, raw_step in enumerate(raw_steps)]
        return [step for step in parsed if step is not None]

    def step_id(self, step_id: Any, position: int, given: bool) -> None:
        if not given:
            self.id_problems[position] = "Required."
        elif not isinstance(step_id, str) or not STEP_ID.fullmatch(step_id):
            self.id_problems[position] = ID_WORDS
        elif step_id in self.ids:
            self.id_problems[position] = f"Another step (definition.steps[{self.ids[step_id]}]) has this id."
        else:
            self.ids[step_id] = position

    def step(self, raw: Any, position: int) -> Step | None:
        path = f"definition.steps[{position}]"
        if not isinstance(raw, dict):
            self.errors.add(path, "Must be an object.")
            return None
        for key in raw:
            if key not in STEP_KEYS:
                self.errors.add(f"{path}.{key}", f"Unknown field; a step has {', '.join(STEP_KEYS)}.")
        if position in self.id_problems:
            self.errors.add(f"{path}.id", self.id_problems[position])
        own = raw["id"] if position not in self.id_problems else None
        fans_out = "for_each" in raw
        scope = _Scope(frozenset(self.ids), own)

        inputs = raw.get("inputs", {})
        refs: set[str] = set()
        if isinstance(inputs, dict) and not _expression_kind(inputs):
            item_scope = replace(scope, item=fans_out)
            for name, value in inputs.items():
                refs |= self.scan(value, f"{path}.inputs.{name}", item_scope)
        else:
            self.errors.add(f"{path}.inputs", "Must be an object of the tool's inputs by name.")
            inputs = {}

        for_each = raw.get("for_each")
        if fans_out:
            refs |= self.for_each(for_each, f"{path}.for_each", scope)
        when = raw.get("when")
        if "when" in raw:
            if isinstance(when, bool):
                pass
            elif isinstance(when, dict) and "$expr" in when:
                refs |= self.scan(when, f"{path}.when", scope)
            else:
                self.errors.add(f"{path}.when", 'Must be true, false or {"$expr": "..."}.')

        return Step(
            id=own or "",
            instance_id=self.instance_id(raw.get("instance"), f"{path}.instance", "instance" in raw),
            inputs=inputs,
            depends_on=self.depends_on(raw.get("depends_on", []), f"{path}.depends_on", own),
            for_each=for_each,
            concurrency=self.concurrency(raw, f"{path}.concurrency"),
            when=when,
            retry=self.retry(raw.get("retry", {}), f"{path}.retry"),
            on_error=self.choice(raw.get("on_error", "fail"), f"{path}.on_error", ON_ERROR),
            on_upstream_skipped=self.choice(
                raw.get("on_upstream_skipped", "skip"), f"{path}.on_upstream_skipped", ON_UPSTREAM_SKIPPED
            ),
            refs=frozenset(refs),
            position=position,
        )

    def instance_id(self, value: Any, path: str, given: bool) -> str:
        if isinstance(value, str):
            try:
                return str(uuid.UUID(value))
            except ValueError:
                pass
        self.errors.add(path, "Must be the id (a UUID) of one of your instances." if given else "Required.")
        return ""

    def depends_on(self, value: Any, path: str, own: str | None) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.errors.add(path, "Must be a list of step ids.")
            return ()
        found: list[str] = []
        for index, step_id in enumerate(value):
            if not isinstance(step_id, str):
                self.errors.add(f"{path}[{index}]", "Must be a step id.")
            elif step_id == own:
                self.errors.add(f"{path}[{index}]", "A step cannot depend on itself.")
            elif step_id not in self.ids:
                self.errors.add(f"{path}[{index}]", f"No step has the id {step_id!r}.")
            elif step_id not in found:
                found.append(step_id)
        return tuple(found)

    def for_each(self, value: Any, path: str, scope: _Scope) -> set[str]:
        limit = settings.TOOLEXEC_WORKFLOW_MAX_FANOUT
        if isinstance(value, list):
            if len(value) > limit:
                self.errors.add(path, f"Must have at most {limit} items.")
            return self.scan(value, path, scope)
        if isinstance(value, dict) and "$expr" in value:
            return self.scan(value, path, scope)
        self.errors.add(path, 'Must be a list or {"$expr": "..."} that gives one.')
        return set()

    def concurrency(self, raw: dict[str, Any], path: str) -> int | None:
        if "for_each" not in raw:
            if "concurrency" in raw:
                self.errors.add(path, "Only a step with for_each takes concurrency.")
            return None
        return self.number(raw, "concurrency", path, 1, MAX_CONCURRENCY, DEFAULT_CONCURRENCY, whole=True)

    def retry(self, value: Any, path: str) -> Retry:
        if not isinstance(value, dict):
            self.errors.add(path, "Must be an object with max_attempts, backoff_seconds, factor and on.")
            return Retry()
        for key in value:
            if key not in RETRY_KEYS:
                self.errors.add(f"{path}.{key}", f"Unknown field; a retry has {', '.join(RETRY_KEYS)}.")
        return Retry(
            max_attempts=self.number(value, "max_attempts", f"{path}.max_attempts", 1, 10, 1, whole=True),
            backoff_seconds=self.number(value, "backoff_seconds", f"{path}.backoff_seconds", 0, 3600, 0),
            factor=self.number(value, "factor", f"{path}.factor", 1, 10, 1),
            on=self.error_codes(value.get("on", []), f"{path}.on"),
        )

    def number(
        self, raw: dict[str, Any], key: str, path: str, low: float, high: float, default: Any, *, whole: bool = False
    ) -> Any:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            self.errors.add(path, "Must be a whole number." if whole else "Must be a number.")
        elif not low <= value <= high:
            self.errors.add(path, f"Must be from {low} to {high}.")
        else:
            return value
        return default

    def error_codes(self, value: Any, path: str) -> frozenset[str]:
        if not isinstance(value, list):
            self.errors.add(path, "Must be a list of error codes.")
            return DEFAULT_RETRY_ON
        codes = set()
        for index, code in enumerate(value):
            if isinstance(code, str) and code in ERROR_CODES:
                codes.add(ErrorCode(code))
            else:
                self.errors.add(f"{path}[{index}]", "Must be an error code, such as UPSTREAM_ERROR or TIMEOUT.")
        return frozenset(codes) or DEFAULT_RETRY_ON

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.errors.add(path, f"Must be {_either([json.dumps(choice) for choice in choices])}.")
            return choices[0]
        return value

    def scan(self, value: Any, path: str, scope: _Scope) -> set[str]:
        """Checks every expression inside ``value``; returns the steps they read."""
        if isinstance(value, dict) and ("$expr" in value or "$template" in value):
            kind = _expression_kind(value)
            if kind is None:
                self.errors.add(path, 'An object with "$expr" or "$template" has no other keys.')
                return set()
            return self.expression(kind, value[kind], path, scope)
        refs: set[str] = set()
        if isinstance(value, dict):
            for key, item in value.items():
                refs |= self.scan(item, f"{path}.{key}", scope)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                refs |= self.scan(item, f"{path}[{index}]", scope)
        return refs

    def expression(self, kind: str, source: Any, path: str, scope: _Scope) -> set[str]:
        if not isinstance(source, str):
            self.errors.add(path, f'"{kind}" must be a string.')
            return set()
        if kind == "$expr":
            parts = [("", source)]
        else:
            parts = [(f"In {{{{{part}}}}}: ", part.strip()) for part in TEMPLATE_PART.findall(source)]
            if "{{" in TEMPLATE_PART.sub("", source):
                self.errors.add(path, 'Has a "{{" without its "}}".')
        refs: set[str] = set()
        for where, part in parts:
            try:
                _compiled(part)
            except JMESPathError as exc:
                self.errors.add(path, f"{where}Not a valid JMESPath expression: {_syntax_words(exc)}")
                continue
            reading = _reading(part)
            problems = list(reading.problems)
            if reading.uses_item and not scope.item:
                problems.append(ITEM_WORDS)
            for step_id in sorted(reading.steps):
                if step_id == scope.own:
                    problems.append("A step cannot read its own result.")
                elif step_id not in scope.step_ids:
                    problems.append(f"Reads step {step_id!r}, which this workflow does not have.")
                else:
                    refs.add(step_id)
            for problem in problems:
                self.errors.add(path, where + problem)
        return refs

    def order(self, steps: list[Step]) -> list[Step]:
        """``steps`` with their implicit dependencies added, in a topological order with ties in
        the order written (Kahn's algorithm); a cycle is an error at its earliest-written step."""
        position = self.ids.__getitem__
        needs = {step.id: set(step.depends_on) | step.refs for step in steps if step.id in self.ids}
        dependents: dict[str, list[str]] = {step_id: [] for step_id in needs}
        for step_id, needed in needs.items():
            for dependency in needed:
                dependents[dependency].append(step_id)
        by_id = {
            step.id: replace(step, depends_on=tuple(sorted(needs[step.id], key=position)))
            for step in steps
            if step.id in needs
        }
        waiting = {step_id: len(needed) for step_id, needed in needs.items()}
        ready = [(position(step_id), step_id) for step_id, count in waiting.items() if not count]
        heapq.heapify(ready)
        ordered: list[Step] = []
        while ready:
            _, step_id = heapq.heappop(ready)
            ordered.append(by_id[step_id])
            for dependent in dependents[step_id]:
                waiting[dependent] -= 1
                if not waiting[dependent]:
                    heapq.heappush(ready, (position(dependent), dependent))
        for cycle in _cycles(set(needs) - {step.id for step in ordered}, needs, self.ids):
            chain = " → ".join([*cycle, cycle[0]])
            self.errors.add(
                f"definition.steps[{position(cycle[0])}].depends_on",
                f"These steps depend on each other in a cycle: {chain} (each depends on the next).",
            )
        return ordered


def _cycles(left: set[str], needs: dict[str, set[str]], ids: dict[str, int]) -> list[list[str]]:
    """The dependency cycles among ``left`` (the steps a topological sort could not place), each
    starting from its earliest-written step: one, then one among what is left without it, ..."""
    cycles: list[list[str]] = []
    left = set(left)
    while left:
        unblocked = {step_id for step_id in left if not needs[step_id] & left}
        if unblocked:  # downstream of a cycle already reported
            left -= unblocked
            continue
        walk: list[str] = []
        step_id = min(left, key=ids.__getitem__)
        while step_id not in walk:
            walk.append(step_id)
            step_id = min(needs[step_id] & left, key=ids.__getitem__)
        cycle = walk[walk.index(step_id) :]
        start = cycle.index(min(cycle, key=ids.__getitem__))
        cycles.append(cycle[start:] + cycle[:start])
        left -= set(cycle)
    return cycles


def _raise_for(errors: FieldErrors) -> None:
    if not errors:
        return
    count = sum(len(messages) for messages in errors.errors.values())
    path, messages = next(iter(errors.errors.items()))
    if count == 1:
        summary = f"The workflow definition has 1 problem: {path}: {messages[0]}"
    else:
        summary = f"The workflow definition has {count} problems; the first is {path}: {messages[0]}"
    raise InputInvalid(summary, field_errors=errors.errors)


# Checks against the owner's instances ----------------------------------------------------


def definition_check(definition: Definition, *, instances: Mapping[str, Any]) -> None:
    """Checks what needs the owner's instances. ``instances`` maps str(instance id) to each of
    the owner's instances the definition names (with ``.tool`` loaded); an id missing from it
    is not the owner's, and the message never says whether it is someone else's."""
    errors = FieldErrors()
    for step in sorted(definition.steps.values(), key=lambda step: step.position):
        path = f"definition.steps[{step.position}]"
        instance = instances.get(step.instance_id)
        if instance is None:
            errors.add(f"{path}.instance", "No instance of yours has this id.")
            continue
        for name, message in _input_problems(step, instance):
            errors.add(f"{path}.inputs.{name}", message)
    _raise_for(errors)


def _input_problems(step: Step, instance: Any) -> Iterator[tuple[str, str]]:
    """The step's inputs against its tool's input schema: literal values are checked, with the
    instance's config filling in what the step does not give; expressions are checked when
    they are evaluated."""
    tool, config = instance.tool, instance.config or {}
    schema = tool.input_schema or {}
    properties = schema.get("properties") or {}
    patterns = schema.get("patternProperties") or {}
    shared = {key: schema[key] for key in ("$defs", "definitions") if key in schema}  # for "$ref"s
    for name, value in step.inputs.items():
        known = name in properties or any(re.search(pattern, name) for pattern in patterns)
        if schema.get("additionalProperties") is False and not known:
            yield name, f"{tool.name} has no input named {name!r}."
        elif name in properties and not is_expression(value):
            subschema = {"type": "object", "properties": {name: properties[name]}, **shared}
            for field, messages in errors_by_field(subschema, {name: value}).items():
                for message in messages:
                    yield field, message
    for name in schema.get("required", []):
        if name not in step.inputs and name not in config:
            yield name, "Required; give it here or in the instance's config."


def definition_validate(raw: Any, *, instances: Mapping[str, Any]) -> Definition:
    """:func:`definition_parse`, then :func:`definition_check` once the structure is sound."""
    definition = definition_parse(raw)
    definition_check(definition, instances=instances)
    return definition


# A process's parsed definitions, by version id. Versions never change, so an entry never goes
# stale; a dict, not lru_cache, because the raw definition (a dict) cannot be a cache key. The
# least recently used entry goes once there are more than _PARSED_MAX.
_PARSED: dict[str, Definition] = {}
_PARSED_MAX = 256
_parsed_lock = threading.Lock()  # worker threads share the dict


def definition_of(version_id: Any, raw: Any) -> Definition:
    """The parsed definition of the version ``version_id``, whose saved JSON is ``raw``."""
    key = str(version_id)
    with _parsed_lock:
        if key in _PARSED:
            _PARSED[key] = definition = _PARSED.pop(key)
            return definition
    definition = definition_parse(raw)
    with _parsed_lock:
        _PARSED[key] = definition
        while len(_PARSED) > _PARSED_MAX:
            del _PARSED[next(iter(_PARSED))]
    return definition
