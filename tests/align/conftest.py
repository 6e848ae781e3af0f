"""Fixtures for the alignment tests: every test here starts with no proxy variables set.

The endpoint client honours HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY (either case), so a
developer's proxy settings would otherwise send the tests' loopback requests through that proxy.
Tests that need a proxy set the variables themselves (tests/align/test_http_transport.py).
"""
from __future__ import annotations

import pytest

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # under CGI, urllib ignores HTTP_PROXY
