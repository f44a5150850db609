"""The benchmarks' settings: the product's settings module as is, plus the baseline view's
URLs and the bench tools. bench/common.py sets the environment (DEBUG off, bench database,
Redis index 13, generated keys) before this module is imported."""

from toolexec.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "bench.apps.BenchConfig"]  # noqa: F405
ROOT_URLCONF = "bench.baseline.urls"
WSGI_APPLICATION = "bench.wsgi.application"
