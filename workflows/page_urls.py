"""The workflow status pages (workflows/pages.py), mounted at /status/workflows/ by toolexec/urls.py."""

from django.urls import path

from . import pages

app_name = "status_workflows"

urlpatterns = [
    path("", pages.workflow_list, name="workflows"),
    path("<uuid:workflow_id>/", pages.workflow_detail, name="workflow"),
    path("runs/<uuid:run_id>/", pages.run_detail, name="run"),
    path("runs/<uuid:run_id>/fragment/", pages.run_fragment, name="run-fragment"),
    path("runs/<uuid:run_id>/events/", pages.run_events, name="run-events"),
    path("runs/<uuid:run_id>/cancel/", pages.run_cancel_view, name="run-cancel"),
    path("runs/<uuid:run_id>/retry/", pages.run_retry_view, name="run-retry"),
]
