"""Log hygiene: hivemind's expected failures are one info line; the keeper still learns why."""

import logging

from hivefold.logs import ExpectedNoise, LastError


def test_expected_hivemind_failures_become_one_info_line_and_last_error_keeps_the_reason():
    logger = logging.getLogger("hivemind.averaging.averager.test")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(ExpectedNoise())
    root = logging.getLogger("hivemind")  # as in setup_logging: the filter sits above the keeper's LastError
    root.addHandler(handler)
    last = LastError("hivemind.averaging")
    try:
        try:
            raise ConnectionError("routing: not found")
        except ConnectionError as e:
            logger.exception(f"Failed to download state from 12D3Koo - {e!r}\n  * dial backoff")
        assert "routing: not found" in last.message
        logger.error("Something else broke")
    finally:
        root.removeHandler(handler)
        last.close()
    first, second = records
    assert first.levelno == logging.INFO and first.exc_info is None
    assert first.getMessage() == "Failed to download state from 12D3Koo - ConnectionError('routing: not found')"
    assert second.levelno == logging.ERROR  # anything unexpected stays as loud as hivemind made it
    assert last.message == "Something else broke"


def test_asyncio_leftovers_of_hivemind_loops_are_demoted():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(ExpectedNoise())
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        logger.error("Task exception was never retrieved\nfuture: <Task coro=<DecentralizedAverager._step() "
                     "done, defined at /x/hivemind/averaging/averager.py:421>>")
        logger.error("Task exception was never retrieved\nfuture: <Task coro=<mine()>>")
    finally:
        logger.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.INFO, logging.ERROR]
    assert records[0].getMessage() == "Task exception was never retrieved"
