"""A plain Django view (no DRF, no authentication) that does the least SQL a recorded sync run
needs, in the product's two transactions: the attempt (INSERT, autocommit), then the outcome
(UPDATE of that row and a counter UPDATE, one transaction)."""

import json
import uuid

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

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


@csrf_exempt
@require_POST
def baseline_execute(request: HttpRequest) -> JsonResponse:
    inputs = json.loads(request.body or b"{}")
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
    return JsonResponse({"success": True, "data": output, "execution_id": str(run_id)})
