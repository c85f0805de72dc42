"""A T2IROUTE_ variable that names no setting refuses to start, naming the closest one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.settings import Settings, unknown_variables


def test_a_misspelt_variable_is_refused_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("T2IROUTE_CLOUD_RATO", "0.2")
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "T2IROUTE_CLOUD_RATO is no setting; did you mean T2IROUTE_CLOUD_RATIO?" in message
    assert "T2IROUTE_UNKNOWN_VARIABLES=warn" in message


def test_a_renamed_variable_without_a_close_match_is_still_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("T2IROUTE_ZZZZ", "1")
    with pytest.raises(ValidationError, match="T2IROUTE_ZZZZ is no setting"):
        Settings()


def test_lower_case_names_count_as_the_settings_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("t2iroute_cloud_ratio", "0.2")
    assert Settings().cloud_ratio == 0.2
    monkeypatch.setenv("t2iroute_cloud_rato", "0.2")
    with pytest.raises(ValidationError, match="did you mean T2IROUTE_CLOUD_RATIO"):
        Settings()


def test_the_escape_hatch_warns_and_starts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("T2IROUTE_CLOUD_RATO", "0.2")
    monkeypatch.setenv("T2IROUTE_UNKNOWN_VARIABLES", "warn")
    with caplog.at_level(logging.WARNING, logger="workers.settings"):
        settings = Settings()
    assert settings.cloud_ratio == 0.3
    assert "T2IROUTE_CLOUD_RATO is no setting; did you mean T2IROUTE_CLOUD_RATIO?" in caplog.text


def test_the_dotenv_file_is_checked_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("T2IROUTE_EXPLORATION_RATES=0.1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match="did you mean T2IROUTE_EXPLORATION_RATE"):
        Settings()


def test_test_suite_variables_and_other_prefixes_are_left_alone() -> None:
    environ = {
        "T2IROUTE_TEST_DATABASE": "x",
        "T2IROUTE_TEST_FAULT_SCALE": "0.5",
        "T2IROUTE_CLOUD_RATIO": "0.2",
        "PATH": "/bin",
        "T2IROUTEX": "1",
    }
    assert unknown_variables(environ) == []


def test_the_command_line_refuses_to_start() -> None:
    env = {**os.environ, "T2IROUTE_CLOUD_RATO": "0.2"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.entrypoints.cli.main",
            "status",
            "00000000-0000-0000-0000-000000000000",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "did you mean T2IROUTE_CLOUD_RATIO" in done.stderr
    assert "Traceback" not in done.stderr
