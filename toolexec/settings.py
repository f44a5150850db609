"""Settings for toolexec, read from the environment in one place.

Every variable is listed, with its default, in README.md ("Configuration").
"""

import base64
import hashlib
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {raw!r}.")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {raw!r}.") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {value}.")
    return value


def env_decimal(name: str, default: str) -> Decimal:
    raw = os.environ.get(name, default)
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ImproperlyConfigured(f"{name} must be a number, not {raw!r}.") from None
    if not value.is_finite() or value < 0:
        raise ImproperlyConfigured(f"{name} must be a number of at least 0, not {raw!r}.")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# --- Core -------------------------------------------------------------------------------

DEBUG = env_bool("DEBUG", False)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY is required when DEBUG is off.")
    # Development only: stable per checkout, never used in production.
    SECRET_KEY = "dev-insecure-" + hashlib.sha256(str(BASE_DIR).encode()).hexdigest()

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost" if DEBUG else "")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    # First: its runserver (ASGI, WebSockets included) takes the place of Django's.
    "daphne",
    "core.apps.CoreAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_rq",
    "channels",
    "core",
    "toolexec",
    "credits",
    "tools",
    "instances",
    "executions",
    "workflows",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "toolexec.urls"
WSGI_APPLICATION = "toolexec.wsgi.application"
ASGI_APPLICATION = "toolexec.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------
# PostgreSQL in tests, CI and production; SQLite only as the zero-setup default of `make run`.

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL,
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Parameters are bound on the server, so a statement's text is the same whatever its values,
    # and psycopg prepares a statement once a connection has run it DATABASE_PREPARE_THRESHOLD
    # times: PostgreSQL then plans it once per connection instead of on every run (the worker's
    # claim joins six tables; planning it was most of its cost). These are protocol-level
    # prepared statements, which PgBouncer in transaction mode keeps track of from 1.21 on
    # (`max_prepared_statements`); behind an older pooler, set it to 0 (never prepare). Added to
    # what DATABASE_URL's own query asks for (`?sslmode=require`, say).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        server_side_binding=True,
        prepare_threshold=env_int("DATABASE_PREPARE_THRESHOLD", 5) or None,
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, RQ, pub/sub ----------------------------------------------------------

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "toolexec",
    }
}

RQ_QUEUES = {
    "default": {
        "URL": REDIS_URL,
        "DEFAULT_TIMEOUT": 600,
    },
}
# Enqueue only once the transaction that created the Job has committed.
RQ = {"COMMIT_MODE": "on_db_commit"}
RQ_SHOW_ADMIN_LINK = True

# --- Auth, sessions, security -----------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# People sign in on the status pages' login (the browsable API keeps its own at /api-auth/login/).
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/status/"
# None: signing out shows registration/logged_out.html (with a link to sign in again).
LOGOUT_REDIRECT_URL = None

SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
if env_bool("SECURE_PROXY_SSL_HEADER", False):
    # Behind a TLS-terminating proxy that sets X-Forwarded-Proto.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"

# --- i18n, static -----------------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]  # the status pages' stylesheet and script
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# --- API --------------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "core.auth.HashedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": [
        "core.throttles.AnonThrottle",
        "core.throttles.UserThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_str("TOOLEXEC_THROTTLE_ANON", "60/min"),
        "user": env_str("TOOLEXEC_THROTTLE_USER", "1200/min"),
        "auth": env_str("TOOLEXEC_THROTTLE_AUTH", "20/min"),
    },
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": [
        "core.parsers.JSONParser",  # refuses JSON nested too deeply as a 400
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "core.schema.ToolexecAutoSchema",  # adds the error answers
    "EXCEPTION_HANDLER": "core.api.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "COERCE_DECIMAL_TO_STRING": False,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "toolexec API",
    "DESCRIPTION": "Run tools for your workflows: instances, readiness, execution and history.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Each status vocabulary gets its own name in the schema.
    "ENUM_NAME_OVERRIDES": {
        "ExecutionStatusEnum": "executions.models.Execution.Status",
        "JobStatusEnum": "executions.models.Job.Status",
        "InstanceStatusEnum": "instances.models.ToolInstance.Status",
        "CredentialStatusEnum": "instances.models.Credential.Status",
        "WorkflowRunStatusEnum": "workflows.models.WorkflowRun.Status",
        "StepRunStatusEnum": "workflows.models.StepRun.Status",
    },
}

# --- toolexec ---------------------------------------------------------------------------

TOOLEXEC_BASE_URL = env_str("TOOLEXEC_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
TOOLEXEC_DEFAULT_CREDITS = env_decimal("TOOLEXEC_DEFAULT_CREDITS", "100")
TOOLEXEC_SYNC_TIMEOUT_SECONDS = env_int("TOOLEXEC_SYNC_TIMEOUT_SECONDS", 30, minimum=1)
TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER = env_int("TOOLEXEC_MAX_CONCURRENT_JOBS_PER_OWNER", 4, minimum=1)
# A running job's worker writes a heartbeat this often; one silent for the stale time is lost.
TOOLEXEC_JOB_HEARTBEAT_SECONDS = env_int("TOOLEXEC_JOB_HEARTBEAT_SECONDS", 5, minimum=1)
TOOLEXEC_JOB_STALE_SECONDS = env_int("TOOLEXEC_JOB_STALE_SECONDS", 20, minimum=2)
# How long a cancelled running job may take to reach a cancellation check before it is stopped.
TOOLEXEC_CANCEL_GRACE_SECONDS = env_int("TOOLEXEC_CANCEL_GRACE_SECONDS", 5, minimum=0)
# The warm worker (manage.py toolexec_worker): job processes per supervisor, and when a job
# process makes way for a fresh one: after this many jobs, or above this RSS after a job.
TOOLEXEC_WORKER_PROCESSES = env_int("TOOLEXEC_WORKER_PROCESSES", 2, minimum=1)
TOOLEXEC_WORKER_MAX_JOBS = env_int("TOOLEXEC_WORKER_MAX_JOBS", 1000, minimum=1)
TOOLEXEC_WORKER_MAX_RSS_MB = env_int("TOOLEXEC_WORKER_MAX_RSS_MB", 512, minimum=32)
# How long a QUEUED job may be missing from Redis (it restarted empty, or the enqueue never
# happened) before the reaper queues it again; longer than a job takes from its commit to its
# enqueue, so that one on its way is not doubled.
TOOLEXEC_QUEUE_RECOVERY_SECONDS = env_int("TOOLEXEC_QUEUE_RECOVERY_SECONDS", 30, minimum=1)
TOOLEXEC_IDEMPOTENCY_HOURS = env_int("TOOLEXEC_IDEMPOTENCY_HOURS", 24, minimum=1)
# The result cache (DESIGN.md §9): the largest output kept, and what a cache hit costs.
TOOLEXEC_CACHE_MAX_BYTES = env_int("TOOLEXEC_CACHE_MAX_BYTES", 1024 * 1024, minimum=0)
TOOLEXEC_CACHE_HIT_CREDITS = env_decimal("TOOLEXEC_CACHE_HIT_CREDITS", "0")
# Live events (DESIGN.md §11): how many of a job's events its stream keeps for a listener that
# reconnects, and how long after the job ended.
TOOLEXEC_EVENT_STREAM_MAXLEN = env_int("TOOLEXEC_EVENT_STREAM_MAXLEN", 1000, minimum=10)
TOOLEXEC_EVENT_RETENTION_SECONDS = env_int("TOOLEXEC_EVENT_RETENTION_SECONDS", 3600, minimum=1)
# How long a live listener's topic may stay quiet before the process asks the database whether
# it ended (a terminal event Redis never carried): one query for all the quiet topics.
TOOLEXEC_LIVE_QUIET_CHECK_SECONDS = env_int("TOOLEXEC_LIVE_QUIET_CHECK_SECONDS", 30, minimum=1)
# The most jobs one WebSocket (/ws/v1/stream/) follows at once; one more closes it with 4429.
TOOLEXEC_WS_MAX_SUBSCRIPTIONS = env_int("TOOLEXEC_WS_MAX_SUBSCRIPTIONS", 100, minimum=1)
# Workflows (DESIGN.md §10): the most items a for_each step fans out to, and the most steps.
TOOLEXEC_WORKFLOW_MAX_FANOUT = env_int("TOOLEXEC_WORKFLOW_MAX_FANOUT", 1000, minimum=1)
TOOLEXEC_WORKFLOW_MAX_STEPS = env_int("TOOLEXEC_WORKFLOW_MAX_STEPS", 200, minimum=1)

# Files and outbound HTTP.
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(BASE_DIR / "media")))
TOOLEXEC_MAX_UPLOAD_BYTES = env_int("TOOLEXEC_MAX_UPLOAD_BYTES", 50 * 1024 * 1024, minimum=1)
TOOLEXEC_MAX_DOWNLOAD_BYTES = env_int("TOOLEXEC_MAX_DOWNLOAD_BYTES", 50 * 1024 * 1024, minimum=1)
TOOLEXEC_HTTP_MAX_RESPONSE_BYTES = env_int("TOOLEXEC_HTTP_MAX_RESPONSE_BYTES", 5 * 1024 * 1024, minimum=1)
# Hosts http-request may reach even on private or loopback addresses (tests, development).
TOOLEXEC_HTTP_ALLOWED_HOSTS = env_list("TOOLEXEC_HTTP_ALLOWED_HOSTS")

# Google (base URLs are settings so tests and staging can point elsewhere).
GOOGLE_DRIVE_API_URL = env_str("GOOGLE_DRIVE_API_URL", "https://www.googleapis.com/drive/v3").rstrip("/")
GOOGLE_SHEETS_API_URL = env_str("GOOGLE_SHEETS_API_URL", "https://sheets.googleapis.com/v4").rstrip("/")
GOOGLE_OAUTH_TOKEN_URL = env_str("GOOGLE_OAUTH_TOKEN_URL", "https://oauth2.googleapis.com/token")
GOOGLE_OAUTH_AUTHORIZE_URL = env_str("GOOGLE_OAUTH_AUTHORIZE_URL", "https://accounts.google.com/o/oauth2/v2/auth")
GOOGLE_OAUTH_USERINFO_URL = env_str("GOOGLE_OAUTH_USERINFO_URL", "https://openidconnect.googleapis.com/v1/userinfo")
GOOGLE_OAUTH_CLIENT_ID = env_str("GOOGLE_OAUTH_CLIENT_ID")
GOOGLE_OAUTH_CLIENT_SECRET = env_str("GOOGLE_OAUTH_CLIENT_SECRET")

# More credential providers, and OAuth clients for them, are code-level settings (a deployment's
# settings module extends these): key → instances.providers.Provider options, and key →
# {"authorize_url", "token_url", "client_id", "client_secret", "scopes"} (see instances/oauth.py).
TOOLEXEC_PROVIDERS: dict[str, dict] = {}
TOOLEXEC_OAUTH_CLIENTS: dict[str, dict] = {}


def _encryption_keys() -> list[str]:
    keys = env_list("TOOLEXEC_ENCRYPTION_KEYS")
    if keys:
        return keys
    if not DEBUG:
        raise ImproperlyConfigured(
            "TOOLEXEC_ENCRYPTION_KEYS is required when DEBUG is off "
            "(comma-separated Fernet keys; the first encrypts, all decrypt)."
        )
    # Development only: derived from SECRET_KEY so a dev database stays readable across runs.
    digest = hashlib.sha256(("toolexec-dev-encryption:" + SECRET_KEY).encode()).digest()
    return [base64.urlsafe_b64encode(digest).decode()]


TOOLEXEC_ENCRYPTION_KEYS = _encryption_keys()

# --- Logging ----------------------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # Django's own "django" logger prints to the console under DEBUG; ours already does.
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.db.backends": {"level": "INFO"},
    },
}
