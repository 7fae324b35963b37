"""Structured-output tests: the o200k vocabulary comes from shared/, never the network."""

import os
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_SHARED_TIKTOKEN = _HERE.parent.parent.parent / "shared" / "tiktoken"
if _SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_SHARED_TIKTOKEN))
if str(_HERE) not in sys.path:  # structured_driver, whatever pytest's import mode
    sys.path.insert(0, str(_HERE))


@pytest.fixture(scope="session")
def tokenizer():
    from ossbatch.pipeline import constrain

    return constrain.lltokenizer()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection is recorded and fails."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts
