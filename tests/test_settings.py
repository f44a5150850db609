"""Production refuses to start without its secrets; with them, the deploy checks are clean."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "DATABASE_URL", "REDIS_URL")}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**keep, "DJANGO_SETTINGS_MODULE": "toolexec.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_refuses_to_start_without_a_secret_key():
    result = _manage("check", DEBUG="false", TOOLEXEC_ENCRYPTION_KEYS=Fernet.generate_key().decode())

    assert result.returncode != 0
    assert "SECRET_KEY is required when DEBUG is off" in result.stderr


def test_production_refuses_to_start_without_encryption_keys():
    result = _manage("check", DEBUG="false", SECRET_KEY="x" * 60)

    assert result.returncode != 0
    assert "TOOLEXEC_ENCRYPTION_KEYS is required when DEBUG is off" in result.stderr


def test_a_bad_number_in_the_environment_is_named():
    result = _manage("check", DEBUG="true", TOOLEXEC_SYNC_TIMEOUT_SECONDS="soon")

    assert result.returncode != 0
    assert "TOOLEXEC_SYNC_TIMEOUT_SECONDS must be a whole number, not 'soon'" in result.stderr


@pytest.mark.parametrize("debug", ["true", "false"])
def test_development_derives_a_key_only_with_debug(debug):
    result = _manage(
        "shell",
        "-c",
        "from django.conf import settings; print(len(settings.TOOLEXEC_ENCRYPTION_KEYS))",
        DEBUG=debug,
        SECRET_KEY="x" * 60,
    )

    if debug == "true":
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "1"
    else:
        assert result.returncode != 0


def test_deploy_checks_are_clean_with_the_required_settings():
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DEBUG="false",
        SECRET_KEY=Fernet.generate_key().decode() + Fernet.generate_key().decode(),
        ALLOWED_HOSTS="toolexec.example.com",
        TOOLEXEC_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_a_database_urls_own_options_are_kept_beside_prepared_statements():
    """DATABASE_URL's query (``?sslmode=require``) reaches the driver with the settings'
    own PostgreSQL options; nothing connects, the settings are only read."""
    result = _manage(
        "shell",
        "-c",
        "from django.conf import settings; print(sorted(settings.DATABASES['default']['OPTIONS'].items()))",
        DEBUG="true",
        DATABASE_URL="postgres://someone@db.invalid:5432/toolexec?sslmode=require",
        DATABASE_PREPARE_THRESHOLD="7",
    )

    assert result.returncode == 0, result.stderr
    options = result.stdout.strip().splitlines()[-1]
    assert options == "[('prepare_threshold', 7), ('server_side_binding', True), ('sslmode', 'require')]"
