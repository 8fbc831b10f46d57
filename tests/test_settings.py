"""Configuration: defaults, validation messages naming the variable, secrets that never print."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from service.errors import SettingsError
from service.settings import Secret, load_settings, parse_duration


def load(tmp_path: Path, **environ: str):  # type: ignore[no-untyped-def]
    return load_settings(
        {"TASKRELAY_DATA_DIR": str(tmp_path / "data"), **environ}, env_file=tmp_path / ".env"
    )


def test_defaults_use_the_embedded_sqlite_file(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'taskrelay.db'}"
    assert settings.is_sqlite
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.providers["grsai"].base_url == "https://api.grsai.com"
    assert settings.providers["grsai"].mode == "callback"
    assert not settings.providers["openai"].configured


def test_secret_key_is_generated_once_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = load(tmp_path)
    path = tmp_path / "data" / "secret_key"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "TASKRELAY_SECRET_KEY is not set" in caplog.text
    second = load(tmp_path)
    assert first.secret_key == second.secret_key
    assert first.secret_key.reveal() not in caplog.text


def test_secrets_never_print(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        TASKRELAY_SECRET_KEY="super-secret-signing-key",
        TASKRELAY_API_TOKENS="app:very-secret-token",
        TASKRELAY_EVOLINK_API_KEY="sk-evolink-secret",
    )
    text = repr(settings) + str(settings)
    for secret in ("super-secret-signing-key", "very-secret-token", "sk-evolink-secret"):
        assert secret not in text
    assert repr(Secret("x")) == "Secret('**********')"


def test_provider_variables(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        TASKRELAY_GRSAI_API_KEY="gk",
        TASKRELAY_GRSAI_BASE_URL="https://api.grsai.cn/",
        TASKRELAY_GRSAI_MODEL="gpt-image-1.5",
        TASKRELAY_GRSAI_MODE="poll",
        TASKRELAY_APIINONE_MODEL="gpt-image-1.5-official",
    )
    grsai = settings.providers["grsai"]
    assert grsai.configured and grsai.api_key is not None and grsai.api_key.reveal() == "gk"
    assert grsai.base_url == "https://api.grsai.cn"
    assert grsai.mode == "poll"
    assert settings.providers["apiinone"].model == "gpt-image-1.5-official"


def test_sandbox_points_unconfigured_providers_at_itself(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        TASKRELAY_SANDBOX="true",
        TASKRELAY_PUBLIC_URL="http://localhost:9999",
        TASKRELAY_EVOLINK_BASE_URL="https://real.example",
    )
    assert settings.providers["gptimage15"].base_url == "http://localhost:9999/sandbox/gptimage15"
    assert settings.providers["gptimage15"].configured
    assert settings.providers["evolink"].base_url == "https://real.example"


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\nTASKRELAY_PORT=9100\nexport TASKRELAY_LOG_LEVEL='debug'\n"
        'TASKRELAY_PUBLIC_URL="https://from-file.example"\n'
    )
    settings = load_settings(
        {"TASKRELAY_DATA_DIR": str(tmp_path), "TASKRELAY_PUBLIC_URL": "https://env.example"},
        env_file=env_file,
    )
    assert settings.port == 9100
    assert settings.log_level == "DEBUG"
    assert settings.public_url == "https://env.example"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TASKRELAY_PORT", "eighty", "a TCP port number"),
        ("TASKRELAY_PORT", "70000", "a TCP port number"),
        ("TASKRELAY_PUBLIC_URL", "ftp://x", "an http(s) base URL"),
        ("TASKRELAY_PUBLIC_URL", "https://x/?a=1", "an http(s) base URL"),
        ("TASKRELAY_DATABASE_URL", "mysql://x", "a sqlite:/// or postgresql:// URL"),
        ("TASKRELAY_API_TOKENS", "justatoken", "name:token pairs"),
        ("TASKRELAY_API_TOKENS", "a:shorttk", "name:token pairs"),
        ("TASKRELAY_API_TOKENS", "a:12345678,a:87654321", "name:token pairs"),
        ("TASKRELAY_API_TOKENS", "a:12345678,b:12345678", "name:token pairs"),
        ("TASKRELAY_SANDBOX", "maybe", "true or false"),
        ("TASKRELAY_GRSAI_MODE", "carrier-pigeon", "callback, poll or stream"),
        ("TASKRELAY_CALLBACK_TOKEN_TTL", "soon", "a duration such as 7d"),
        ("TASKRELAY_MAX_BODY_BYTES", "-1", "a number of bytes"),
        ("TASKRELAY_LOG_LEVEL", "LOUD", "DEBUG, INFO, WARNING or ERROR"),
        ("TASKRELAY_EVOLINK_BASE_URL", "not a url", "an http(s) base URL"),
    ],
)
def test_bad_values_name_the_variable(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, **{variable: value})
    assert variable in caught.value.message
    assert expected in caught.value.message
    assert caught.value.details["variable"] == variable


def test_short_secret_key_and_ttl_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="TASKRELAY_SECRET_KEY"):
        load(tmp_path, TASKRELAY_SECRET_KEY="short")
    with pytest.raises(SettingsError, match="TASKRELAY_CALLBACK_TOKEN_TTL"):
        load(tmp_path, TASKRELAY_CALLBACK_TOKEN_TTL="10m")


def test_postgres_url_is_given_the_psycopg_driver(tmp_path: Path) -> None:
    settings = load(tmp_path, TASKRELAY_DATABASE_URL="postgresql://u@db:5432/relay")
    assert settings.database_url == "postgresql+psycopg://u@db:5432/relay"
    assert not settings.is_sqlite


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("15m", 900.0),
        ("12h", 43200.0),
        ("7d", 604800.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_errors_never_repeat_the_value(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, TASKRELAY_API_TOKENS="alice:VERY-SECRET-alice-token,bob:short")
    assert "VERY-SECRET" not in caught.value.message
    assert "bob" in caught.value.message  # says which entry is wrong
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, TASKRELAY_DATABASE_URL="mysql://user:hunter2@db/x")
    assert "hunter2" not in caught.value.message


@pytest.mark.parametrize(
    ("variable", "pasted"),
    [
        # A key pasted into the wrong variable: Python's own parsers quote what they refuse.
        ("TASKRELAY_DB_POOL_SIZE", "sk-live-PASTED-KEY-123"),
        ("TASKRELAY_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8,sk-live-PASTED-KEY-123"),
        ("TASKRELAY_POLL_LEASE", "sk-live-PASTED-KEY-123"),
    ],
)
def test_a_secret_in_the_wrong_variable_is_not_repeated(
    tmp_path: Path, variable: str, pasted: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, **{variable: pasted})
    assert variable in caught.value.message
    assert "PASTED" not in caught.value.message and "PASTED" not in str(caught.value.details)


def test_a_bad_env_file_line_is_not_repeated(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("TASKRELAY_API_TOKENS=a:fine-token-123456\nsk-live-PASTED-KEY-123\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({}, env_file=env_file)
    assert ":2:" in caught.value.message and "PASTED" not in caught.value.message


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com", "::"])
def test_the_sandbox_is_refused_off_loopback(tmp_path: Path, host: str) -> None:
    with pytest.raises(SettingsError, match="TASKRELAY_SANDBOX"):
        load(tmp_path, TASKRELAY_SANDBOX="true", TASKRELAY_HOST=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_the_sandbox_runs_on_loopback(tmp_path: Path, host: str) -> None:
    assert load(tmp_path, TASKRELAY_SANDBOX="true", TASKRELAY_HOST=host).sandbox


@pytest.mark.parametrize("variable", ["TASKRELAY_PROVIDER_TIMEOUT", "TASKRELAY_SHUTDOWN_TIMEOUT"])
def test_the_provider_and_shutdown_timeouts_are_validated_durations(
    tmp_path: Path, variable: str
) -> None:
    field = variable.removeprefix("TASKRELAY_").lower()
    assert getattr(load(tmp_path), field) == 30.0
    assert getattr(load(tmp_path, **{variable: "1s"}), field) == 1.0
    assert getattr(load(tmp_path, **{variable: "500ms"}), field) == 0.5
    assert getattr(load(tmp_path, **{variable: "2m"}), field) == 120.0
    for bad, reason in [
        ("soon", "a number of seconds"),
        ("0", "greater than zero"),
        ("-5s", "a number of seconds"),
        ("2h", "at most 3600 s"),  # a unit slip: 2h for 2s, or 2m
    ]:
        with pytest.raises(SettingsError) as caught:
            load(tmp_path, **{variable: bad})
        assert caught.value.details["variable"] == variable
        assert variable in caught.value.message
        assert "a duration such as 30s, at most 1h" in caught.value.message
        assert reason in caught.value.message, caught.value.message


def test_the_provider_timeout_bounds_reads_and_writes_but_not_connecting(tmp_path: Path) -> None:
    from service.app import upstream_timeout

    timeout = upstream_timeout(load(tmp_path, TASKRELAY_PROVIDER_TIMEOUT="90s").provider_timeout)
    assert (timeout.read, timeout.write) == (90.0, 90.0)
    assert (timeout.connect, timeout.pool) == (5.0, 5.0)


def test_the_shutdown_budget_keeps_a_reserve_for_the_end() -> None:
    from service.app import shutdown_drain_seconds

    assert shutdown_drain_seconds(30.0) == 25.0  # a fifth, at most 5 s
    assert shutdown_drain_seconds(100.0) == 95.0
    assert shutdown_drain_seconds(10.0) == 8.0
    assert 0 < shutdown_drain_seconds(0.5) < 0.5
