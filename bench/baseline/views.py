"""A plain Django view (no DRF, no authentication) that does the least SQL a recorded sync run
needs, in the product's two transactions: the attempt (INSERT, autocommit), then the outcome
(UPDATE of that row and a counter UPDATE, one transaction).

Beside it, the same statements behind the two guards DESIGN.md asks of every API request:
- ``guarded``: a plain Django view that authenticates with the product's own token statement and
  counts the request with the product's own throttle (one Redis round trip), nothing else: the
  least any authenticated, throttled endpoint pays, with or without DRF;
- ``framework_floor``: the *guarded DRF floor* (issue 20's target for benchmark 1): a DRF
  ``APIView`` with the product's token authentication, throttles and renderers doing the same
  writes as the product's execute-sync, through the ORM on the bench's tables of the same shape
  (bench/models.py): the execution row inserted with the credit hold in one transaction (the
  insert alone, in autocommit, when there is nothing to hold, as ``execution_record_start``
  does), then the ledger entry, the outcome that links it (a conditional update), the instance
  statistics (``F()``) and the settlement in one transaction (``execution_finish``). Its price is the
  bench no-op tool's, so it writes exactly what the product writes for that tool."""

import json
import uuid
from decimal import Decimal
from functools import cache

from django.db import connection, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bench.models import FloorAccount, FloorExecution, FloorInstance, FloorLedgerEntry
from bench.tools import BenchNoopTool
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


@cache
def _tool_id() -> int:
    from tools.models import ToolDefinition

    return ToolDefinition.objects.values_list("pk", flat=True).get(slug=BenchNoopTool.slug)


def floor_fixtures(owner: object, balance: Decimal, *, is_unlimited: bool = False) -> FloorInstance:
    """The floor's account (as the product's, for ``owner``) and instance; the instance."""
    FloorAccount.objects.create(owner=owner, balance=balance, is_unlimited=is_unlimited)
    return FloorInstance.objects.create(owner=owner)


class FrameworkFloor(APIView):
    """DRF with the product's default authentication, permission, throttles and renderers,
    doing the product's writes for a sync run of the bench no-op tool."""

    tool = BenchNoopTool

    def post(self, request: Request, instance_id: uuid.UUID) -> Response:
        owner_id = request.user.pk
        account = FloorAccount.objects.filter(owner_id=owner_id)
        inputs = request.data
        # execution_record_start: the row (RUNNING), and the hold in the same transaction.
        hold = self.tool.base_credits
        now = timezone.now()
        execution = FloorExecution(
            instance_id=instance_id, tool_id=_tool_id(), owner_id=owner_id, mode="SYNC", status="RUNNING",
            input_data=inputs, credits_held=hold, started_at=now, created_at=now,
        )  # fmt: skip
        if not hold:
            execution.save(force_insert=True)
        else:
            with transaction.atomic(savepoint=False):
                held = account.filter(balance__gte=hold).update(balance=F("balance") - hold, updated_at=now)
                if held:
                    execution.save(force_insert=True)
            if not held:
                return Response({"success": False, "error": {"code": "INSUFFICIENT_CREDITS"}}, status=402)
        clock = timezone.now()
        output = {"echo": inputs.get("echo")}  # the tool's work
        charge = self.tool.credits_for(Decimal("0"))
        duration_ms = int((timezone.now() - clock).total_seconds() * 1000)
        # execution_finish: the ledger entry, the outcome linking it, statistics and settlement,
        # one transaction.
        finished = timezone.now()
        outcome = {
            "status": "COMPLETED", "output_data": output, "error_code": "", "error_message": "", "error_metadata": {},
            "credits_consumed": charge, "finished_at": finished, "duration_ms": duration_ms,
        }  # fmt: skip
        with transaction.atomic():
            if charge:
                outcome["ledger_entry"] = FloorLedgerEntry.objects.create(
                    account_id=owner_id, kind="EXECUTION", amount=-charge
                )
            FloorExecution.objects.filter(pk=execution.pk, status__in=("PENDING", "RUNNING")).update(**outcome)
            FloorInstance.objects.filter(pk=instance_id).update(
                execution_count=F("execution_count") + 1,
                success_count=F("success_count") + 1,
                failure_count=F("failure_count") + 0,
                credits_consumed=F("credits_consumed") + charge,
                total_duration_ms=F("total_duration_ms") + duration_ms,
                last_executed_at=finished,
            )
            # credits_settle on a limited account (the product's fixture account is one).
            if difference := charge - hold:
                account.update(balance=F("balance") - difference, updated_at=finished)
        return Response({"success": True, "data": output, "execution_id": str(execution.pk)})


framework_floor = FrameworkFloor.as_view()


class FrameworkFloorAccept(APIView):
    """The warm floor's accept (benchmark 8): DRF with the product's authentication and
    throttles, a QUEUED row of the bench's own (``WarmFloorJob``, one INSERT) and
    ``Queue.enqueue`` of ``bench.floor_warm.claimed_noop``; 202 with the row's and the RQ job's ids."""

    def post(self, request: Request) -> Response:
        from bench import floor_warm, warm_arms

        [row] = floor_warm.rows_insert(1)
        job_id = warm_arms.warm_floor_queue().enqueue(floor_warm.claimed_noop, request.data["key"], row).id
        return Response({"execution_id": row, "job_id": job_id}, status=202)


framework_floor_accept = FrameworkFloorAccept.as_view()
