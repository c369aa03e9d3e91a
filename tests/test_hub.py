import logging
import socket
import sys

import datasets
import pytest
from huggingface_hub import constants

from gpt2lab import hub
from gpt2lab.data import load_corpus
from gpt2lab.errors import ConfigError
from gpt2lab.tokenizers import load_pretrained

PROXY_VARS = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
)


@pytest.fixture
def hub_online(monkeypatch):
    """Online mode and no proxy to start with, whatever this machine says; a switch a test makes is undone."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub.reachable.cache_clear()
    yield
    hub.reachable.cache_clear()


ATTEMPTS: list[tuple] = []  # this process's network attempts, while a test counts them
COUNTING: list[bool] = []  # [True] while a test counts them


def _note_attempts(event: str, args: tuple) -> None:
    """An audit hook: each name lookup and TCP connect this process starts, whichever library starts it
    (huggingface_hub's httpx, datasets' fsspec, gpt2lab's probe) and whether or not it succeeds."""
    if COUNTING and event in ("socket.getaddrinfo", "socket.connect"):
        ATTEMPTS.append(("connect", tuple(args[1][:2])) if event == "socket.connect" else ("lookup", tuple(args[:2])))


sys.addaudithook(_note_attempts)


@pytest.fixture
def unreachable_hub(hub_online, monkeypatch, tmp_path):
    """The Hub's endpoint is a local port that refuses connections, and nothing is in the Hub's cache; yields the
    endpoint and the network attempts made while the test runs."""
    # Bound and never listening: connections are refused, and the port stays this test's while it runs (closed and
    # handed on, another process could take it and answer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host, port = s.getsockname()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://{host}:{port}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        ATTEMPTS.clear()
        COUNTING.append(True)
        try:
            yield constants.ENDPOINT, ATTEMPTS
        finally:
            COUNTING.clear()
            ATTEMPTS.clear()


def probe_only(endpoint: str) -> list[tuple]:
    """The network attempts of one probe of ``endpoint``: its name lookup and its connect, once each."""
    host, port = endpoint.removeprefix("http://").split(":")
    return [("lookup", (host, int(port))), ("connect", (host, int(port)))]


def test_an_unreachable_hub_is_found_once_and_datasets_load_offline(unreachable_hub, tmp_path, caplog):
    endpoint, attempts = unreachable_hub
    with caplog.at_level(logging.INFO, logger="gpt2lab.hub"):
        for _ in range(2):
            with pytest.raises(
                ConfigError,
                match=rf"data.name='wikitext': .*the Hub at {endpoint} is unreachable.*only the local cache.*"
                r"Offline, use data=pystdlib",
            ):
                load_corpus("hub", name="wikitext", config_name="wikitext-2-raw-v1", hf_cache_dir=str(tmp_path))
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE  # both libraries use only their cache
    said = [r.getMessage() for r in caplog.records if r.name == "gpt2lab.hub"]
    assert len(said) == 1 and "unreachable" in said[0] and "offline mode" in said[0]
    # One probe for both loads, and nothing else: no request retried (which took about 25 s per request)
    assert attempts == probe_only(endpoint)


def test_a_pretrained_tokenizer_on_an_unreachable_hub_fails_offline(unreachable_hub):
    endpoint, attempts = unreachable_hub
    with pytest.raises(ConfigError, match=r"tokenizer.name='gpt2': .*is unreachable.*use tokenizer=bpe"):
        load_pretrained("gpt2")
    assert constants.HF_HUB_OFFLINE
    assert attempts == probe_only(endpoint)


def test_an_explicit_offline_setting_is_respected_without_a_probe(hub_online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the Hub"))
    assert "switched off (HF_HUB_OFFLINE" in hub.go_offline_if_unreachable()


def test_a_reachable_hub_stays_online(hub_online, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.go_offline_if_unreachable() is None
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


def test_the_probe_goes_through_the_proxy_the_environment_names(hub_online, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # resolves nowhere: only the proxy answers
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert hub.go_offline_if_unreachable() is None
    assert not constants.HF_HUB_OFFLINE
