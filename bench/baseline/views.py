"""A plain Django view (no DRF, no authentication) that does the least SQL a recorded sync run
needs, in the product's two transactions: the attempt (INSERT, autocommit), then the outcome
(UPDATE of that row and a counter UPDATE, one transaction).

Beside it, the same statements behind the two guards DESIGN.md asks of every API request:
- ``guarded``: a plain Django view that authenticates with the product's own token statement and
  counts the request with the product's own throttle (one Redis round trip), nothing else: the
  least any authenticated, throttled endpoint pays, with or without DRF;
- ``framework_floor``: a DRF view with the product's authentication, throttles and renderers:
  what any token-authenticated DRF endpoint pays before it does anything of its own, to tell
  the framework's share of the product's overhead from ours."""

import json
import uuid

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.auth import HashedTokenAuthentication
from core.throttles import UserThrottle

TABLES_SQL = """
CREATE TABLE IF NOT EXISTS bench_baseline_run (
    id uuid PRIMARY KEY,
    status varchar(20) NOT NULL,
    input_data jsonb NOT NULL,
    output_data jsonb,
    created_at timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS bench_baseline_counter (id integer PRIMARY KEY, runs bigint NOT NULL);
INSERT INTO bench_baseline_counter (id, runs) VALUES (1, 0) ON CONFLICT DO NOTHING;
"""


def _record(inputs: dict) -> dict:
    run_id = uuid.uuid4()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO bench_baseline_run (id, status, input_data, created_at) VALUES (%s, 'RUNNING', %s, now())",
            [run_id, json.dumps(inputs)],
        )
    output = {"echo": inputs.get("echo")}
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE bench_baseline_run SET status = 'COMPLETED', output_data = %s, finished_at = now() WHERE id = %s",
            [json.dumps(output), run_id],
        )
        cursor.execute("UPDATE bench_baseline_counter SET runs = runs + 1 WHERE id = 1")
    return {"success": True, "data": output, "execution_id": str(run_id)}


@csrf_exempt
@require_POST
def baseline_execute(request: HttpRequest) -> JsonResponse:
    return JsonResponse(_record(json.loads(request.body or b"{}")))


@csrf_exempt
@require_POST
def guarded_execute(request: HttpRequest) -> JsonResponse:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    try:
        # The product's own token statement (one SELECT by the key's hash, with the user).
        if scheme != "Token" or not key:
            raise AuthenticationFailed()
        request.user, _ = HashedTokenAuthentication().authenticate_credentials(key)
    except AuthenticationFailed:
        return JsonResponse({"success": False, "error": {"code": "PERMISSION_DENIED"}}, status=401)
    if not UserThrottle().allow_request(request, None):
        return JsonResponse({"success": False, "error": {"code": "THROTTLED"}}, status=429)
    return JsonResponse(_record(json.loads(request.body or b"{}")))


class FrameworkFloor(APIView):
    """DRF with the product's default authentication, permission, throttles and renderers."""

    def post(self, request: Request) -> Response:
        return Response(_record(request.data))


framework_floor = FrameworkFloor.as_view()
