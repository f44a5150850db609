from django.urls import include, path

from .views import baseline_execute, framework_floor, guarded_execute

urlpatterns = [
    path("bench/baseline/execute", baseline_execute, name="bench-baseline-execute"),
    path("bench/guarded/execute", guarded_execute, name="bench-guarded-execute"),
    path("bench/framework-floor/execute", framework_floor, name="bench-framework-floor-execute"),
    path("", include("toolexec.urls")),
]
