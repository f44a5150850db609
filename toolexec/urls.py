from django.contrib import admin
from django.urls import include, path, re_path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from core.admin_site import rq_dashboard_urls
from core.api import TokenView, WebsocketTicketView
from core.routers import UUID_PATTERN, ApiRouter
from executions.api import ExecutionViewSet, InstanceRunViewSet, JobViewSet
from instances.api import CredentialViewSet, InstanceViewSet
from instances.files_api import FileViewSet
from tools.api import ToolViewSet
from workflows.api import WorkflowRunViewSet, WorkflowVersionViewSet, WorkflowViewSet

router = ApiRouter()
router.register("tools", ToolViewSet, basename="tool")
router.register("instances", InstanceViewSet, basename="instance")
router.register("instances", InstanceRunViewSet, basename="instance-run")
router.register(rf"instances/(?P<instance_id>{UUID_PATTERN})/jobs", JobViewSet, basename="instance-job")
router.register("credentials", CredentialViewSet, basename="credential")
router.register("files", FileViewSet, basename="file")
router.register("executions", ExecutionViewSet, basename="execution")
router.register("workflows", WorkflowViewSet, basename="workflow")
router.register(
    rf"workflows/(?P<workflow_id>{UUID_PATTERN})/versions", WorkflowVersionViewSet, basename="workflow-version"
)
router.register("workflow-runs", WorkflowRunViewSet, basename="workflow-run")

urlpatterns = [
    path("", RedirectView.as_view(url="/api/v1/", permanent=False)),
    re_path(r"^api/v1/auth/token/?$", TokenView.as_view(), name="auth-token"),
    re_path(r"^api/v1/ws-tickets/?$", WebsocketTicketView.as_view(), name="ws-tickets"),
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api-auth/", include("rest_framework.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("status/", include("executions.page_urls")),
    path("status/workflows/", include("workflows.page_urls")),
    path("credentials/oauth/", include("instances.oauth_urls")),
    path("admin/django-rq/", include(rq_dashboard_urls())),
    path("admin/", admin.site.urls),
]

handler404 = "core.api.handler404"
handler500 = "core.api.handler500"
