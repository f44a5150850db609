"""Settings of the benchmark's Celery peer (bench/celery_peer.py) only: the bench settings plus
django-celery-results, whose tables the bench database gets (`bench.run.prepare`). The product
never sees Celery; nothing but the peer's worker and the bench's migrate use this module."""

from bench.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "django_celery_results"]  # noqa: F405
# Persistent connections, as the product's own settings have them (CONN_MAX_AGE); and see
# CELERY_DB_REUSE_MAX in bench/celery_peer.py, without which Celery closes them around every task.
DATABASES["default"]["CONN_MAX_AGE"] = None  # noqa: F405
