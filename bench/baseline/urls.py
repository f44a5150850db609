from django.urls import include, path

from .views import baseline_execute, framework_floor, framework_floor_accept, guarded_execute

urlpatterns = [
    path("bench/baseline/execute", baseline_execute, name="bench-baseline-execute"),
    path("bench/guarded/execute", guarded_execute, name="bench-guarded-execute"),
    path(
        "bench/framework-floor/instances/<uuid:instance_id>/execute",
        framework_floor,
        name="bench-framework-floor-execute",
    ),
    path("bench/framework-floor/accept", framework_floor_accept, name="bench-framework-floor-accept"),
    path("", include("toolexec.urls")),
]
