from django.urls import include, path

from .views import baseline_execute

urlpatterns = [
    path("bench/baseline/execute", baseline_execute, name="bench-baseline-execute"),
    path("", include("toolexec.urls")),
]
