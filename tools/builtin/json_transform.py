from decimal import Decimal
from typing import Any

import jmespath
from jmespath.exceptions import IncompleteExpressionError, JMESPathError, LexerError, ParseError

from ..errors import InputInvalid
from ..registry import register
from ..sdk import ASYNC, SYNC, ExecutionContext, Tool


@register
class JsonTransform(Tool):
    slug = "json-transform"
    name = "JSON Transform"
    description = "Reshape JSON data with a JMESPath expression (https://jmespath.org)."
    category = "data"
    input_schema = {
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "minLength": 1,
                "description": 'A JMESPath expression, e.g. "people[?age > `30`].name".',
            },
            "data": {"description": "Any JSON value to apply the expression to."},
        },
        "required": ["expression", "data"],
        "additionalProperties": False,
    }
    output_schema = {
        "type": "object",
        "properties": {"result": {"description": "The value the expression selects."}},
        "required": ["result"],
    }
    # Instant on execute-sync; async too, as the glue between a workflow's steps.
    modes = frozenset({SYNC, ASYNC})
    cacheable = True  # a pure function of its inputs
    timeout_seconds = 10
    base_credits = Decimal("0.01")

    def validate(self, inputs: dict[str, Any]) -> None:
        try:
            jmespath.compile(inputs["expression"])
        except ParseError as exc:
            raise _invalid_expression(exc) from None

    def run(self, inputs: dict[str, Any], ctx: ExecutionContext) -> dict[str, Any]:
        try:
            result = jmespath.search(inputs["expression"], inputs["data"])
        except JMESPathError as exc:
            raise _invalid_expression(exc) from None
        return {"result": result}


def _invalid_expression(exc: JMESPathError) -> InputInvalid:
    if isinstance(exc, IncompleteExpressionError):
        reason = "The expression ends too early."
    elif isinstance(exc, LexerError):
        reason = f"Unexpected character {exc.lexer_value!r} at position {exc.lexer_position}."
    elif isinstance(exc, ParseError):
        reason = f"Unexpected {exc.token_value!r} at position {exc.lex_position}."
    else:  # an error while evaluating, e.g. a function given the wrong type
        reason = str(exc).strip().splitlines()[0]
    return InputInvalid(f"The JMESPath expression is not valid: {reason}", field_errors={"expression": [reason]})
