"""Producer-side validation: what is accepted is sane, what is refused says why."""

from __future__ import annotations

import math
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.services.producer import (
    MAX_KEY_CHARS,
    MAX_SEED,
    FieldProblem,
    InvalidRequest,
    parse_request,
    refusal_message,
)
from workers.settings import Settings

SETTINGS = Settings(max_prompt_chars=200)
NUMBERS = ("width", "height", "steps", "seed", "guidance_scale")

# Characters that show nothing: whitespace, format (Cf) and control (Cc) characters, and the
# fillers that Unicode counts as default-ignorable (Hangul fillers, variation selectors).
NOTHING_VISIBLE = st.characters(
    categories=("Zs", "Zl", "Zp", "Cf", "Cc"),
    include_characters="\u115f\u1160\u3164\uffa0\ufe0f\u034f\u180b",
)
# What is stripped from both ends of a prompt: whitespace and format characters.
PADDING = st.characters(categories=("Zs", "Zl", "Zp", "Cf"), include_characters="\n\t")
# Any text at all, lone surrogates included, with the invisible characters well represented.
ANY_TEXT = st.text(st.characters(categories=("L", "M", "N", "P", "S", "Cs")) | NOTHING_VISIBLE)
JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT | st.binary(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=6,
)


def _shows_nothing(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) == "Cf"


@given(ANY_TEXT.filter(lambda t: len(t) <= 300))
def test_any_text_is_either_a_clean_prompt_or_refused_with_a_reason(text: str) -> None:
    try:
        spec = parse_request(SETTINGS, prompt=text)
    except InvalidRequest as exc:
        assert str(exc).startswith("invalid request: prompt:")
        return
    assert spec.prompt != ""
    assert not _shows_nothing(spec.prompt[0]) and not _shows_nothing(spec.prompt[-1])
    assert spec.prompt in text
    assert len(spec.prompt) <= SETTINGS.max_prompt_chars
    assert not any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in spec.prompt)
    spec.prompt.encode("utf-8")


@given(st.text(NOTHING_VISIBLE, max_size=50))
def test_text_with_nothing_visible_is_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_request(SETTINGS, prompt=text)
    assert str(refused.value) in (
        "invalid request: prompt: prompt is empty",
        "invalid request: prompt: prompt contains control characters",
    )


@given(st.text(PADDING, max_size=5), ANY_TEXT, st.text(PADDING, max_size=5))
def test_padding_around_a_prompt_is_dropped(before: str, core: str, after: str) -> None:
    try:
        expected = parse_request(SETTINGS, prompt=core).prompt
    except InvalidRequest:
        return
    assert parse_request(SETTINGS, prompt=before + core + after).prompt == expected


@given(st.fixed_dictionaries({}, optional=dict.fromkeys(("prompt", *NUMBERS), JSON_LIKE)))
def test_a_refusal_is_always_an_invalid_request_naming_its_fields(fields: dict[str, Any]) -> None:
    try:
        parse_request(SETTINGS, **fields)
    except InvalidRequest as exc:
        assert exc.problems
        assert str(exc) == refusal_message(exc.problems)
        assert {p.field for p in exc.problems} <= {"prompt", *fields}


@given(st.dictionaries(ANY_TEXT, JSON_LIKE, max_size=4))
def test_any_field_name_and_value_gives_a_spec_or_an_invalid_request(
    fields: dict[str, Any],
) -> None:
    try:
        parse_request(SETTINGS, **{"prompt": "a cat", **fields})
    except InvalidRequest as exc:
        assert str(exc) == refusal_message(exc.problems)
        # Field names are the client's text: never raw control characters in the message.
        assert str(exc).isprintable()


@given(st.integers(min_value=-10_000, max_value=10_000))
def test_sides_must_be_multiples_of_eight_within_bounds(side: int) -> None:
    ok = SETTINGS.min_side <= side <= SETTINGS.max_side and side % 8 == 0
    if ok:
        assert parse_request(SETTINGS, prompt="a cat", width=side).width == side
    else:
        with pytest.raises(InvalidRequest, match="width"):
            parse_request(SETTINGS, prompt="a cat", width=side)


@given(st.integers(min_value=0, max_value=MAX_SEED), st.integers(1, SETTINGS.max_steps))
def test_integers_in_range_are_accepted(seed: int, steps: int) -> None:
    spec = parse_request(SETTINGS, prompt="a cat", seed=seed, steps=steps)
    assert (spec.seed, spec.steps) == (seed, steps)


@given(st.sampled_from(NUMBERS), st.booleans())
def test_booleans_are_no_numbers(name: str, value: bool) -> None:
    kind = "number" if name == "guidance_scale" else "integer"
    with pytest.raises(InvalidRequest) as refused:
        parse_request(SETTINGS, prompt="a cat", **{name: value})
    assert str(refused.value) == f"invalid request: {name}: Input should be a valid {kind}"


@given(
    st.sampled_from(("width", "height", "steps", "seed")),
    st.floats() | st.integers().map(str) | st.decimals().map(str),
)
def test_integer_fields_take_integers_only(name: str, value: float | str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_request(SETTINGS, prompt="a cat", **{name: value})
    assert str(refused.value) == f"invalid request: {name}: Input should be a valid integer"


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**400), 10**400))
def test_guidance_scale_is_a_finite_number_within_bounds(value: float) -> None:
    # NaN compares false with everything and the infinities lie outside: neither passes.
    if 0.0 <= value <= 50.0:
        assert parse_request(SETTINGS, prompt="a cat", guidance_scale=value).guidance_scale == value
        return
    with pytest.raises(InvalidRequest) as refused:
        parse_request(SETTINGS, prompt="a cat", guidance_scale=value)
    assert str(refused.value).startswith("invalid request: guidance_scale: ")


@given(
    st.text(
        st.characters(categories=("L", "N", "P", "S", "M", "Zs", "Cc", "Cf", "Cs")),
        max_size=MAX_KEY_CHARS + 20,
    )
)
def test_an_idempotency_key_is_kept_exactly_or_refused(key: str) -> None:
    try:
        spec = parse_request(SETTINGS, prompt="a cat", idempotency_key=key)
    except InvalidRequest as exc:
        assert str(exc).startswith("invalid request: idempotency_key: ")
        return
    assert spec.idempotency_key == key
    assert 1 <= len(key) <= MAX_KEY_CHARS
    assert key.isprintable() and key == key.strip()


def test_a_non_ascii_key_is_kept_as_given() -> None:
    assert parse_request(SETTINGS, prompt="a cat", idempotency_key="clé-1").idempotency_key == (
        "clé-1"
    )


def test_the_message_names_every_problem_in_order() -> None:
    problems = [FieldProblem("prompt", "prompt is empty"), FieldProblem("seed", "too big")]
    assert refusal_message(problems) == "invalid request: prompt: prompt is empty; seed: too big"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "a\x00cat"}, "control characters"),
        ({"prompt": "\ud800 lone surrogate"}, "UTF-8"),
        ({"prompt": "\u200b\ufeff\u2060"}, "prompt is empty"),
        ({"prompt": "\u3164"}, "prompt is empty"),
        ({"prompt": "x" * 201}, "limit is 200"),
        ({"prompt": "a cat", "seed": -1}, "seed"),
        ({"prompt": "a cat", "steps": 151}, "steps"),
        ({"prompt": "a cat", "steps": "7"}, "steps: Input should be a valid integer"),
        ({"prompt": "a cat", "guidance_scale": 99}, "guidance_scale"),
        ({"prompt": "a cat", "guidance_scale": math.nan}, "finite number"),
        ({"prompt": "a cat", "idempotency_key": "bad\nkey"}, "printable"),
        ({"prompt": "a cat", "idempotency_key": "key\ud800"}, "valid UTF-8"),
        ({"prompt": "a cat", "idempotency_key": " key"}, "begin or end with a space"),
        ({"prompt": "a cat", "tier": "cloud"}, "tier"),
        ({"prompt": "a cat", "settings": {}}, "settings: Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_named_in_the_message(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_request(SETTINGS, **fields)
