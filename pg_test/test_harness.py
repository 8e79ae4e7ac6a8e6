"""The harness's own rules (no database): what `wait_for` gives back, when its condition holds and
when it never does."""
import pytest

from harness import TimedOut, wait_for


@pytest.fixture(autouse=True)
def watch():
    """No cluster here: replaces conftest.py's autouse fixture, which watches one."""


def test_wait_for_returns_the_value_that_held():
    values = iter([None, "", "ready"])
    assert wait_for(lambda: next(values), timeout=5, every=0.01) == "ready"


def test_wait_for_says_what_it_waited_for_and_the_last_exception_when_it_times_out():
    def worker_state():
        raise RuntimeError("psql: connection refused")

    result = wait_for(lambda: worker_state() == "idle", timeout=0.05, every=0.01)
    assert isinstance(result, TimedOut) and not result, "a timeout is falsy, as its last value was"
    text = repr(result)
    assert "worker_state() == \"idle\"" in text, text
    assert "test_harness.py:" in text, text
    assert "RuntimeError: psql: connection refused" in text, text
    assert "timed out after 0.05 s" in text, text


def test_wait_for_names_the_last_value_when_the_condition_only_returned():
    result = wait_for(lambda: [], timeout=0.05, every=0.01)
    assert not result
    assert "last value []" in repr(result) and "exception" not in repr(result), repr(result)
