"""Forms of the status pages: the "try it" form built from a tool's JSON Schema, and the
history filters.

The form only turns what a person typed into JSON values; whether they are valid inputs is
decided by the execution service (the JSON Schema check and the tool's own validation), whose
field errors are put back on the form's fields.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms

from instances.models import ToolInstance
from tools import registry
from tools.sdk import ASYNC, MODES, SYNC

from .models import Execution, Mode
from .selectors import utc_day

FIELD_PREFIX = "in_"  # keeps the tool's input names apart from the form's own "mode"
MODE_LABELS = {SYNC: "Run now (sync)", ASYNC: "Run in the background (async)"}


def _simple_type(prop: dict[str, Any]) -> str | None:
    """The property's JSON type, or None when it allows several (``["string", "null"]`` counts as string)."""
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else None
    return kind if isinstance(kind, str) else None


class JSONTextField(forms.CharField):
    """Any JSON value, typed as JSON text."""

    widget = forms.Textarea(attrs={"rows": 5, "spellcheck": "false", "class": "mono"})

    def to_python(self, value: Any) -> Any:
        text = super().to_python(value)
        if text in self.empty_values:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(
                f"This is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
            ) from None
        except RecursionError:
            raise forms.ValidationError("This JSON is nested too deeply.") from None

    def prepare_value(self, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value, indent=2, ensure_ascii=False)

    def validate(self, value: Any) -> None:
        # {} and [] are values here, not an empty field (Django counts them as empty).
        if value is None and self.required:
            raise forms.ValidationError(self.error_messages["required"], code="required")

    def run_validators(self, value: Any) -> None:
        if value is not None:
            super().run_validators(json.dumps(value))


class LinesField(forms.CharField):
    """An array of strings, one per line (blank lines are left out)."""

    widget = forms.Textarea(attrs={"rows": 4})

    def to_python(self, value: Any) -> list[str] | None:
        text = super().to_python(value)
        if text in self.empty_values:
            return None
        return [line.strip() for line in text.splitlines() if line.strip()]

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return "\n".join(str(item) for item in value)
        return value


class JSONChoiceField(forms.TypedChoiceField):
    """An ``enum``: each choice is the JSON text of one allowed value."""

    def __init__(self, *, values: list[Any], required: bool, **kwargs: Any) -> None:
        choices = [(json.dumps(v), v if isinstance(v, str) else json.dumps(v)) for v in values]
        if not required:
            choices = [("", "—"), *choices]
        super().__init__(choices=choices, coerce=json.loads, empty_value=None, required=required, **kwargs)


def input_field(prop: dict[str, Any], *, required: bool, initial: Any) -> forms.Field:
    options: dict[str, Any] = {
        "required": required,
        "label": prop.get("title") or None,
        "help_text": prop.get("description", ""),
    }
    kind = _simple_type(prop)
    if isinstance(prop.get("enum"), list) and prop["enum"]:
        return JSONChoiceField(
            values=prop["enum"], initial=json.dumps(initial) if initial is not None else None, **options
        )
    if kind == "string":
        secret = prop.get("writeOnly") or prop.get("format") == "password"
        widget = forms.PasswordInput(render_value=False) if secret else forms.TextInput
        return forms.CharField(initial=None if secret else initial, widget=widget, **options)
    if kind == "integer":
        return forms.IntegerField(initial=initial, **options)
    if kind == "number":
        return forms.FloatField(initial=initial, widget=forms.NumberInput(attrs={"step": "any"}), **options)
    if kind == "boolean":
        # An unticked box is a value (false), so the box itself is never required.
        return forms.BooleanField(initial=bool(initial), **{**options, "required": False})
    if kind == "array" and _simple_type(prop.get("items") or {}) == "string" and "enum" not in prop.get("items", {}):
        return LinesField(initial=initial, **options)
    return JSONTextField(initial=initial, **options)


def required_order(schema: dict[str, Any]) -> list[str]:
    names = schema.get("required", [])
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _property_order(slug: str, properties: dict[str, Any], required: list[str]) -> list[str]:
    """The tool author's order of inputs: the stored schema is jsonb, which does not keep it, so
    the registered implementation's schema gives it (or else the ``required`` list)."""
    implementation = registry.get_tool(slug)
    preferred = list((implementation.input_schema.get("properties") or {}) if implementation else []) or required
    rank = {name: index for index, name in enumerate(preferred)}
    return sorted(properties, key=lambda name: rank.get(name, len(rank)))


class TryItForm(forms.Form):
    """A run of ``instance``: one field per input of the tool, and the mode to run it in."""

    mode = forms.ChoiceField(widget=forms.RadioSelect)

    def __init__(self, *args: Any, instance: ToolInstance, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tool = instance.tool
        modes = [m for m in MODES if tool.supports(m)]
        self.fields["mode"].choices = [(m, MODE_LABELS[m]) for m in modes]
        self.fields["mode"].initial = modes[0] if modes else SYNC
        schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
        required = set(schema.get("required", []))
        self.input_names: dict[str, str] = {}
        properties = schema.get("properties") or {}
        for name in _property_order(tool.slug, properties, list(required_order(schema))):
            prop = properties[name] if isinstance(properties[name], dict) else {}
            key = FIELD_PREFIX + name
            self.input_names[key] = name
            field = input_field(
                prop,
                required=name in required and name not in instance.config,
                initial=instance.config.get(name, prop.get("default")),
            )
            if field.label is None:
                field.label = name
            self.fields[key] = field

    def input_fields(self) -> list[forms.BoundField]:
        return [self[key] for key in self.input_names]

    def inputs(self) -> dict[str, Any]:
        """The tool inputs typed in; a field left empty is left out, so the defaults apply."""
        values = {}
        for key, name in self.input_names.items():
            value = self.cleaned_data.get(key)
            if value is None or value == "":
                continue
            values[name] = value
        return values

    def add_input_errors(self, field_errors: dict[str, list[str]]) -> None:
        """The service's field errors (``{"path.to.field": [...]}``) on the fields they are about."""
        for path, messages in field_errors.items():
            top, _, rest = path.partition(".")
            key = FIELD_PREFIX + top
            for message in messages:
                if key in self.fields:
                    self.add_error(key, f"{rest}: {message}" if rest else message)
                else:
                    label = "" if path == "(root)" else f"{path}: "
                    self.add_error(None, f"{label}{message}")


class ExecutionFilterForm(forms.Form):
    """The history's filters; invalid values are reported and left out."""

    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *Execution.Status.choices])
    mode = forms.ChoiceField(required=False, choices=[("", "Any mode"), *Mode.choices])
    tool = forms.ChoiceField(required=False)
    instance = forms.UUIDField(required=False, widget=forms.HiddenInput)
    date = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}), label="Day (UTC)")

    def __init__(self, data: Any = None, *, tools: list[tuple[str, str]], **kwargs: Any) -> None:
        if data is not None:
            data = data.copy()
            for key in ("status", "mode"):  # as the API: status=failed means FAILED
                if key in data:
                    data[key] = data[key].upper()
        super().__init__(data, **kwargs)
        self.fields["tool"].choices = [("", "Any tool"), *tools]

    def filters(self) -> dict[str, Any]:
        """Field lookups for the valid filters."""
        data = self.cleaned_data if self.is_bound and hasattr(self, "cleaned_data") else {}
        lookups: dict[str, Any] = {}
        if data.get("status"):
            lookups["status"] = data["status"]
        if data.get("mode"):
            lookups["mode"] = data["mode"]
        if data.get("tool"):
            lookups["tool__slug"] = data["tool"]
        if data.get("instance"):
            lookups["instance_id"] = data["instance"]
        if data.get("date"):
            # A range, not created_at__date, so the created_at indexes still apply.
            start, end = utc_day(data["date"])
            lookups["created_at__gte"] = start
            if end is not None:
                lookups["created_at__lt"] = end
        return lookups
