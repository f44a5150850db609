"""The status pages (executions/pages.py), mounted at /status/ by toolexec/urls.py."""

from django.urls import path

from . import pages

app_name = "status"

urlpatterns = [
    path("", pages.overview, name="overview"),
    path("executions/", pages.execution_list, name="executions"),
    path("executions/<uuid:execution_id>/", pages.execution_detail, name="execution"),
    path("instances/<uuid:instance_id>/", pages.instance_detail, name="instance"),
    path("jobs/<uuid:job_id>/", pages.job_detail, name="job"),
    path("jobs/<uuid:job_id>/fragment/", pages.job_fragment, name="job-fragment"),
    path("jobs/<uuid:job_id>/events/", pages.job_events, name="job-events"),
    path("jobs/<uuid:job_id>/cancel/", pages.job_cancel_view, name="job-cancel"),
]
