"""The WebSocket routes (DESIGN.md §11), served by toolexec/asgi.py beside Django's HTTP."""

from channels.security.websocket import WebsocketDenier
from django.urls import re_path

from executions.consumers import JobSocket, StreamSocket
from workflows.consumers import WorkflowRunSocket

# An id that is not a UUID reaches its consumer, which answers it as unknown (4404), as a
# malformed id in an API path answers 404. Any other path is refused at the handshake.
websocket_urlpatterns = [
    re_path(r"^ws/v1/jobs/(?P<job_id>[^/]+)/?$", JobSocket.as_asgi()),
    re_path(r"^ws/v1/workflow-runs/(?P<run_id>[^/]+)/?$", WorkflowRunSocket.as_asgi()),
    re_path(r"^ws/v1/stream/?$", StreamSocket.as_asgi()),
    re_path(r"", WebsocketDenier.as_asgi()),
]
