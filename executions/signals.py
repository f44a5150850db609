"""What executions tells the apps above it, which it must not import (DESIGN.md §2): a
workflow step is an ordinary execution, and the workflows app learns of its start and end here.

Receivers filter on ``execution.origin`` (who asked for the run), so a run that nobody above
asked for costs no query.
"""

from django.dispatch import Signal

# A worker claimed the execution's job (sent after the claim committed).
# Arguments: execution, job.
execution_started = Signal()

# The execution reached its terminal state. Sent inside the transaction that records it (its
# job's end, the ledger, the statistics), so what a receiver writes commits with the outcome or
# not at all. Arguments: execution (with its outcome's fields set), outcome (runs.Outcome), job
# (or None for a sync run).
execution_ended = Signal()

# The reaper's round (jobs_reap) is over; receivers keep their own records honest in it and
# return a dict of counts. Argument: now.
maintenance_round = Signal()
