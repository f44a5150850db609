"""Instance services, one module per concern: ``instances`` (create, update, delete, status
transitions), ``credentials`` (secrets, their audit, mappings and what a run resolves) and
``files`` (uploads). Callers import from the concern's module."""
