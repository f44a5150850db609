"""The ASGI application: Django for HTTP, Channels for WebSockets (DESIGN.md §1, §11).

`manage.py runserver` (daphne's, as daphne is first in INSTALLED_APPS) and production's
`daphne toolexec.asgi:application` serve this.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "toolexec.settings")
# First, as Channels documents: it sets Django up, and the routes below import models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from core.ws_auth import OriginCheck, WebsocketAuthStack  # noqa: E402
from toolexec.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": OriginCheck(WebsocketAuthStack(URLRouter(websocket_urlpatterns))),
    }
)
