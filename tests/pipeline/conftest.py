"""Fixtures for the pipeline tests: a real S3 endpoint (moto's server on loopback) and a fake engine."""

from __future__ import annotations

import pytest
from pipeline_fakes import FakeEngine

@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture(scope="session")
def tokenizer():
    """The llguidance tokenizer (the o200k vocabulary comes from shared/, never the network)."""
    from ossbatch.pipeline.harmony import lltokenizer

    return lltokenizer()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection is recorded and fails."""
    import socket
    import urllib.request

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts
