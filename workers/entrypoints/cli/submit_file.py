"""``t2iroute submit --file``: many requests from a file or standard input.

A file holds one prompt per line, or one JSON object per line with the prompt and the
producer's parameters (``{"prompt": "a cat", "seed": 3, "steps": 4}``); the first prompt line
tells which (JSON lines when it starts with ``{``). Blank lines and lines starting with ``#``
are skipped. Every line is validated as the producer validates one request, with the same
message and its line number, and nothing is submitted while a line is refused: a file is
fixed and sent again, never half sent."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db import queries
from db.session import session_scope
from workers.services.producer import InvalidRequest, parse_request, submit
from workers.services.traffic import BatchOutcome, batch_outcome
from workers.settings import Settings

__all__ = [
    "PromptFileError",
    "PromptLine",
    "SubmittedLine",
    "read_prompt_lines",
    "submit_lines",
    "validate_lines",
    "wait_until_final",
    "write_records",
]

POLL_SECONDS = 0.5


class PromptFileError(ValueError):
    """Lines that cannot be requests: one message per line, each naming its line."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class PromptLine:
    """One request as a line states it: the producer's fields (prompt, seed, width, ...)."""

    number: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class SubmittedLine:
    number: int
    request_id: str
    created: bool


def read_prompt_lines(text: str, source: str) -> list[PromptLine]:
    """The lines of a prompt file. Split on line feeds only (a carriage return before one is
    dropped), so a prompt holding another line separator reaches the producer, which refuses
    it as it would over any other channel."""
    numbered = [
        (number, line.removesuffix("\r"))
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not numbered or not numbered[0][1].lstrip().startswith("{"):
        return [PromptLine(number, {"prompt": line}) for number, line in numbered]
    lines, problems = [], []
    for number, line in numbered:
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{source}, line {number}: not valid JSON: {exc.msg}")
            continue
        if not isinstance(fields, dict):
            problems.append(f"{source}, line {number}: expected a JSON object with a prompt")
            continue
        lines.append(PromptLine(number, fields))
    if problems:
        raise PromptFileError(problems)
    return lines


def validate_lines(
    lines: Sequence[PromptLine], settings: Settings, options: dict[str, Any], source: str
) -> list[PromptLine]:
    """Each line with the command line's options under it (a line's own value wins), checked
    by the producer's own validation; PromptFileError lists every refused line.

    An idempotency key on the command line is a prefix: line N gets ``KEY:N``, so that the
    same file sent twice makes each request once."""
    stated = {name: value for name, value in options.items() if value is not None}
    prefix = stated.pop("idempotency_key", None)
    checked, problems = [], []
    for line in lines:
        fields = {**stated, **line.fields}
        if prefix is not None and "idempotency_key" not in line.fields:
            fields["idempotency_key"] = f"{prefix}:{line.number}"
        try:
            parse_request(settings, **fields)
        except InvalidRequest as exc:
            problems.append(f"{source}, line {line.number}: {exc}")
            continue
        checked.append(PromptLine(line.number, fields))
    if problems:
        raise PromptFileError(problems)
    return checked


def submit_lines(
    lines: Sequence[PromptLine],
    settings: Settings,
    on_each: Callable[[], None] = lambda: None,
) -> tuple[list[SubmittedLine], list[str]]:
    """Submit validated lines in order. A refusal only the database can find (an idempotency
    key used before with other parameters) is returned with its line; the others go on."""
    submitted, refused = [], []
    for line in lines:
        fields = dict(line.fields)
        prompt = fields.pop("prompt")
        try:
            result = submit(prompt, settings=settings, **fields)
        except InvalidRequest as exc:
            refused.append(f"line {line.number}: {exc}")
        else:
            submitted.append(SubmittedLine(line.number, result.request_id, result.created))
        on_each()
    return submitted, refused


def wait_until_final(
    request_ids: Sequence[str],
    settings: Settings,
    timeout: float,
    on_poll: Callable[[int], None] = lambda finished: None,
) -> BatchOutcome:
    """Poll the database until every request is final or ``timeout`` seconds have passed;
    ``on_poll`` gets the number final so far. The outcome as it stands at the end."""
    ids = list(request_ids)
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(settings.database_url) as session:
            finished = queries.count_final(session, ids)
        on_poll(finished)
        if finished == len(ids) or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    with session_scope(settings.database_url) as session:
        return batch_outcome(session, ids)


def write_records(
    path: Path, submitted: Sequence[SubmittedLine], outcome: BatchOutcome, image_store: Path
) -> None:
    """One JSON object per submitted line: its request, and where it stands (the answer's
    tier, image file and mean quality once there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for line, request in zip(submitted, outcome.requests, strict=True):
            record = {
                "line": line.number,
                "request_id": line.request_id,
                "created": line.created,
                "status": request.status,
                "tier": request.tier,
                "image": None if request.image is None else str(image_store / request.image),
                "quality": request.quality,
                "failure_reason": request.failure_reason,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
