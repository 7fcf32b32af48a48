"""Tests of the wire protocol: every frame round-trips, every bad frame is a ProtocolError.

The round-trip strategies are derived from the models' fields, so a new frame class or a new
field is covered without editing this file. Only model validators need a hand-written
fix-up (``_FIXUPS``); a meta-test fails when a validator has none.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin

import annotated_types as at
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import AwareDatetime, BaseModel, JsonValue, ValidationError

from streamspace_sdk._models import WireModel
from streamspace_sdk.cli import main as cli_main
from streamspace_sdk.errors import ProtocolError
from streamspace_sdk.platform import SessionSpec
from streamspace_sdk.protocol import (
    DATA_HEADER_SIZE,
    FRAME_TYPES,
    MAX_BINARY_PAYLOAD_BYTES,
    MAX_TEXT_FRAME_BYTES,
    AgentWelcome,
    Command,
    CommandResult,
    Error,
    Frame,
    Shutdown,
    decode_data,
    dump_frame,
    encode_data,
    error_frame,
    json_schema,
    parse_frame,
)

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schema" / "protocol.json"

PARSE_ERROR_CODES = frozenset(
    {"too_large", "not_utf8", "not_json", "not_object", "missing_type", "unknown_type", "invalid"}
)
"""The codes ``parse_frame`` documents; anything else is a new code nobody handles."""

# -- strategies derived from the models ----------------------------------------------------

_MAX_TEXT = 24
"""Longest generated string, unless a field needs more: long enough to find escaping bugs."""

_MAX_ITEMS = 3
"""Longest generated list or dict: enough to see order and merging, fast to build."""

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=_MAX_TEXT),
    lambda inner: (
        st.lists(inner, max_size=_MAX_ITEMS)
        | st.dictionaries(st.text(max_size=8), inner, max_size=_MAX_ITEMS)
    ),
    max_leaves=8,
)
"""Values JSON can carry exactly (no NaN or infinities), for fields typed ``Any``."""


def _constraints(metadata: list[Any]) -> dict[str, Any]:
    """Turn a field's annotated-types constraints into keyword arguments for a strategy."""
    out: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, at.Ge):
            out["min_value"] = item.ge
        elif isinstance(item, at.Gt):
            out["min_value"] = item.gt
            out["exclude_min"] = True
        elif isinstance(item, at.Le):
            out["max_value"] = item.le
        elif isinstance(item, at.Lt):
            out["max_value"] = item.lt
            out["exclude_max"] = True
        elif isinstance(item, at.MinLen):
            out["min_size"] = item.min_length
        elif isinstance(item, at.MaxLen):
            out["max_size"] = item.max_length
        else:
            raise TypeError(
                f"no strategy knows the constraint {item!r}; teach _constraints() about it"
            )
    return out


def _int_bounds(bounds: dict[str, Any]) -> dict[str, Any]:
    low, high = bounds.get("min_value"), bounds.get("max_value")
    if low is not None and bounds.get("exclude_min"):
        low += 1
    if high is not None and bounds.get("exclude_max"):
        high -= 1
    return {"min_value": low, "max_value": high}


def _text(bounds: dict[str, Any]) -> st.SearchStrategy[str]:
    low = bounds.get("min_size", 0)
    high = max(low, min(bounds.get("max_size", _MAX_TEXT), _MAX_TEXT))
    return st.text(min_size=low, max_size=high)


def annotation_strategy(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    """Return a strategy for valid values of one field, from its type and constraints."""
    origin = get_origin(annotation)
    bounds = _constraints(metadata)
    if origin is typing.Annotated:
        base, *extra = get_args(annotation)
        return annotation_strategy(base, [*metadata, *extra])
    if origin is typing.Literal:
        return st.sampled_from(get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return st.one_of([annotation_strategy(arg, metadata) for arg in get_args(annotation)])
    if origin is list:
        (item,) = get_args(annotation)
        return st.lists(annotation_strategy(item, []), max_size=_MAX_ITEMS)
    if origin is dict:
        key, value = get_args(annotation)
        return st.dictionaries(
            annotation_strategy(key, []), annotation_strategy(value, []), max_size=_MAX_ITEMS
        )
    if annotation is type(None):
        return st.none()
    if annotation is Any or annotation is JsonValue:
        return json_values
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_strategy(annotation)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(**_int_bounds(bounds))
    if annotation is float:
        # JSON has no NaN or infinities; test_floats_json_cannot_carry_are_refused covers them.
        return st.floats(allow_nan=False, allow_infinity=False, **bounds)
    if annotation is str:
        return _text(bounds)
    if annotation is datetime or annotation is AwareDatetime:
        return st.datetimes(timezones=st.just(UTC))
    raise TypeError(f"no strategy for {annotation!r}; teach annotation_strategy() about it")


Fixup = Callable[[st.DrawFn, dict[str, Any]], dict[str, Any]]


def _command_fixup(draw: st.DrawFn, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Give start/wake a spec, and make a spec's session and generation the command's."""
    spec = kwargs.get("spec")
    if spec is None and kwargs["action"] in ("start", "wake"):
        spec = draw(model_strategy(SessionSpec))
    if spec is not None:
        kwargs |= {"spec": spec, "session_id": spec.session_id, "generation": spec.generation}
    return kwargs


def _result_fixup(draw: st.DrawFn, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Give a failed result the reason it needs."""
    if not kwargs["ok"] and not kwargs.get("reason"):
        kwargs["reason"] = draw(st.text(min_size=1, max_size=_MAX_TEXT))
    return kwargs


_FIXUPS: dict[type[BaseModel], Fixup] = {
    Command: _command_fixup,
    CommandResult: _result_fixup,
}
"""Hand-written fix-ups, one per model whose validators the field strategies cannot know."""


@st.composite
def _build(draw: st.DrawFn, cls: type[BaseModel], fields: st.SearchStrategy[dict[str, Any]]) -> Any:
    kwargs = draw(fields)
    fixup = _FIXUPS.get(cls)
    if fixup is not None:
        kwargs = fixup(draw, kwargs)
    return cls(**kwargs)


@cache
def model_strategy(cls: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Return a strategy for valid instances of ``cls``; fields with defaults may be left out."""
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in cls.model_fields.items():
        strategy = annotation_strategy(field.annotation, list(field.metadata))
        (required if field.is_required() else optional)[name] = strategy
    return _build(cls, st.fixed_dictionaries(required, optional=optional))


def frame_strategies() -> dict[str, st.SearchStrategy[Any]]:
    """Return a strategy per frame type, derived from ``FRAME_TYPES``."""
    return {key: model_strategy(cls) for key, cls in FRAME_TYPES.items()}


def frame_strategy() -> st.SearchStrategy[Any]:
    """Return a strategy for any frame of the union."""
    return st.one_of(list(frame_strategies().values()))


def _union_members() -> set[type[BaseModel]]:
    annotated = get_args(Frame)  # (A | B | ..., FieldInfo(discriminator="type"))
    return set(get_args(annotated[0]))


def _reachable_models() -> set[type[BaseModel]]:
    """Every model a frame contains, frames included."""
    seen: set[type[BaseModel]] = set()

    def walk(annotation: Any) -> None:
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if is_model and annotation not in seen:
            seen.add(annotation)
            for field in annotation.model_fields.values():
                walk(field.annotation)
        for arg in get_args(annotation):
            walk(arg)

    for cls in FRAME_TYPES.values():
        walk(cls)
    return seen


# -- the union and its strategy ----------------------------------------------------------


def test_frame_types_is_the_union() -> None:
    """FRAME_TYPES names every member of Frame and nothing else, each by its own ``type``.

    Troubleshooting: a class added to ``Frame`` but not to ``FRAME_TYPES`` parses on the
    fast path but is reported as ``unknown_type`` on the slow one; add it to both.
    """
    assert _union_members() == set(FRAME_TYPES.values())
    for key, cls in FRAME_TYPES.items():
        assert get_args(cls.model_fields["type"].annotation) == (key,)
        assert issubclass(cls, WireModel)


def test_every_validator_has_a_fixup() -> None:
    """Models with validators are exactly those with a fix-up in ``_FIXUPS``.

    Troubleshooting: a new ``model_validator`` or ``field_validator`` on a frame (or a model
    inside one) needs a fix-up so that generated instances satisfy it.
    """
    validated = {
        cls
        for cls in _reachable_models()
        if cls.__pydantic_decorators__.model_validators
        or cls.__pydantic_decorators__.field_validators
    }
    assert validated == set(_FIXUPS)


def test_frame_strategy_covers_the_union() -> None:
    """frame_strategy() draws from one strategy per member of Frame, so every frame is covered.

    test_round_trip draws from each of them and checks that it builds that frame type.
    """
    union_types = {get_args(cls.model_fields["type"].annotation)[0] for cls in _union_members()}
    assert set(frame_strategies()) == union_types


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("frame_type", sorted(FRAME_TYPES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(frame_type: str, data: st.DataObject) -> None:
    """Every frame survives dump_frame → parse_frame, from text and from bytes."""
    frame = data.draw(frame_strategies()[frame_type], label="frame")
    assert frame.type == frame_type
    text = dump_frame(frame)
    assert isinstance(text, str)
    parsed = parse_frame(text)
    assert type(parsed) is type(frame)
    assert parsed == frame
    assert parse_frame(text.encode("utf-8")) == frame


@settings(max_examples=60, deadline=None)
@given(frame=frame_strategy(), extra=st.dictionaries(st.text(max_size=12), json_values, max_size=3))
def test_unknown_fields_are_ignored(frame: Any, extra: dict[str, Any]) -> None:
    """Fields a newer peer adds are dropped, and the frame parses as if they were absent."""
    obj = json.loads(dump_frame(frame))
    obj |= {f"x-{key}": value for key, value in extra.items()}
    assert parse_frame(json.dumps(obj)) == frame


def test_unknown_nested_fields_are_ignored() -> None:
    """Unknown fields inside nested models are ignored too."""
    frame = parse_frame(
        json.dumps(
            {
                "type": "agent.hello",
                "agent_id": "a1",
                "platform": "process",
                "capacity": {"max_sessions": 3, "max_gpus": 2},
                "sessions": [{"session_id": "s1", "generation": 1, "state": "running", "pod": 1}],
                "introduced_in": "1.9",
            }
        )
    )
    assert frame.type == "agent.hello"
    assert frame.capacity.max_sessions == 3
    assert frame.sessions[0].state == "running"
    assert "max_gpus" not in frame.capacity.model_dump()


@settings(max_examples=30, deadline=None)
@given(frame=frame_strategy())
def test_frames_are_frozen(frame: Any) -> None:
    """A frame cannot be changed after it is built (it may be shared between tasks)."""
    for name in type(frame).model_fields:
        with pytest.raises(ValidationError, match="frozen"):
            setattr(frame, name, getattr(frame, name))


# -- malformed input ---------------------------------------------------------------------

_SPEC = {"session_id": "s1", "generation": 1, "user": "ada", "template": "firefox"}
_COMMAND = {"type": "command", "command_id": "c1", "session_id": "s1", "generation": 1}
_RESULT = {"type": "command.result", "command_id": "c1", "session_id": "s1", "generation": 1}


def _credit(stream_id: str) -> str:
    """A vnc.credit frame with ``stream_id`` spliced in as raw JSON text."""
    return f'{{"type": "vnc.credit", "stream_id": {stream_id}, "credit_bytes": 10}}'


def _shutdown_of_size(size: int) -> str:
    """A valid shutdown frame of exactly ``size`` bytes."""
    shell = json.dumps({"type": "shutdown", "reason": ""})
    return shell.replace('""', '"' + "x" * (size - len(shell)) + '"')


_NESTING = 100_000

MALFORMED = [
    pytest.param("{not json", "not_json", ["not JSON"], id="not-json"),
    pytest.param('{"type": "shutdown"', "not_json", ["not JSON"], id="unterminated"),
    pytest.param("", "not_json", ["not JSON"], id="empty-text"),
    pytest.param(b"", "not_json", ["not JSON"], id="empty-bytes"),
    pytest.param("  \n ", "not_json", ["not JSON"], id="whitespace"),
    pytest.param("[]", "not_object", ["list"], id="array"),
    pytest.param('[{"type": "shutdown"}]', "not_object", ["list"], id="array-of-frame"),
    pytest.param("42", "not_object", ["int"], id="number"),
    pytest.param('"shutdown"', "not_object", ["str"], id="string"),
    pytest.param("null", "not_object", ["NoneType"], id="null"),
    pytest.param("true", "not_object", ["bool"], id="true"),
    pytest.param('{"reason": "x"}', "missing_type", ["type"], id="no-type"),
    pytest.param('{"type": null}', "missing_type", ["type"], id="type-null"),
    pytest.param('{"type": 5}', "unknown_type", ["5", *FRAME_TYPES], id="type-number"),
    pytest.param('{"type": ["shutdown"]}', "unknown_type", ["shutdown"], id="type-list"),
    pytest.param(
        '{"type": "session.explode"}',
        "unknown_type",
        ["session.explode", *FRAME_TYPES],
        id="unknown-type",
    ),
    pytest.param('{"type": "Shutdown"}', "unknown_type", ["Shutdown"], id="type-wrong-case"),
    pytest.param(_credit('"abc"'), "invalid", ["vnc.credit", "stream_id"], id="wrong-field-type"),
    pytest.param(_credit("[1]"), "invalid", ["stream_id"], id="list-for-int"),
    pytest.param(_credit("0"), "invalid", ["stream_id"], id="stream-zero"),
    pytest.param(
        json.dumps(
            {
                "type": "agent.hello",
                "agent_id": "a",
                "platform": "p",
                "capacity": {"max_sessions": "many"},
            }
        ),
        "invalid",
        ["capacity.max_sessions"],
        id="wrong-nested-field-type",
    ),
    pytest.param('{"type": "command.ack"}', "invalid", ["command_id", "required"], id="missing"),
    pytest.param('{"type": "error"}', "invalid", ["code", "message"], id="missing-two"),
    pytest.param(
        json.dumps({**_COMMAND, "action": "explode"}), "invalid", ["action"], id="bad-action"
    ),
    pytest.param(
        json.dumps({**_COMMAND, "action": "start"}),
        "invalid",
        ["start", "spec"],
        id="start-no-spec",
    ),
    pytest.param(
        json.dumps({**_COMMAND, "action": "wake"}), "invalid", ["wake", "spec"], id="wake-no-spec"
    ),
    pytest.param(
        json.dumps({**_COMMAND, "action": "start", "spec": {**_SPEC, "session_id": "s2"}}),
        "invalid",
        ["session_id"],
        id="spec-other-session",
    ),
    pytest.param(
        json.dumps({**_COMMAND, "action": "stop", "spec": {**_SPEC, "generation": 2}}),
        "invalid",
        ["generation"],
        id="spec-other-generation",
    ),
    pytest.param(
        json.dumps({**_RESULT, "ok": False}), "invalid", ["reason"], id="failed-no-reason"
    ),
    pytest.param(
        json.dumps({**_RESULT, "ok": False, "reason": ""}),
        "invalid",
        ["reason"],
        id="failed-empty-reason",
    ),
    pytest.param(
        _shutdown_of_size(MAX_TEXT_FRAME_BYTES + 1),
        "too_large",
        [str(MAX_TEXT_FRAME_BYTES + 1), str(MAX_TEXT_FRAME_BYTES)],
        id="too-large-text",
    ),
    pytest.param(
        _shutdown_of_size(MAX_TEXT_FRAME_BYTES + 1).encode(),
        "too_large",
        [str(MAX_TEXT_FRAME_BYTES)],
        id="too-large-bytes",
    ),
    pytest.param(b'{"type": "shutdown", "reason": "\xff"}', "not_utf8", ["UTF-8"], id="bad-utf8"),
    pytest.param(b'{"type": "shutdown", "reason": "\xc3"}', "not_utf8", ["UTF-8"], id="cut-utf8"),
    pytest.param(b"\xed\xa0\x80", "not_utf8", ["UTF-8"], id="encoded-surrogate"),
    pytest.param("[" * _NESTING + "]" * _NESTING, "not_json", ["not JSON"], id="deep-arrays"),
    pytest.param('{"a": ' * _NESTING, "not_json", ["not JSON"], id="deep-objects"),
    pytest.param(
        ('{"type": "shutdown", "x": ' + "[" * _NESTING + "]" * _NESTING + "}").encode(),
        "not_json",
        ["not JSON"],
        id="deep-inside-frame",
    ),
    pytest.param(_credit("NaN"), "invalid", ["stream_id"], id="nan-int"),
    pytest.param(_credit("Infinity"), "invalid", ["stream_id"], id="infinity-int"),
    pytest.param(_credit("-Infinity"), "invalid", ["stream_id"], id="minus-infinity-int"),
    pytest.param(_credit("1e400"), "invalid", ["stream_id"], id="float-overflow"),
    pytest.param(_credit("1.5"), "invalid", ["stream_id"], id="fraction"),
    pytest.param(_credit(str(2**64)), "invalid", ["stream_id"], id="int-over-u64"),
    pytest.param(_credit("9" * 1000), "invalid", ["stream_id"], id="int-1000-digits"),
    # int() refuses more than sys.get_int_max_str_digits() (4300) digits. Fails today: the
    # ValueError from json.loads escapes parse_frame.
    pytest.param(_credit("9" * 5000), "invalid", ["digits"], id="int-5000-digits"),
    pytest.param(
        json.dumps({"type": "agent.welcome", "connection_id": "c", "heartbeat_interval_s": "NaN"}),
        "invalid",
        ["heartbeat_interval_s"],
        id="nan-float-string",
    ),
    pytest.param(
        '{"type": "agent.welcome", "connection_id": "c", "heartbeat_interval_s": NaN}',
        "invalid",
        ["heartbeat_interval_s"],
        id="nan-float",
    ),
]


@pytest.mark.parametrize(("data", "code", "mentions"), MALFORMED)
def test_malformed_frame_is_protocol_error(
    data: str | bytes, code: str, mentions: list[str]
) -> None:
    """Each kind of bad frame raises ProtocolError with its code and a reason naming the fault.

    Troubleshooting: any other exception escaping ``parse_frame`` takes the connection down;
    catch it there and raise ``ProtocolError``.
    """
    with pytest.raises(ProtocolError) as info:
        parse_frame(data)
    exc = info.value
    assert exc.code == code
    for word in mentions:
        assert word in exc.reason
    assert len(exc.reason) < 2000, "the reason must not echo the frame back"
    assert str(exc) == f"{code}: {exc.reason}"
    answer = error_frame(exc, ref="r1")
    assert parse_frame(dump_frame(answer)) == answer


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    """MAX_TEXT_FRAME_BYTES is inclusive."""
    text = _shutdown_of_size(MAX_TEXT_FRAME_BYTES)
    assert len(text.encode()) == MAX_TEXT_FRAME_BYTES
    expected = Shutdown(reason=json.loads(text)["reason"])
    assert parse_frame(text) == expected
    assert parse_frame(text.encode()) == expected


def test_text_frame_limit_counts_utf8_bytes() -> None:
    """The size limit is in bytes whether the frame arrives as str or as bytes.

    Fails today: for str, ``parse_frame`` compares ``len(data)`` (characters) to the byte
    limit, so 2-byte characters let through a frame of nearly twice the limit.
    """
    text = '{"type": "shutdown", "reason": "' + "é" * (MAX_TEXT_FRAME_BYTES // 2) + '"}'
    assert len(text) <= MAX_TEXT_FRAME_BYTES < len(text.encode())
    with pytest.raises(ProtocolError) as from_bytes:
        parse_frame(text.encode())
    assert from_bytes.value.code == "too_large"
    with pytest.raises(ProtocolError) as from_text:
        parse_frame(text)
    assert from_text.value.code == "too_large"


def _parse_or_error(data: str | bytes) -> Any:
    """Return the parsed frame, or the ProtocolError it raised; anything else propagates."""
    try:
        return parse_frame(data)
    except ProtocolError as exc:
        return exc


def _assert_frame_or_protocol_error(data: str | bytes) -> None:
    result = _parse_or_error(data)
    if isinstance(result, ProtocolError):
        assert result.code in PARSE_ERROR_CODES
        assert result.reason
    else:
        assert isinstance(result, tuple(FRAME_TYPES.values()))


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters()))
def test_fuzz_text(data: str) -> None:
    """Arbitrary text (lone surrogates included) is a frame or a ProtocolError, nothing else."""
    _assert_frame_or_protocol_error(data)


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_fuzz_bytes(data: bytes) -> None:
    """Arbitrary bytes are a frame or a ProtocolError, nothing else."""
    _assert_frame_or_protocol_error(data)


_wild_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters()),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
"""Any JSON, with NaN and infinities (Python's json writes them) and lone surrogates."""


@st.composite
def _frame_like(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object with a known ``type`` and mostly that frame's field names."""
    frame_type = draw(st.sampled_from(sorted(FRAME_TYPES)))
    names = st.sampled_from(sorted(FRAME_TYPES[frame_type].model_fields)) | st.text(max_size=8)
    obj = draw(st.dictionaries(names, _wild_json, max_size=8))
    obj["type"] = frame_type
    return obj


@settings(max_examples=150, deadline=None)
@given(obj=_frame_like(), as_bytes=st.booleans())
def test_fuzz_json_objects(obj: dict[str, Any], as_bytes: bool) -> None:
    """JSON objects of a known type with random fields are a frame or a ProtocolError."""
    text = json.dumps(obj)
    _assert_frame_or_protocol_error(text.encode("utf-8", "surrogatepass") if as_bytes else text)


@settings(max_examples=200, deadline=None)
@given(frame=frame_strategy(), data=st.data())
def test_fuzz_one_bad_field(frame: Any, data: st.DataObject) -> None:
    """A valid frame with one field replaced by any JSON is a frame or a ProtocolError."""
    obj = json.loads(dump_frame(frame))
    key = data.draw(st.sampled_from(sorted(obj)), label="field")
    obj[key] = data.draw(_wild_json, label="value")
    _assert_frame_or_protocol_error(json.dumps(obj))


# -- what parse_frame accepts, dump_frame can write ---------------------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [
        pytest.param(
            '{"type": "shutdown", "reason": "\\ud800"}', "invalid", id="escaped-lone-surrogate"
        ),
        pytest.param(
            '{"type": "shutdown", "reason": "\ud800"}', "not_utf8", id="raw-lone-surrogate"
        ),
        pytest.param(
            json.dumps(
                {
                    **_COMMAND,
                    "action": "start",
                    "spec": {**_SPEC, "platform_options": {"x": [[[]]]}},
                }
            ).replace("[[[]]]", "[" * 300 + "]" * 300),
            "invalid",
            id="deep-platform-options",
        ),
    ],
)
def test_accepted_frame_can_be_dumped_again(text: str, code: str) -> None:
    """A frame parse_frame accepts can be written back (relayed, stored, logged as JSON).

    A lone UTF-16 surrogate in a string, or an ``Any`` value nested deeper than pydantic's
    serialiser allows, would parse and then make ``dump_frame`` raise; parse_frame refuses
    them: ``invalid``, or ``not_utf8`` for a text holding the surrogate itself (as its
    bytes would be).
    """
    result = _parse_or_error(text)
    if isinstance(result, ProtocolError):
        assert result.code == code
    else:
        assert parse_frame(dump_frame(result)) == result


def test_a_raw_surrogate_in_an_ignored_field_is_not_utf8_either() -> None:
    """Found by test_protocol_fuzz: the field is dropped, yet the text is not UTF-8."""
    with pytest.raises(ProtocolError) as caught:
        parse_frame('{"type": "shutdown", "reason": "x", "": {"\ud800": 1}}')
    assert caught.value.code == "not_utf8"


def test_escaped_surrogate_pairs_are_text() -> None:
    """A JSON escape of a character outside the BMP (a surrogate pair) is ordinary text."""
    frame = parse_frame('{"type": "shutdown", "reason": "deploy \\ud83d\\ude80"}')
    assert frame == Shutdown(reason="deploy \U0001f680")
    assert parse_frame(dump_frame(frame)) == frame


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda: AgentWelcome(connection_id="c", heartbeat_interval_s=float("inf")),
            id="welcome-heartbeat-inf",
        ),
        pytest.param(lambda: Shutdown(reconnect_after_s=float("inf")), id="shutdown-inf"),
    ],
)
def test_floats_json_cannot_carry_are_refused(build: Callable[[], WireModel]) -> None:
    """A frame that can be built can be sent: no float field holds what JSON cannot carry.

    Fails today: ``inf`` passes ``gt=0``/``ge=0`` and dump_frame writes it as ``null``, so
    the welcome no longer parses and the shutdown hint silently turns into ``None``.
    """
    try:
        frame = build()
    except ValidationError:
        return
    assert parse_frame(dump_frame(frame)) == frame


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({"type": "agent.heartbeat", "sent_at": "2024-05-01T12:00:00"}, id="heartbeat"),
        pytest.param(
            {
                "type": "agent.welcome",
                "connection_id": "c",
                "heartbeat_interval_s": 10,
                "server_time": "2024-05-01T12:00:00",
            },
            id="welcome",
        ),
        pytest.param(
            {
                "type": "session.status",
                "status": {
                    "session_id": "s1",
                    "generation": 1,
                    "state": "running",
                    "observed_at": "2024-05-01T12:00:00",
                },
            },
            id="nested-status",
        ),
    ],
)
def test_times_without_offset_are_refused_or_made_utc(obj: dict[str, Any]) -> None:
    """Times on the wire are UTC: a time without an offset is refused or read as UTC.

    Fails today: it parses to a naive datetime, and comparing it with ``datetime.now(UTC)``
    (skew checks, lease expiry) raises ``TypeError`` far from the socket.
    """
    result = _parse_or_error(json.dumps(obj))
    if isinstance(result, ProtocolError):
        assert result.code == "invalid"
        return
    stamps = [v for v in _values(result) if isinstance(v, datetime)]
    assert stamps
    for stamp in stamps:
        assert stamp.utcoffset() is not None
        assert stamp <= datetime.now(UTC)


def _values(model: BaseModel) -> list[Any]:
    out: list[Any] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        out.extend(_values(value) if isinstance(value, BaseModel) else [value])
    return out


# -- error frames ------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    code=st.sampled_from(sorted(PARSE_ERROR_CODES)) | st.text(min_size=1, max_size=20),
    reason=st.text(max_size=200),
    ref=st.none() | st.text(max_size=40),
)
def test_error_frame_round_trips(code: str, reason: str, ref: str | None) -> None:
    """error_frame() answers a ProtocolError with an Error frame that itself round-trips."""
    frame = error_frame(ProtocolError(code, reason), ref=ref)
    assert isinstance(frame, Error)
    assert (frame.type, frame.code, frame.message, frame.ref) == ("error", code, reason, ref)
    assert parse_frame(dump_frame(frame)) == frame


def test_error_frame_answers_a_real_failure() -> None:
    """The frame built from a parse failure carries its code and reason; ref defaults to None."""
    with pytest.raises(ProtocolError) as info:
        parse_frame('{"type": "session.explode"}')
    frame = error_frame(info.value)
    assert frame.code == "unknown_type"
    assert "session.explode" in frame.message
    assert frame.ref is None
    assert parse_frame(dump_frame(frame)) == frame


# -- binary frames -----------------------------------------------------------------------

stream_ids = st.integers(min_value=1, max_value=2**32 - 1)


@settings(max_examples=100, deadline=None)
@given(
    stream_id=stream_ids,
    payload=st.binary(max_size=4096),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_binary_round_trip(
    stream_id: int, payload: bytes, kind: Callable[[bytes], bytes | bytearray | memoryview]
) -> None:
    """decode_data(encode_data(id, payload)) gives back the id and the payload."""
    frame = encode_data(stream_id, kind(payload))
    assert isinstance(frame, bytes)
    assert len(frame) == DATA_HEADER_SIZE + len(payload)
    decoded_id, decoded = decode_data(kind(frame))
    assert decoded_id == stream_id
    assert decoded.tobytes() == payload


def test_binary_header_layout() -> None:
    """The header is kind 0x01 then the stream id as a big-endian u32."""
    assert DATA_HEADER_SIZE == 5
    assert encode_data(0x01020304, b"hi") == b"\x01\x01\x02\x03\x04hi"


@pytest.mark.parametrize("size", range(DATA_HEADER_SIZE))
def test_binary_truncated(size: int) -> None:
    """A frame shorter than its header is ``truncated``."""
    with pytest.raises(ProtocolError) as info:
        decode_data(b"\x01\x00\x00\x00\x07"[:size])
    assert info.value.code == "truncated"
    assert str(size) in info.value.reason


def test_binary_header_only_is_an_empty_payload() -> None:
    """A frame of just the header carries zero bytes."""
    stream_id, payload = decode_data(b"\x01\x00\x00\x00\x07")
    assert (stream_id, payload.tobytes()) == (7, b"")


@pytest.mark.parametrize("kind", [0x00, 0x02, 0x7F, 0xFF])
def test_binary_bad_kind(kind: int) -> None:
    """A kind byte other than 0x01 is ``bad_kind``."""
    with pytest.raises(ProtocolError) as info:
        decode_data(bytes([kind]) + b"\x00\x00\x00\x07data")
    assert info.value.code == "bad_kind"
    assert f"{kind:#04x}" in info.value.reason


def test_binary_stream_zero_is_bad_stream() -> None:
    """Stream 0 is reserved."""
    with pytest.raises(ProtocolError) as info:
        decode_data(b"\x01\x00\x00\x00\x00data")
    assert info.value.code == "bad_stream"


@pytest.mark.parametrize("stream_id", [0, -1, 2**32, 2**64])
def test_binary_encode_bad_stream(stream_id: int) -> None:
    """encode_data refuses a stream id outside 1..2**32-1."""
    with pytest.raises(ProtocolError) as info:
        encode_data(stream_id, b"x")
    assert info.value.code == "bad_stream"
    assert str(stream_id) in info.value.reason


def test_binary_payload_limit() -> None:
    """A payload of MAX_BINARY_PAYLOAD_BYTES passes; one byte more is ``too_large`` both ways."""
    fits = bytes(MAX_BINARY_PAYLOAD_BYTES)
    assert decode_data(encode_data(1, fits))[1].nbytes == MAX_BINARY_PAYLOAD_BYTES
    with pytest.raises(ProtocolError) as encoding:
        encode_data(1, fits + b"x")
    assert encoding.value.code == "too_large"
    with pytest.raises(ProtocolError) as decoding:
        decode_data(b"\x01\x00\x00\x00\x01" + fits + b"x")
    assert decoding.value.code == "too_large"
    assert str(MAX_BINARY_PAYLOAD_BYTES) in decoding.value.reason


def test_binary_decode_does_not_copy() -> None:
    """The payload is a view into the frame, so relaying VNC bytes costs no copy."""
    frame = encode_data(9, b"pixels")
    _, payload = decode_data(frame)
    assert isinstance(payload, memoryview)
    assert payload.obj is frame
    buffer = bytearray(frame)
    _, view = decode_data(buffer)
    buffer[DATA_HEADER_SIZE] = ord("P")
    assert view.tobytes() == b"Pixels"


# -- the committed schema ----------------------------------------------------------------

REGENERATE = (
    "sdk/schema/protocol.json is out of date with the models in protocol.py. Regenerate it "
    "from the repository root with:\n\n"
    "    streamspace-agent protocol-schema > sdk/schema/protocol.json\n\n"
    "or, without the CLI:\n\n"
    '    python -c "import json; from streamspace_sdk.protocol import json_schema; '
    'print(json.dumps(json_schema(), indent=2, sort_keys=True))" > sdk/schema/protocol.json\n\n'
    "and commit the result with the model change."
)


@pytest.mark.schema_drift
def test_schema_file_is_up_to_date() -> None:
    """The committed schema is what the models generate now.

    Troubleshooting: regenerate it with the command in the failure message.
    """
    expected = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert SCHEMA_PATH.exists(), REGENERATE
    assert SCHEMA_PATH.read_text(encoding="utf-8") == expected, REGENERATE


def test_regenerate_command_prints_the_committed_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``streamspace-agent protocol-schema`` prints exactly what the drift test expects."""
    assert cli_main(["protocol-schema"]) == 0
    assert capsys.readouterr().out == json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def test_schema_names_every_frame_type() -> None:
    """The schema's discriminator maps every frame type, and carries the protocol version."""
    schema = json_schema()
    assert schema["discriminator"]["propertyName"] == "type"
    assert set(schema["discriminator"]["mapping"]) == set(FRAME_TYPES)
    assert schema["x-protocol-version"] >= 1
