"""Property-based fuzzing of the wire protocol: ``parse_frame`` and the binary codec.

``test_protocol.py`` states the contract case by case and fuzzes it gently; this module
throws hostile input at it. Every text a peer can send is one frame, or a
``ProtocolError`` with a documented code and a short reason that itself fits an error
frame, within a bound of time: never another exception, never a frame that
``dump_frame`` cannot write back as it came. The inputs are valid frames re-encoded by
another JSON writer, valid frames with keys dropped, duplicated, added or retyped, and raw
JSON that Python's ``json`` would never write: deep nesting, numbers of thousands of
digits or huge exponents, ``NaN``, surrogate escapes, strings near the size limit, byte
order marks, trailing garbage, truncation, invalid UTF-8.

Sizes are bounded so the module runs in a few seconds: ``max_examples`` and ``deadline``
are set on each test (the deadline is also the "never hangs" bound), and no example
database is written (``database=None``).
"""

from __future__ import annotations

import json
import random
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol import PARSE_ERROR_CODES, frame_strategies, frame_strategy

from streamspace_sdk._models import WireModel
from streamspace_sdk.errors import ProtocolError
from streamspace_sdk.protocol import (
    DATA_HEADER_SIZE,
    FRAME_TYPES,
    MAX_BINARY_PAYLOAD_BYTES,
    MAX_TEXT_FRAME_BYTES,
    decode_data,
    dump_frame,
    encode_data,
    error_frame,
    parse_frame,
)

NEVER_HANGS = timedelta(seconds=2)
"""Deadline of every parse: a frame of the largest size parses in well under 0.1 s."""

MAX_REASON_CHARS = 1000
"""A reason never grows with the frame: an error frame answering it stays small."""

BINARY_ERROR_CODES = frozenset({"truncated", "bad_kind", "bad_stream", "too_large"})
"""The codes ``decode_data`` and ``encode_data`` document."""


def _fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=NEVER_HANGS,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _parse(data: str | bytes) -> WireModel | ProtocolError:
    """The frame, or the ProtocolError raised; any other exception propagates."""
    try:
        return parse_frame(data)
    except ProtocolError as exc:
        return exc


def _outcome(data: str | bytes) -> WireModel | ProtocolError:
    """Parse ``data``; check the error or the frame; return whichever it was."""
    result = _parse(data)
    if isinstance(result, ProtocolError):
        assert result.code in PARSE_ERROR_CODES, result.code
        assert result.reason, result.code
        assert len(result.reason) <= MAX_REASON_CHARS, (result.code, len(result.reason))
        answer = error_frame(result, ref="r")
        assert parse_frame(dump_frame(answer)) == answer  # the answer itself can be sent
    else:
        assert isinstance(result, tuple(FRAME_TYPES.values()))
        again = parse_frame(dump_frame(result))  # accepted: it can be relayed as it came
        assert again == result
    return result


# -- valid frames ------------------------------------------------------------------------


@pytest.mark.parametrize("frame_type", sorted(FRAME_TYPES))
@_fuzz(30)
@given(data=st.data())
def test_every_valid_frame_round_trips(frame_type: str, data: st.DataObject) -> None:
    """dump_frame → parse_frame gives the frame back, from text and from bytes, and
    writing it again gives the same text (the encoding is stable)."""
    frame = data.draw(frame_strategies()[frame_type], label="frame")
    text = dump_frame(frame)
    parsed = parse_frame(text)
    assert parsed == frame
    assert type(parsed) is type(frame)
    assert parse_frame(text.encode("utf-8")) == frame
    assert dump_frame(parsed) == text


def _shuffled(value: Any, rnd: random.Random) -> Any:
    """``value`` with the keys of every object in another order."""
    if isinstance(value, dict):
        items = [(key, _shuffled(item, rnd)) for key, item in value.items()]
        rnd.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [_shuffled(item, rnd) for item in value]
    return value


@_fuzz(150)
@given(
    frame=frame_strategy(),
    rnd=st.randoms(use_true_random=False),
    ensure_ascii=st.booleans(),
    indent=st.none() | st.integers(0, 3) | st.just("\t"),
    separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
)
def test_another_json_writer_gives_the_same_frame(
    frame: Any,
    rnd: random.Random,
    ensure_ascii: bool,
    indent: int | str | None,
    separators: tuple[str, str],
) -> None:
    """A peer whose JSON writer orders keys otherwise, escapes to ASCII, indents or spaces
    differently sends the same frame."""
    obj = _shuffled(json.loads(dump_frame(frame)), rnd)
    text = json.dumps(obj, ensure_ascii=ensure_ascii, indent=indent, separators=separators)
    assert parse_frame(text) == frame
    assert parse_frame(text.encode("utf-8")) == frame


@_fuzz(100)
@given(frame=frame_strategy(), data=st.data())
def test_a_duplicated_key_counts_once_the_last_time(frame: Any, data: st.DataObject) -> None:
    """With a key given twice, the last value counts, on the fast path and the slow path
    alike (as JSON parsers do), so no two readers of one frame see different frames."""
    obj = json.loads(dump_frame(frame))
    key = data.draw(st.sampled_from(sorted(obj)), label="key")
    decoy = data.draw(st.sampled_from(['"decoy"', "null", "-1", "[]", '{"type": "error"}']))
    body = json.dumps(obj)
    text = "{" + json.dumps(key) + ": " + decoy + ", " + body[1:]
    assert parse_frame(text) == frame


# -- hostile text ------------------------------------------------------------------------

_SPLICE = "\x00splice\x00"
"""Placeholder for raw JSON text; ``json.dumps`` writes it as ``"\\u0000splice\\u0000"``."""


@st.composite
def _number(draw: st.DrawFn) -> str:
    """A JSON number of any size: thousands of digits, huge exponents, fractions."""
    sign = draw(st.sampled_from(["", "-"]))
    digits = draw(st.sampled_from(["0", "1", "9", "12345678901234567890"]))
    length = draw(st.integers(1, 6000))
    text = sign + (digits * length)[:length].lstrip("0") or "0"
    if draw(st.booleans()):
        text += "." + "5" * draw(st.integers(1, 400))
    if draw(st.booleans()):
        text += draw(st.sampled_from(["e", "E", "e+", "e-"])) + str(draw(st.integers(0, 10**7)))
    return text


@st.composite
def _deep(draw: st.DrawFn) -> str:
    """Nested lists or objects (keys long or short), from a few levels to near pydantic's
    limits (255) and far past any parser's."""
    depth = draw(st.integers(1, 300) | st.integers(240, 270) | st.integers(300, 200_000))
    key = json.dumps("k" * draw(st.sampled_from([1, 3000])))
    opener, closer = draw(st.sampled_from([("[", "]"), (f"{{{key}:", "}"), (f"[{{{key}:", "}]")]))
    closed = draw(st.booleans()) or depth < 300
    return opener * depth + "1" + (closer * depth if closed else "")


@st.composite
def _many(draw: st.DrawFn) -> str:
    """A list of up to 20,000 items alike (each wrong wherever a model is expected)."""
    item = draw(st.sampled_from(["{}", '"x"', "null", "-1", '{"session_id": 5}']))
    return "[" + ",".join([item] * draw(st.integers(0, 20_000))) + "]"


@st.composite
def _string(draw: st.DrawFn) -> str:
    """A JSON string with escapes (lone and paired surrogates, NUL), raw characters, or
    one repeated character up to past the frame size limit."""
    if draw(st.booleans()):
        length = draw(st.integers(0, 1000) | st.integers(MAX_TEXT_FRAME_BYTES - 100, 1_100_000))
        return '"' + draw(st.sampled_from(["x", "é", "\U0001f680", "\\n"])) * length + '"'
    escapes = ["\\ud800", "\\udfff", "\\ud83d\\ude80", "\\udc00\\ud800", "\\u0000", '\\"']
    pieces = st.sampled_from(
        [*escapes, "\\\\", "é", "\ud800", "\U0001f680", "\x7f", "\\uFFFF", "\\x41", "\\u12"]
    )
    return '"' + "".join(draw(st.lists(pieces, max_size=6))) + '"'


_wild: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
"""Any JSON value Python writes (wrong types for any field)."""

_scalars: st.SearchStrategy[str] = st.one_of(
    _number(),
    _string(),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "true", "null", ""]),
    _wild.map(json.dumps),
    st.text(max_size=8),
)
raw_values: st.SearchStrategy[str] = st.one_of(
    _scalars,
    _deep(),
    _many(),
    st.builds(lambda key, value: f"{{{key}: {value}}}", _string(), _scalars),
)
"""Raw JSON text for one value, valid or not."""


def _objects(value: Any) -> list[dict[str, Any]]:
    """Every JSON object in ``value``, itself included."""
    found: list[dict[str, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@st.composite
def hostile_frames(draw: st.DrawFn) -> str | bytes:
    """A valid frame, then damaged: keys dropped, added or retyped, ``type`` changed,
    values replaced by raw text, the whole wrapped, cut, or sent as bytes."""
    obj: dict[str, Any] = json.loads(dump_frame(draw(frame_strategy())))
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=3, unique=True)):
        del obj[key]  # missing fields, or no type at all
    if draw(st.integers(0, 4)) == 0:
        known = draw(st.sampled_from(sorted(FRAME_TYPES)))
        obj["type"] = draw(
            st.sampled_from([known.upper(), f" {known}", f"{known}.", known[:-1], ""])
            | st.text(max_size=20)
            | st.builds(lambda n: "z" * n, st.integers(0, 900_000))
        )
    splices = draw(st.lists(raw_values, max_size=3))
    for _ in splices:
        target = draw(st.sampled_from(_objects(obj)))  # the frame or an object inside
        names = st.sampled_from(sorted(target)) if target else st.nothing()
        key = draw(names | st.text(max_size=8))
        target[key] = _SPLICE  # a field retyped, or an unknown one
    text = json.dumps(obj)
    for raw in splices:
        text = text.replace(json.dumps(_SPLICE), raw, 1)
    wrap = draw(st.sampled_from(["", "bom", "space", "trailing", "cut", "array"]))
    if wrap == "bom":
        text = "\ufeff" + text
    elif wrap == "space":
        text = " \t\r\n" + text + "\n"
    elif wrap == "trailing":
        text += draw(st.sampled_from(["x", "}", " {}", "\x00", ",", "\ud800"]))
    elif wrap == "cut":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif wrap == "array":
        text = f"[{text}]"
    if draw(st.booleans()):
        return text.encode("utf-8", "surrogatepass")
    return text


@_fuzz(300)
@given(data=hostile_frames())
def test_hostile_text_is_a_frame_or_a_useful_protocol_error(data: str | bytes) -> None:
    """Damaged frames are a frame (that can be written back as it came) or a
    ProtocolError with a documented code and a reason short enough for an error frame."""
    _outcome(data)


@_fuzz(200)
@given(
    frame=frame_strategies()["session.status"] | frame_strategies()["command"],
    key=st.text(max_size=8),
    raw=raw_values,
)
def test_free_form_values_are_kept_as_sent_or_refused(frame: Any, key: str, raw: str) -> None:
    """Any raw value in a free-form field (a spec's ``platform_options``, a status's
    ``platform_metadata``) is kept as sent or refused: never changed on the way through."""
    obj = json.loads(dump_frame(frame))
    free = obj["status"]["platform_metadata"] if "status" in obj else None
    if free is None:
        if obj.get("spec") is None:
            obj["spec"] = json.loads(_SPEC)
            obj |= {"session_id": "s1", "generation": 1}
        free = obj["spec"].setdefault("platform_options", {})
    free[key] = _SPLICE
    _outcome(json.dumps(obj).replace(json.dumps(_SPLICE), raw, 1))


_SPEC = json.dumps({"session_id": "s1", "generation": 1, "user": "ada", "template": "firefox"})


@_fuzz(200)
@given(
    data=st.text(st.characters(), max_size=200)
    | st.builds(lambda ch, n: ch * n, st.characters(), st.integers(0, MAX_TEXT_FRAME_BYTES + 10))
    | raw_values
)
def test_any_text_is_a_frame_or_a_useful_protocol_error(data: str) -> None:
    """Any text at all (lone surrogates, a character repeated past the size limit, a bare
    value) is a frame or a useful ProtocolError."""
    _outcome(data)


@_fuzz(200)
@given(
    data=st.binary(max_size=300)
    | hostile_frames().map(lambda d: d if isinstance(d, bytes) else d.encode("utf-8", "replace"))
    | st.sampled_from([b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff\xfe{}"])
)
def test_any_bytes_are_a_frame_or_a_useful_protocol_error(data: bytes) -> None:
    """Any bytes (overlong encodings, CESU-8 surrogates, code points past U+10FFFF) are a
    frame or a useful ProtocolError."""
    _outcome(data)


@_fuzz(200)
@given(data=hostile_frames().filter(lambda d: isinstance(d, str)))
def test_text_and_its_utf8_bytes_parse_alike(data: str) -> None:
    """A text frame and its UTF-8 bytes give the same frame or the same error code (a
    text that UTF-8 cannot encode, holding a lone surrogate, is refused either way)."""
    try:
        encoded = data.encode("utf-8")
    except UnicodeEncodeError:
        assert isinstance(_outcome(data), ProtocolError)
        assert isinstance(_outcome(data.encode("utf-8", "surrogatepass")), ProtocolError)
        return
    as_text, as_bytes = _outcome(data), _outcome(encoded)
    if isinstance(as_text, ProtocolError):
        assert isinstance(as_bytes, ProtocolError)
        assert as_bytes.code == as_text.code
    else:  # fields left out default to the time of parsing: compare what was sent
        assert isinstance(as_bytes, type(as_text))
        assert as_bytes.model_dump(exclude_unset=True) == as_text.model_dump(exclude_unset=True)


# -- binary frames -----------------------------------------------------------------------

stream_ids = st.sampled_from([1, 2, 0xFFFFFFFE, 0xFFFFFFFF]) | st.integers(1, 0xFFFFFFFF)
payload_sizes = (
    st.sampled_from([0, 1, MAX_BINARY_PAYLOAD_BYTES - 1, MAX_BINARY_PAYLOAD_BYTES])
    | st.integers(0, 64)
    | st.integers(0, MAX_BINARY_PAYLOAD_BYTES)
)


def _payload(pattern: bytes, size: int) -> bytes:
    return (pattern * (size // len(pattern) + 1))[:size]


@_fuzz(100)
@given(
    stream_id=stream_ids,
    size=payload_sizes,
    pattern=st.binary(min_size=1, max_size=16),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_binary_round_trip_for_every_stream_and_size(
    stream_id: int, size: int, pattern: bytes, kind: type[bytes | bytearray | memoryview]
) -> None:
    """Every stream id 1..2**32-1 and payload of 0..MAX_BINARY_PAYLOAD_BYTES comes back."""
    payload = _payload(pattern, size)
    frame = encode_data(stream_id, kind(payload))
    assert len(frame) == DATA_HEADER_SIZE + size
    decoded_id, decoded = decode_data(kind(frame))
    assert decoded_id == stream_id
    assert decoded == payload


@_fuzz(300)
@given(
    data=st.binary(max_size=64)
    | st.builds(
        lambda head, size: head + bytes(size),
        st.binary(min_size=0, max_size=DATA_HEADER_SIZE),
        st.sampled_from([0, MAX_BINARY_PAYLOAD_BYTES, MAX_BINARY_PAYLOAD_BYTES + 1]),
    )
)
def test_any_bytes_decode_to_data_or_a_protocol_error(data: bytes) -> None:
    """Any bytes are a stream id and payload that encode back to the same bytes, or a
    ProtocolError with a documented code."""
    error: ProtocolError | None = None
    try:
        stream_id, payload = decode_data(data)
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.code in BINARY_ERROR_CODES, error.code
        assert error.reason
        assert len(error.reason) <= MAX_REASON_CHARS
        return
    assert 1 <= stream_id <= 0xFFFFFFFF
    assert payload.nbytes <= MAX_BINARY_PAYLOAD_BYTES
    assert encode_data(stream_id, payload) == data


@_fuzz(100)
@given(
    stream_id=st.integers(-(2**70), 2**70),
    size=st.sampled_from([0, 1, MAX_BINARY_PAYLOAD_BYTES, MAX_BINARY_PAYLOAD_BYTES + 1]),
)
def test_encode_refuses_only_with_protocol_errors(stream_id: int, size: int) -> None:
    """encode_data accepts exactly ids 1..2**32-1 and payloads up to the limit; anything
    else is a ProtocolError (bad_stream, too_large), never struct.error."""
    fits = 1 <= stream_id <= 0xFFFFFFFF and size <= MAX_BINARY_PAYLOAD_BYTES
    if not fits:
        with pytest.raises(ProtocolError) as refused:
            encode_data(stream_id, bytes(size))
        assert refused.value.code in {"bad_stream", "too_large"}
        return
    assert decode_data(encode_data(stream_id, bytes(size)))[0] == stream_id


# -- what this fuzzing found -------------------------------------------------------------

_START = {
    "type": "command",
    "command_id": "c1",
    "session_id": "s1",
    "generation": 1,
    "action": "start",
}


def _start_with_options(raw: str) -> str:
    """A start command whose spec's ``platform_options`` is ``raw`` JSON text."""
    spec = {**json.loads(_SPEC), "platform_options": _SPLICE}
    return json.dumps({**_START, "spec": spec}).replace(json.dumps(_SPLICE), raw)


def _status_with_metadata(raw: str) -> str:
    """A session.status frame whose ``platform_metadata`` is ``raw`` JSON text."""
    status = {"session_id": "s1", "generation": 1, "state": "running"}
    frame = {"type": "session.status", "status": {**status, "platform_metadata": _SPLICE}}
    return json.dumps(frame).replace(json.dumps(_SPLICE), raw)


@pytest.mark.parametrize("build", [_start_with_options, _status_with_metadata])
@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        pytest.param('{"x": NaN}', "not finite", id="nan"),
        pytest.param('{"x": [Infinity]}', "not finite", id="infinity"),
        pytest.param('{"x": -Infinity}', "not finite", id="minus-infinity"),
        pytest.param('{"x": 1e400}', "not finite", id="exponent-overflow"),
        pytest.param('{"x": 1' + "0" * 400 + ".5}", "not finite", id="digits-overflow"),
        pytest.param('{"\\ud800": 1}', "lone UTF-16 surrogate", id="surrogate-key"),
        pytest.param('{"x": ' + "[" * 130 + "]" * 130 + "}", "nested deeper", id="depth-130"),
        pytest.param('{"x": ' + "[" * 255 + "]" * 255 + "}", "nested deeper", id="depth-255"),
    ],
)
def test_free_form_json_that_would_change_on_the_way_is_refused(
    build: Any, raw: str, problem: str
) -> None:
    """Free-form JSON that ``dump_frame`` would write otherwise is refused as ``invalid``.

    It was accepted: NaN and infinities (and floats too large, read as infinity) were
    written back as ``null``; a lone surrogate in a key was written as invalid UTF-8; and
    nesting of 255 levels parsed, then ``dump_frame`` raised.
    """
    with pytest.raises(ProtocolError) as info:
        parse_frame(build(raw))
    assert info.value.code == "invalid"
    assert problem in info.value.reason


@pytest.mark.parametrize("build", [_start_with_options, _status_with_metadata])
@pytest.mark.parametrize(
    "raw",
    [
        '{"x": 1e5, "y": -0.0, "z": 5e-324, "big": ' + "9" * 400 + "}",
        '{"x": "NaN Infinity 1e400 \\ud83d\\ude80"}',
        '{"x": ' + "[" * 100 + "]" * 100 + "}",
    ],
    ids=["finite-numbers", "look-alike-text", "depth-100"],
)
def test_free_form_json_that_survives_the_way_is_kept(build: Any, raw: str) -> None:
    """What JSON carries exactly still parses, and comes back the same."""
    frame = parse_frame(build(raw))
    assert parse_frame(dump_frame(frame)) == frame


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(json.dumps({"type": "z" * 900_000}), id="long-unknown-type"),
        pytest.param(
            json.dumps(
                {
                    "type": "agent.hello",
                    "agent_id": "a",
                    "platform": "p",
                    "capacity": {"max_sessions": 1},
                    "sessions": [{}] * 20_000,
                }
            ),
            id="20000-bad-sessions",
        ),
        pytest.param(
            json.dumps(
                {
                    "type": "agent.hello",
                    "agent_id": "a",
                    "platform": "p",
                    "capacity": {"max_sessions": 1},
                    "labels": {"k" * 100_000: 5},
                }
            ),
            id="long-key",
        ),
        pytest.param(
            _start_with_options(
                '{"x": ' + ('{"' + "k" * 3000 + '": ') * 300 + "1" + "}" * 300 + "}"
            ),
            id="deep-long-keys",
        ),
    ],
)
def test_the_reason_does_not_grow_with_the_frame(text: str) -> None:
    """An error's reason stays short whatever the frame holds, so the error frame that
    answers it is small. It was the frame's size or more: every error of every item, each
    with its full path, and an unknown type repeated whole (2.4 MB for a 1 MB frame)."""
    outcome = _outcome(text)
    if isinstance(outcome, ProtocolError):
        assert len(outcome.reason) <= MAX_REASON_CHARS
    else:
        assert len(dump_frame(outcome)) <= MAX_TEXT_FRAME_BYTES


def test_many_errors_say_how_many_more() -> None:
    """Past the first few errors the reason counts the rest."""
    frame = json.dumps(
        {
            "type": "agent.hello",
            "agent_id": "a",
            "platform": "p",
            "capacity": {"max_sessions": 1},
            "sessions": [{}] * 100,
        }
    )
    with pytest.raises(ProtocolError) as info:
        parse_frame(frame)
    assert info.value.code == "invalid"
    assert info.value.reason.count("sessions.") == 5
    assert info.value.reason.endswith("more")
