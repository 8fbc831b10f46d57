"""Configuration: defaults, validation messages naming the variable, secrets that never print."""

from __future__ import annotations

import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import settings as settings_module
from service.app import ANSWER_MARGIN, poll_policies, upstream_timeout
from service.errors import SettingsError
from service.netguard import AddressPolicy
from service.providers import build_adapters
from service.settings import MAX_DURATION, Secret, check_public_url, load_settings, parse_duration
from service.submitter import RECORD_RETRY_WAITS


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


def test_an_empty_key_file_is_replaced_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    """A key file left empty (a crash while an older release wrote it, or a touch) signed
    nothing: a new key takes its place, rather than start-up failing for good ("File
    exists")."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "secret_key").write_text("")
    first = load(tmp_path)
    assert len(first.secret_key.reveal()) >= 16
    assert (folder / "secret_key").read_text().strip() == first.secret_key.reveal()
    assert stat.S_IMODE((folder / "secret_key").stat().st_mode) == 0o600
    assert load(tmp_path).secret_key == first.secret_key
    # The key, and the lock the makers take turns on: no half-written file left.
    assert sorted(path.name for path in folder.iterdir()) == [".secret_key.lock", "secret_key"]


@pytest.mark.parametrize("empty_file", [False, True])
def test_processes_starting_at_once_keep_one_key(tmp_path: Path, empty_file: bool) -> None:
    """migrate and serve started together on one volume: each made a key and the last
    rename won, so one ran with a key the file no longer held."""
    import threading

    if empty_file:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "secret_key").write_text("")
    start = threading.Barrier(8)
    keys: list[str] = []

    def starting() -> None:
        start.wait()
        keys.append(load(tmp_path).secret_key.reveal())

    threads = [threading.Thread(target=starting) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert (tmp_path / "data" / "secret_key").read_text().strip() == keys[0]


def test_a_short_key_in_the_key_file_is_refused_as_the_variable_would_be(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "secret_key").write_text("abc\n")
    with pytest.raises(SettingsError) as caught:
        load(tmp_path)
    assert "too short" in caught.value.message and "at least 16" in caught.value.message
    assert "abc" not in caught.value.message


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


def test_the_sandbox_leaves_providers_with_a_key_alone(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        TASKRELAY_SANDBOX="true",
        TASKRELAY_PUBLIC_URL="http://localhost:9999",
        TASKRELAY_GRSAI_API_KEY="sk-real-grsai-key",
    )
    grsai = settings.providers["grsai"]
    assert grsai.base_url == "https://api.grsai.com"
    assert grsai.api_key is not None and grsai.api_key.reveal() == "sk-real-grsai-key"
    openai = settings.providers["openai"]  # no key: the sandbox stands in
    assert openai.base_url == "http://localhost:9999/sandbox/openai"
    assert openai.api_key is not None and openai.api_key.reveal() == "sandbox-key"


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


def test_an_env_file_with_a_byte_order_mark_and_an_empty_variable_keep_their_values(
    tmp_path: Path,
) -> None:
    """A BOM (Windows editors) joined the first name, and an empty variable (compose's
    unset ${VAR}) hid the file's value: either way production silently ran on defaults,
    the embedded SQLite file instead of PostgreSQL."""
    env_file = tmp_path / ".env"
    url = "postgresql://relay@db.example:5432/relay"
    env_file.write_bytes(f"TASKRELAY_DATABASE_URL={url}\nTASKRELAY_PORT=9100\n".encode("utf-8-sig"))
    environ = {"TASKRELAY_DATA_DIR": str(tmp_path), "TASKRELAY_PORT": " "}
    settings = load_settings(environ, env_file=env_file)
    assert settings.database_url == url.replace("postgresql:", "postgresql+psycopg:")
    assert settings.port == 9100


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TASKRELAY_PORT", "eighty", "a TCP port number"),
        ("TASKRELAY_PORT", "70000", "a TCP port number"),
        ("TASKRELAY_PUBLIC_URL", "ftp://x", "an http(s) base URL"),
        ("TASKRELAY_PUBLIC_URL", "https://x/?a=1", "an http(s) base URL"),
        # Malformed hosts and ports were taken, and handed out in callback URLs (config hunt).
        ("TASKRELAY_PUBLIC_URL", "http://relay.example.com:notaport", "port is not a number"),
        ("TASKRELAY_PUBLIC_URL", "https://relay.example.com:99999", "port is not a number"),
        ("TASKRELAY_PUBLIC_URL", "https://relay.example.com:0", "port is not a number"),
        ("TASKRELAY_PUBLIC_URL", "http://:9000", "no host name in it"),
        ("TASKRELAY_PUBLIC_URL", "https://relay example.com", "not a host name or an IP"),
        # ... and a provider's, which crashed `doctor` and every submission (config hunt).
        ("TASKRELAY_GRSAI_BASE_URL", "http://api.grsai.com:notaport", "port is not a number"),
        ("TASKRELAY_GRSAI_BASE_URL", "http://[v1.api]", "in brackets is not an IPv6 address"),
        ("TASKRELAY_PUBLIC_URL", "http://[v1.relay]:8000", "in brackets is not an IPv6"),
        ("TASKRELAY_DATABASE_URL", "mysql://x", "a sqlite:/// or postgresql:// URL"),
        ("TASKRELAY_API_TOKENS", "justatoken", "name:token pairs"),
        ("TASKRELAY_API_TOKENS", "a:shorttk", "name:token pairs"),
        ("TASKRELAY_API_TOKENS", "a:12345678,a:87654321", "name:token pairs"),
        ("TASKRELAY_API_TOKENS", "a:12345678,b:12345678", "name:token pairs"),
        ("TASKRELAY_API_TOKENS", "a:12345678,a:87654321", "entry 2 repeats the client name"),
        ("TASKRELAY_API_TOKENS", "a:12345678,b c:87654321", "client name of entry 2"),
        ("TASKRELAY_API_TOKENS", "a:12345678,,b c:87654321", "client name of entry 2"),
        ("TASKRELAY_SANDBOX", "maybe", "true or false"),
        ("TASKRELAY_GRSAI_MODE", "carrier-pigeon", "callback, poll or stream"),
        ("TASKRELAY_CALLBACK_TOKEN_TTL", "soon", "a duration such as 7d"),
        ("TASKRELAY_MAX_BODY_BYTES", "-1", "a number of bytes"),
        ("TASKRELAY_LOG_LEVEL", "LOUD", "DEBUG, INFO, WARNING or ERROR"),
        ("TASKRELAY_EVOLINK_BASE_URL", "not a url", "an http(s) base URL"),
        # The group-commit writer holds at most 10,000 updates waiting: a batch cannot be more.
        ("TASKRELAY_WRITE_BATCH", "20000", "at most 10000"),
        # An in-memory store loses every task at exit (and crashed the engine's pool set-up).
        ("TASKRELAY_DATABASE_URL", "sqlite:///:memory:", "in-memory SQLite database"),
        ("TASKRELAY_DATABASE_URL", "sqlite:///", "in-memory SQLite database"),
        ("TASKRELAY_DATABASE_URL", "sqlite:///x.db?mode=memory&uri=true", "in-memory"),
        # Durations beyond any real use overflow a date they are added to, later, at run time.
        ("TASKRELAY_EVOLINK_DEADLINE", "99999999999d", "at most 3650d, ten years"),
        ("TASKRELAY_EVOLINK_DEADLINE", "9" * 400, "at most 3650d, ten years"),  # inf as a float
        ("TASKRELAY_CALLBACK_TOKEN_TTL", "3651d", "at most 3650d, ten years"),
        ("TASKRELAY_DELIVERY_SCHEDULE", "0s,5s,99999999999d", "at most 3650d"),
        ("TASKRELAY_EVOLINK_POLL_RATE", "inf", "a number greater than zero"),
        ("TASKRELAY_EVOLINK_POLL_RATE", "nan", "a number greater than zero"),
        # More would leave the provider's submissions one connection of its pool, or none.
        ("TASKRELAY_EVOLINK_POLL_CONCURRENCY", "151", "at most 150"),
        # A background loop that would only spin, a database query each millisecond.
        ("TASKRELAY_SCHEDULER_TICK", "1ms", "at least 10ms"),
        ("TASKRELAY_SUBMIT_SWEEP", "5ms", "at least 10ms"),
        # A port or a scheme in the host: a traceback from deep in start-up before.
        ("TASKRELAY_HOST", "localhost:8000", "no port or scheme"),
        ("TASKRELAY_HOST", "[::1]:8000", "no port or scheme"),
        ("TASKRELAY_HOST", "http://0.0.0.0", "no port or scheme"),
        ("TASKRELAY_HOST", "two words", "not an IP address or a host name"),
        ("TASKRELAY_EVOLINK_POLL_CONCURRENCY", "100000000", "from 1 to 150"),
        # A reason in our own words is shown whole: masking the value in it made it "(an
        # absolute ... or https:// URL)" (config hunt).
        ("TASKRELAY_PUBLIC_URL", "http://", "(an absolute http:// or https:// URL)"),
        # Numbers past any real use: a traceback, or every dispatcher pass failing (config hunt).
        ("TASKRELAY_RATE_LIMIT", "1e308", "at most 1000000000"),
        ("TASKRELAY_DELIVERY_CONCURRENCY", "9" * 20, "at most 1000000000"),
        ("TASKRELAY_EVOLINK_POLL_RATE", "1e300", "at most 1000000000"),
        ("TASKRELAY_EVOLINK_POLL_CONCURRENCY", "0", "from 1 to 150"),
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


def test_a_short_fallback_key_is_refused_like_the_key(tmp_path: Path) -> None:
    key = "k" * 16
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, TASKRELAY_SECRET_KEY=key, TASKRELAY_SECRET_KEY_FALLBACKS=f"{key}2,old-short")
    assert caught.value.details["variable"] == "TASKRELAY_SECRET_KEY_FALLBACKS"
    assert "1 key(s) shorter than 16 characters" in caught.value.message
    assert "old-short" not in caught.value.message
    settings = load(
        tmp_path, TASKRELAY_SECRET_KEY=key, TASKRELAY_SECRET_KEY_FALLBACKS=f" {key}2 , {key}3"
    )
    assert [k.reveal() for k in settings.secret_key_fallbacks] == [f"{key}2", f"{key}3"]


def test_a_signing_key_file_that_cannot_be_created_is_a_settings_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    data_dir = tmp_path / "a-file" / "data"
    with pytest.raises(SettingsError) as caught:
        load_settings({"TASKRELAY_DATA_DIR": str(data_dir)}, env_file=tmp_path / "no.env")
    message = caught.value.message
    assert f"{data_dir / 'secret_key'}" in message and "Not a directory" in message
    assert "TASKRELAY_DATA_DIR" in message and "TASKRELAY_SECRET_KEY" in message


def test_a_named_env_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "prod.env"
    for named, found in [(missing, "does not exist"), (tmp_path, "is not a file")]:
        with pytest.raises(SettingsError) as caught:
            load_settings({"TASKRELAY_ENV_FILE": str(named), "TASKRELAY_DATA_DIR": str(tmp_path)})
        assert f"TASKRELAY_ENV_FILE names {named}, which {found}" in caught.value.message
        assert caught.value.details["variable"] == "TASKRELAY_ENV_FILE"
    missing.write_text("TASKRELAY_PORT=9100\n")
    environ = {"TASKRELAY_ENV_FILE": str(missing), "TASKRELAY_DATA_DIR": str(tmp_path)}
    assert load_settings(environ).port == 9100


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


def test_the_longest_duration_still_fits_in_a_date() -> None:
    longest = parse_duration("3650d")
    assert longest == MAX_DURATION
    assert datetime.now(UTC) + timedelta(seconds=longest) * 100 > datetime.now(UTC)
    for text in ("3651d", "99999999999d", "9" * 400):
        with pytest.raises(ValueError, match="at most 3650d"):
            parse_duration(text)


def test_errors_never_repeat_the_value(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, TASKRELAY_API_TOKENS="alice:VERY-SECRET-alice-token,bob:short")
    assert "VERY-SECRET" not in caught.value.message
    assert "entry 2" in caught.value.message  # says which entry is wrong, by position
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


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_an_unspecified_address_is_no_public_url(tmp_path: Path, host: str) -> None:
    # Listening on every interface is fine; handing providers that address to call back is not
    # (serve checks; commands that hand out no callback URL, such as migrate, load it fine).
    settings = load(tmp_path, TASKRELAY_HOST=host)
    with pytest.raises(SettingsError) as caught:
        check_public_url(settings)
    message = caught.value.message
    assert caught.value.details["variable"] == "TASKRELAY_PUBLIC_URL"
    assert "TASKRELAY_PUBLIC_URL is not set" in message and f"points at {host}," in message
    assert "Set TASKRELAY_PUBLIC_URL to the address providers reach" in message
    public = "https://relay.example.com"
    check_public_url(load(tmp_path, TASKRELAY_HOST=host, TASKRELAY_PUBLIC_URL=public))
    shown = "[::]" if host == "::" else host
    with pytest.raises(SettingsError, match=f"TASKRELAY_PUBLIC_URL points at {host},"):
        check_public_url(load(tmp_path, TASKRELAY_PUBLIC_URL=f"http://{shown}:8000"))


def test_the_default_public_url_of_an_ipv6_host_is_a_url(tmp_path: Path) -> None:
    assert load(tmp_path, TASKRELAY_HOST="::1", TASKRELAY_PORT="9000").public_url == (
        "http://[::1]:9000"
    )


def test_credentials_in_the_public_url_are_refused_unrepeated(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        check_public_url(
            load(tmp_path, TASKRELAY_PUBLIC_URL="https://relay:S3cretPass@relay.example.com")
        )
    assert caught.value.details["variable"] == "TASKRELAY_PUBLIC_URL"
    assert "carries a user name or password" in caught.value.message
    assert "S3cretPass" not in caught.value.message + str(caught.value.details)
    with pytest.raises(SettingsError, match="carries a user name or password"):
        check_public_url(load(tmp_path, TASKRELAY_PUBLIC_URL="https://relay@relay.example.com"))


@pytest.mark.parametrize(
    "value", ["10.0.0.0/8", "10.1.2.3", "::1/128,127.0.0.0/8", "10.1.2.3/8", "fe80::1/64", "x"]
)
def test_allowed_networks_are_read_as_the_address_policy_reads_them(
    tmp_path: Path, value: str
) -> None:
    """One parse: a value the settings accept is one the webhook policy accepts (it used to
    accept 10.1.2.3/8, which then stopped start-up with a traceback)."""
    try:
        AddressPolicy.from_setting(value)
        policy_accepts = True
    except ValueError:
        policy_accepts = False
    try:
        load(tmp_path, TASKRELAY_WEBHOOK_ALLOWED_NETWORKS=value)
        settings_accept = True
    except SettingsError as exc:
        settings_accept = False
        assert exc.details["variable"] == "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS"
    assert settings_accept == policy_accepts


def test_a_network_with_host_bits_is_named_with_what_was_meant(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, TASKRELAY_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8, 10.1.2.3/8")
    assert caught.value.message == (
        "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS: 10.1.2.3/8 has host bits set; write the network "
        "itself (10.0.0.0/8), or 10.1.2.3 alone for just that address."
    )


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


def test_the_database_statement_timeout_is_a_bounded_duration_or_none(tmp_path: Path) -> None:
    variable = "TASKRELAY_DB_STATEMENT_TIMEOUT"
    assert load(tmp_path).db_statement_timeout == 30.0
    assert load(tmp_path, **{variable: "5s"}).db_statement_timeout == 5.0
    assert load(tmp_path, **{variable: "1h"}).db_statement_timeout == 3600.0
    for off in ("0", "0s", "0ms"):
        assert load(tmp_path, **{variable: off}).db_statement_timeout is None
    for bad, reason in [
        ("soon", "a number of seconds"),
        ("500ms", "must be from 1 s to 3600 s, or 0 for no limit"),
        ("2h", "must be from 1 s to 3600 s, or 0 for no limit"),
        ("-1s", "a number of seconds"),
    ]:
        with pytest.raises(SettingsError) as caught:
            load(tmp_path, **{variable: bad})
        assert caught.value.details["variable"] == variable
        assert "a duration such as 30s (1s to 1h), or 0 for no limit" in caught.value.message
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


async def test_the_polling_settings_reach_every_providers_policy(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        TASKRELAY_POLL_GRACE="300ms",
        TASKRELAY_POLL_MAX_INTERVAL="2m",
        TASKRELAY_POLL_ERROR_BACKOFF="750ms",
    )
    async with httpx.AsyncClient() as http:
        policies = poll_policies(settings, build_adapters(settings, http))
    assert set(policies) == set(settings.providers)
    for policy in policies.values():
        assert (policy.grace, policy.max_interval, policy.error_backoff) == (0.3, 120.0, 0.75)
    assert load(tmp_path).poll_error_backoff == 5.0
    with pytest.raises(SettingsError, match="TASKRELAY_POLL_ERROR_BACKOFF"):
        load(tmp_path, TASKRELAY_POLL_ERROR_BACKOFF="0s")


@pytest.mark.parametrize(
    ("mode", "grsai"),
    # The shared client's timeouts (5 s pool, 5 s connect, 20 s write, 20 s read) or the
    # stream's (5, 5, 30, 120), and the 300 s margin.
    [("callback", None), ("poll", 350.0), ("stream", 460.0)],
)
async def test_only_a_provider_that_cannot_call_back_bounds_the_wait_for_an_answer(
    tmp_path: Path, mode: str, grsai: float | None
) -> None:
    """PollPolicy.answer_within: OpenAI (its generation timeouts: 5 + 5 + 30 + 300 s) and
    GrsAI unless it calls back; never a provider whose callback may still come."""
    settings = load(tmp_path, TASKRELAY_GRSAI_MODE=mode, TASKRELAY_PROVIDER_TIMEOUT="20s")
    async with httpx.AsyncClient(timeout=upstream_timeout(settings.provider_timeout)) as http:
        policies = poll_policies(settings, build_adapters(settings, http))
    assert policies["grsai"].answer_within == grsai
    assert policies["openai"].answer_within == 640.0
    # The margin outlasts the submitter's tries to record an answer, with a minute to spare.
    assert sum(RECORD_RETRY_WAITS) + 60 <= ANSWER_MARGIN
    for name in ("gptimage15", "evolink", "apiinone"):
        assert policies[name].answer_within is None


def test_local_only_conveniences_are_refused_on_a_service_reached_from_elsewhere(
    tmp_path: Path,
) -> None:
    """Behind a reverse proxy on the same machine TASKRELAY_HOST is loopback, but the public
    URL is not: the sandbox (a well-known key, every callback URL listed, any URL called back)
    and demo tokens would face the internet."""
    public = {"TASKRELAY_PUBLIC_URL": "https://relay.example.com"}
    with pytest.raises(SettingsError, match="TASKRELAY_SANDBOX=true is for this machine only"):
        check_public_url(load(tmp_path, TASKRELAY_SANDBOX="true", **public))
    demo = {"TASKRELAY_API_TOKENS": "demo:demo-token,ops:tok-0123456789abcdef"}
    with pytest.raises(SettingsError, match=r"client\(s\) demo a well-known demo token"):
        check_public_url(load(tmp_path, **demo, **public))
    # On this machine only, both are fine (make run); a real token is fine anywhere.
    check_public_url(load(tmp_path, TASKRELAY_SANDBOX="true", **demo))
    check_public_url(load(tmp_path, TASKRELAY_API_TOKENS="ops:tok-0123456789abcdef", **public))


@pytest.mark.parametrize(
    ("text", "waits"),
    [
        ("0s,5s,5m", (0.0, 5.0, 300.0)),
        ("0,1m", (0.0, 60.0)),
        ("0m,0.0s,0ms,2h", (0.0, 0.0, 0.0, 7200.0)),  # a wait of nothing, in any unit
        ("500ms", (0.5,)),
    ],
)
def test_a_delivery_schedule_takes_zero_waits_in_any_unit(
    tmp_path: Path, text: str, waits: tuple[float, ...]
) -> None:
    assert load(tmp_path, TASKRELAY_DELIVERY_SCHEDULE=text).delivery_schedule == waits


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("0.0.0.0", "0.0.0.0"),
        ("relay.internal", "relay.internal"),
        ("task_relay", "task_relay"),  # a container's name
        ("relay.internal.", "relay.internal."),  # fully qualified
    ],
)
def test_a_listen_address_may_come_in_brackets(tmp_path: Path, value: str, host: str) -> None:
    settings = load(tmp_path, TASKRELAY_HOST=value, TASKRELAY_PUBLIC_URL="https://relay.example")
    assert settings.host == host


def test_a_token_pair_written_backwards_never_prints_the_token(tmp_path: Path) -> None:
    """token:name puts the token where the name goes: the message names the entry by its
    position, and says the pair may be swapped."""
    token = "Q3vJ9xZkLm2pR7tY8wNc4bHd6fGs1aEu0iOyTqWzXcV"
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, TASKRELAY_API_TOKENS=f"ops:0123456789abcdef,{token}:shop")
    message = caught.value.message
    assert token not in message and token[:8] not in message
    assert "entry 2" in message and "swapped" in message


def test_env_file_comments_after_a_value_and_a_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``KEY=value # note`` kept "# note" in the value (silently, inside a key); ``~`` made a
    folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    env_file = tmp_path / ".env"
    env_file.write_text(
        "TASKRELAY_SECRET_KEY=0123456789abcdefghij  # the staging key\n"
        "TASKRELAY_API_TOKENS='ops:0123456789abcdef' # quoted, then a note\n"
        "TASKRELAY_EVOLINK_API_KEY=sk-part#of-it\n"
        "TASKRELAY_DATA_DIR=~/relay-data\n"
    )
    settings = load_settings({}, env_file=env_file)
    assert settings.secret_key.reveal() == "0123456789abcdefghij"
    assert settings.api_tokens["ops"].reveal() == "0123456789abcdef"
    assert settings.providers["evolink"].api_key.reveal() == "sk-part#of-it"  # no space: kept
    assert settings.data_dir == tmp_path / "home" / "relay-data"


@pytest.mark.parametrize("grace", ["0", "0s", "0.0m"])
def test_a_poll_grace_of_nothing_asks_at_the_expected_finish(tmp_path: Path, grace: str) -> None:
    assert load(tmp_path, TASKRELAY_POLL_GRACE=grace).poll_grace == 0.0


def test_unknown_taskrelay_variables_are_named_with_the_setting_meant(tmp_path: Path) -> None:
    """A misspelt setting (TASKRELAY_RETENTON) was ignored without a word, the setting left
    at its default (config hunt)."""
    (tmp_path / "x.env").write_text("TASKRELAY_LOGLEVEL=DEBUG\n")
    settings = load_settings(
        {
            "TASKRELAY_DATA_DIR": str(tmp_path),
            "TASKRELAY_ENV_FILE": str(tmp_path / "x.env"),
            "TASKRELAY_RETENTON": "30d",
            "TASKRELAY_OPENAI_KEY": "sk-live-1234",
            "TASKRELAY_MIDJOURNEY_API_KEY": "mj-1234",
            "TASKRELAY_UNSET_ONE": " ",  # set to nothing: unset, as every setting reads it
            "TASKRELAY_RETENTION": "",
            "OTHER_RETENTON": "1d",
        }
    )
    assert settings.unknown_variables == (
        ("TASKRELAY_LOGLEVEL", "TASKRELAY_LOG_LEVEL"),
        ("TASKRELAY_MIDJOURNEY_API_KEY", None),
        ("TASKRELAY_OPENAI_KEY", "TASKRELAY_OPENAI_API_KEY"),
        ("TASKRELAY_RETENTON", "TASKRELAY_RETENTION"),
    )
    text = settings.unknown_variables_text()
    assert text is not None
    assert text.startswith(
        "TASKRELAY_LOGLEVEL (did you mean TASKRELAY_LOG_LEVEL?), TASKRELAY_MIDJOURNEY_API_KEY, "
    )
    assert "sk-live-1234" not in text and "mj-1234" not in text  # names only, never values
    assert load(tmp_path).unknown_variables == ()
    assert load(tmp_path).unknown_variables_text() is None


def test_the_readme_lists_every_setting_and_only_those(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Configuration table and the variables load_settings reads are the same set (not
    counting the few TASKRELAY_* variables that are not settings)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("| Variable | Default | Meaning |") : readme.index("## API")]
    row = re.compile(r"^\| `(TASKRELAY_[A-Z_<>0-9]+)`(?: / `(TASKRELAY_[A-Z_]+)`)?", re.M)
    listed = set()
    for match in row.finditer(table):
        for name in filter(None, match.groups()):
            providers = settings_module.PROVIDERS if "<P>" in name else ("",)
            listed |= {name.replace("<P>", provider.upper()) for provider in providers}
    readers: list[Any] = []
    original = settings_module._Reader

    def recording(*args: Any) -> Any:
        readers.append(original(*args))
        return readers[-1]

    monkeypatch.setattr(settings_module, "_Reader", recording)
    load_settings({"TASKRELAY_DATA_DIR": str(tmp_path)}, env_file=tmp_path / "none.env")
    (reader,) = readers
    assert len(listed) > 50
    assert listed - reader.asked == set(), "in the README, read by nothing"
    assert reader.asked - listed - settings_module.NOT_SETTINGS == set(), "not in the README"


@pytest.mark.parametrize(
    "url",
    [
        "https://relay.example.com:8443",
        "http://[::1]:8000",
        "https://bücher.example",
        "http://10.0.0.5",
    ],
)
def test_public_urls_of_every_kind_of_host_are_taken(tmp_path: Path, url: str) -> None:
    """IPv6 in brackets, an IP address, and a name in another script (taken as its IDNA
    form, as httpx sends it; refused by the first version of the host check, review)."""
    assert load(tmp_path, TASKRELAY_PUBLIC_URL=url).public_url == url
