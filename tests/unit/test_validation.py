"""Producer-side validation: what is accepted is sane, what is refused says why."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.producer import InvalidRequest, parse_request
from workers.settings import Settings

SETTINGS = Settings(max_prompt_chars=200)


@given(st.text(max_size=300))
def test_any_text_is_either_a_clean_prompt_or_refused_with_a_reason(text: str) -> None:
    try:
        spec = parse_request(SETTINGS, prompt=text)
    except InvalidRequest as exc:
        assert str(exc).startswith("invalid request: prompt:")
        return
    assert spec.prompt == spec.prompt.strip() != ""
    assert len(spec.prompt) <= SETTINGS.max_prompt_chars
    assert not any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in spec.prompt)


@given(st.integers(min_value=-10_000, max_value=10_000))
def test_sides_must_be_multiples_of_eight_within_bounds(side: int) -> None:
    ok = SETTINGS.min_side <= side <= SETTINGS.max_side and side % 8 == 0
    if ok:
        assert parse_request(SETTINGS, prompt="a cat", width=side).width == side
    else:
        with pytest.raises(InvalidRequest, match="width"):
            parse_request(SETTINGS, prompt="a cat", width=side)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "a\x00cat"}, "control characters"),
        ({"prompt": "\ud800 lone surrogate"}, "UTF-8"),
        ({"prompt": "x" * 201}, "limit is 200"),
        ({"prompt": "a cat", "seed": -1}, "seed"),
        ({"prompt": "a cat", "steps": 151}, "steps"),
        ({"prompt": "a cat", "guidance_scale": 99}, "guidance_scale"),
        ({"prompt": "a cat", "idempotency_key": "bad\nkey"}, "printable"),
        ({"prompt": "a cat", "tier": "cloud"}, "tier"),
    ],
)
def test_bad_fields_are_named_in_the_message(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_request(SETTINGS, **fields)
