"""Background loops: a failure that lasts is logged once, and its end once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from streamspace_controlplane._loop import FailureLog, KickLoop
from streamspace_controlplane.store.base import StoreError

LOGGER = "streamspace.controlplane"


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, bool]]:
    return [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]


def test_a_known_failure_is_one_line_per_message_and_its_end_one_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    log = FailureLog("The reconcile pass")
    for _ in range(3):
        log.failed(StoreError("postgres: connection refused"), "retrying in 1s")
    log.failed(StoreError("postgres: no answer within DATABASE_TIMEOUT"), "retrying in 1s")
    log.worked()
    log.worked()
    assert _lines(caplog) == [
        (
            "WARNING",
            "The reconcile pass failed: postgres: connection refused; retrying in 1s",
            False,
        ),
        (
            "WARNING",
            "The reconcile pass failed: postgres: no answer within DATABASE_TIMEOUT; "
            "retrying in 1s",
            False,
        ),
        ("INFO", "The reconcile pass works again", False),
    ]


def test_an_unexpected_failure_keeps_its_traceback_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    log = FailureLog("Sending commands to agent a1")
    for _ in range(2):
        log.failed(KeyError("session"), "will retry")
    log.worked()
    assert _lines(caplog) == [
        ("ERROR", "Sending commands to agent a1 failed; will retry", True),
        ("ERROR", "Sending commands to agent a1 failed; will retry", True),
    ]


class _Flaky(KickLoop):
    """Fails its first ``failures`` passes with a store error, then works."""

    def __init__(self, failures: int) -> None:
        super().__init__("flaky", interval_s=0.01)
        self.left = failures
        self.worked = asyncio.Event()

    async def _pass(self) -> None:
        if self.left:
            self.left -= 1
            raise StoreError("sqlite: database is locked")
        self.worked.set()


@pytest.mark.asyncio
async def test_a_loop_retries_a_failing_pass_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    loop = _Flaky(failures=5)
    await loop.start()
    try:
        await asyncio.wait_for(loop.worked.wait(), 5)
    finally:
        await loop.stop()
    assert [(level, message) for level, message, _ in _lines(caplog)] == [
        ("WARNING", "The flaky pass failed: sqlite: database is locked; retrying in 0.01s"),
        ("INFO", "The flaky pass works again"),
    ]
