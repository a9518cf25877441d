"""Structured output through the Python API: a JSON schema becomes llama.cpp's grammar
sampler in the worker, and the answer comes back parsed. The real default model."""

from __future__ import annotations

import json
from typing import Literal

import pydantic
import pytest

import workbench
from workbench._schema import schema_text
from workbench._tools import function_schema
from workbench.errors import WorkbenchError


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog", "fish"]})
    legs: int


def test_chat_with_a_pydantic_schema_returns_the_parsed_object(loaded):
    c = workbench.chat("Describe a pet as JSON.", schema=Pet, temperature=0.8, seed=7,
                       max_tokens=64)
    assert isinstance(c.parsed, Pet), c.text
    assert c.parsed.kind in ("cat", "dog", "fish")
    assert Pet.model_validate_json(c.text) == c.parsed


def test_chat_with_a_dict_schema_and_a_bare_object(loaded):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    c = workbench.chat("Answer in JSON.", schema=schema, temperature=0, max_tokens=32)
    assert set(c.parsed) == {"ok", "n"} and isinstance(c.parsed["ok"], bool)
    c = workbench.chat('Reply with exactly this JSON: {"color": "blue"}',
                       schema={"type": "object"}, temperature=0, max_tokens=64)
    assert isinstance(json.loads(c.text), dict)


@pytest.mark.parametrize("schema, named", [
    ({"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"items": {"$ref": "#/$defs/A"}}},
      "$ref": "#/$defs/A"}, "$ref cycle"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties'"),
    ({"type": "integer", "minimum": 3}, "'minimum'"),
    ({"$ref": "#/$defs/Missing"}, "points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "only local references"),
    ({"type": "string", "format": "email"}, '"email"'),
    ({"type": "text"}, '"text"'),
])
def test_schemas_a_grammar_cannot_enforce_are_refused_naming_the_construct(schema, named):
    with pytest.raises(WorkbenchError) as e:
        schema_text(schema)
    assert named in e.value.message and e.value.hint


def test_a_refused_schema_fails_before_generation(loaded):
    with pytest.raises(WorkbenchError, match="patternProperties"):
        workbench.chat("hi", schema={"type": "object", "patternProperties": {}})
    assert workbench.chat("Say hi.", max_tokens=4, temperature=0).text  # still serving


def test_logprobs_in_the_python_api(loaded):
    c = workbench.chat("Name a color.", temperature=0, max_tokens=6, logprobs=2)
    assert len(c.logprobs) == c.metrics.generated_tokens
    assert b"".join(t.token for t in c.logprobs).decode() == c.text
    assert all(t.top[0][0] == t.token and len(t.top) == 2 for t in c.logprobs)
    assert workbench.chat("Name a color.", temperature=0, max_tokens=6).logprobs == ()
    with pytest.raises(WorkbenchError, match="logprobs"):
        workbench.chat("hi", logprobs=21)


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """The weather in a city now.

    city: the city's name
    unit: celsius or fahrenheit
    """
    _calls.append((city, unit))
    return {"city": city, "temperature": 18, "unit": unit, "sky": "sunny"}


_calls: list = []


def test_tools_from_python_functions_are_declared_from_signature_and_docstring():
    name, decl = function_schema(get_weather)
    assert name == "get_weather" and decl["description"] == "The weather in a city now."
    p = decl["parameters"]
    assert p["required"] == ["city"] and p["properties"]["unit"]["enum"] == ["celsius",
                                                                          "fahrenheit"]
    assert p["properties"]["city"] == {"type": "string", "description": "the city's name"}

    def untyped(x):
        pass

    with pytest.raises(WorkbenchError, match="no annotation"):
        function_schema(untyped)


def test_chat_with_tools_calls_a_function_and_runs_the_loop(loaded):
    c = workbench.chat("What is the weather in Paris?", tools=[get_weather],
                       tool_choice="required", temperature=0, max_tokens=48)
    assert c.tool_calls and c.tool_calls[0][0] == "get_weather"
    assert set(c.tool_calls[0][1]) <= {"city", "unit"} and "city" in c.tool_calls[0][1]
    _calls.clear()
    c = workbench.chat("What is the weather in Paris?", tools=[get_weather],
                       tool_choice="get_weather", run_tools=True, temperature=0,
                       max_tokens=48)
    assert len(_calls) >= 1 and c.tool_results[0][0] == "get_weather"
    assert c.tool_results[0][2]["sky"] == "sunny"
    with pytest.raises(WorkbenchError, match="not one of the tools"):
        workbench.chat("hi", tools=[get_weather], tool_choice="launch")


_TOOLS_TEMPLATE = (
    "{% if not tools %}{{ raise_exception('this template was given no tools') }}{% endif %}"
    "<|im_start|>system\nYou may call: {% for t in tools %}{{ t.function.name }} "
    "{{ t.function.parameters | tojson }}; {% endfor %}Reply with <tool_call>JSON"
    "</tool_call>.<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_takes_tools_gets_them(tmp_path, loaded, default_model):
    from gguf_edit import with_strings

    p = with_strings(default_model, tmp_path / "tools.gguf",
                     {"tokenizer.chat_template": _TOOLS_TEMPLATE})
    workbench.load_model(p, progress=False, n_ctx=2048)
    try:
        def set_unit(unit: Literal["celsius", "fahrenheit"]) -> str:
            """Choose the unit of temperatures."""
            return unit

        c = workbench.chat("Use celsius.", tools=[get_weather, set_unit],
                           tool_choice="set_unit", temperature=0, max_tokens=48)
        assert c.tool_calls[0][0] == "set_unit", c.text
        assert c.tool_calls[0][1]["unit"] in ("celsius", "fahrenheit")
        with pytest.raises(WorkbenchError, match="given no tools"):
            workbench.chat("Hi", max_tokens=2)  # the template itself, not a description
    finally:
        workbench.load_model(progress=False, n_ctx=2048)


def test_a_call_in_tool_call_tags_is_read():
    from workbench._tools import declare

    spec = declare([get_weather])
    assert spec.call_in('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                        '\n</tool_call>') == ("get_weather", '{"city": "Oslo"}')
    assert spec.call_in('{"name": "get_weather", "arguments": {}}') is None  # no city
    assert spec.call_in("It is sunny.") is None
