"""The suite's own set-up: under ``--dist loadgroup`` every test that uses a shared session run carries that run's
xdist group in its id, so the run is made on one worker only (tests/conftest.py tags the ids itself, since xdist 3.8
writes a field pytest 9.2 no longer reads)."""

import os

import pytest
from conftest import SHARED_RUNS


def test_every_test_of_a_shared_run_carries_its_group(request):
    if not os.environ.get("PYTEST_XDIST_WORKER") or not request.config.getoption("loadgroup", False):
        pytest.skip("runs only on an xdist worker with --dist loadgroup (the suite's default)")
    users = {group: [item.nodeid for item in request.session.items if fixture in item.fixturenames]
             for fixture, group in SHARED_RUNS.items()}
    if not all(users.values()):
        pytest.skip(f"no test of a shared run was collected with this one: {users}")
    untagged = [nodeid for group, ids in users.items() for nodeid in ids if not nodeid.endswith(f"@{group}")]
    assert not untagged, untagged
