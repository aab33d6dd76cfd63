import signal

import pytest


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
    """A per-session cache for the tokenized built-in corpus (tokenized once, a few seconds)."""
    return tmp_path_factory.mktemp("halfbyte-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(token_cache, monkeypatch):
    monkeypatch.setenv("HALFBYTE_CACHE", str(token_cache))


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """Training installs its own SIGINT/SIGTERM handlers in this process: give pytest's back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
