"""The execution services, by concern (DESIGN.md §4, §7): recording a run (runs), sync runs
(sync), async runs accepted (enqueue) and run by a worker (jobs), what people do to a job
(control), keeping job states honest under failure (recovery), and RQ (queueing). Callers
import from the module that holds what they need."""
