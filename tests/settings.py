"""Settings for the test suite: the production settings module, with the environment
defaults `make test` documents, after checking that PostgreSQL and Redis answer.

Under CI=true an unreachable service fails the run with a message saying which and where.
Elsewhere the suite falls back to SQLite (and skips what needs Redis), and says so loudly.
"""

import atexit
import os
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/toolexec")
# A spare database index, so tests never touch the data of a dev server on index 0.
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")


def _redis_url_of_this_process(url: str) -> str:
    """Under pytest-xdist (`make test` runs two test processes), the process gw<n> uses the
    database index n below REDIS_URL's, so their queues, caches and event streams never meet
    (pytest-django gives each its own test database likewise). Worker processes a test starts
    inherit both variables, and keep the URL as it is."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or os.environ.get("TOOLEXEC_TEST_REDIS_OF") == worker:
        return url
    os.environ["TOOLEXEC_TEST_REDIS_OF"] = worker
    parts = urlsplit(url)
    index = int(parts.path.strip("/") or 0) - int(worker.removeprefix("gw"))
    if index < 1:  # index 0 is a development server's
        raise RuntimeError(f"REDIS_URL {url} leaves no spare database index for test process {worker}")
    return parts._replace(path=f"/{index}").geturl()


os.environ["REDIS_URL"] = _redis_url_of_this_process(os.environ["REDIS_URL"])
os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
os.environ.setdefault("TOOLEXEC_ENCRYPTION_KEYS", Fernet.generate_key().decode())
os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
os.environ.setdefault("TOOLEXEC_BASE_URL", "https://toolexec.test")
os.environ["DEBUG"] = "false"  # tests run the production configuration
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
# Uploads go to a directory of this test run, removed when it ends. Worker processes the run
# starts inherit the environment, so they read the same directory.
if "TOOLEXEC_TEST_MEDIA_ROOT" not in os.environ:
    os.environ["TOOLEXEC_TEST_MEDIA_ROOT"] = tempfile.mkdtemp(prefix="toolexec-test-media-")
    atexit.register(shutil.rmtree, os.environ["TOOLEXEC_TEST_MEDIA_ROOT"], ignore_errors=True)
os.environ["MEDIA_ROOT"] = os.environ["TOOLEXEC_TEST_MEDIA_ROOT"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    if parts.scheme.startswith("sqlite"):
        return True
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _shout(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr)


POSTGRES_AVAILABLE = _reachable(os.environ["DATABASE_URL"], 5432)
REDIS_AVAILABLE = _reachable(os.environ["REDIS_URL"], 6379)

if IN_CI and not (POSTGRES_AVAILABLE and REDIS_AVAILABLE):
    missing = []
    if not POSTGRES_AVAILABLE:
        missing.append(f"PostgreSQL at {os.environ['DATABASE_URL']}")
    if not REDIS_AVAILABLE:
        missing.append(f"Redis at {os.environ['REDIS_URL']}")
    raise RuntimeError(
        "CI=true and the test suite cannot reach " + " and ".join(missing) + ". "
        "Start the service or point DATABASE_URL / REDIS_URL at one."
    )

if not POSTGRES_AVAILABLE:
    _shout(
        f"PostgreSQL is not reachable at {os.environ['DATABASE_URL']}: FALLING BACK TO SQLITE.\n"
        "Concurrency tests are skipped; results do not count as a real run."
    )
    os.environ["DATABASE_URL"] = "sqlite:///:memory:"
if not REDIS_AVAILABLE:
    _shout(f"Redis is not reachable at {os.environ['REDIS_URL']}: tests that need Redis are SKIPPED.")

from toolexec.settings import *  # noqa: E402,F403

if not REDIS_AVAILABLE:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Pages render and static files are served (by WhiteNoise, from the apps) without collectstatic.
STATIC_ROOT = Path(tempfile.gettempdir()) / "toolexec-test-static"  # empty; one for every run
STATIC_ROOT.mkdir(exist_ok=True)
WHITENOISE_USE_FINDERS = True
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast user creation in tests
