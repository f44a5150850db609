"""A real toolexec worker for the tests: the test tools registered, then `manage.py toolexec_worker`.

Started by the ``rq_worker`` fixture (tests/conftest.py) with the test database's name and the
test process's keys in its environment.
"""

import sys

import django


def main() -> None:
    django.setup()
    from django.core.management import call_command

    from tests.tools import ALL_TEST_TOOLS, WARM_WORKER_TOOLS
    from tools import registry

    for tool in ALL_TEST_TOOLS + WARM_WORKER_TOOLS:
        registry.register(tool)
    call_command("toolexec_worker", *sys.argv[1:])


if __name__ == "__main__":
    main()
