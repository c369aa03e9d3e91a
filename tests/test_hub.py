import logging
import socket
import time

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


@pytest.fixture
def unreachable_hub(hub_online, monkeypatch, tmp_path):
    """The Hub's endpoint is a local port nobody listens on, and nothing is in the Hub's cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections to it are refused
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return endpoint


def test_an_unreachable_hub_is_found_once_and_datasets_load_offline(unreachable_hub, tmp_path, caplog):
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gpt2lab.hub"):
        for _ in range(2):
            with pytest.raises(
                ConfigError,
                match=rf"data.name='wikitext': .*the Hub at {unreachable_hub} is unreachable.*only the local cache.*"
                r"Offline, use data=pystdlib",
            ):
                load_corpus("hub", name="wikitext", config_name="wikitext-2-raw-v1", hf_cache_dir=str(tmp_path))
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE  # both libraries use only their cache
    said = [r.getMessage() for r in caplog.records if r.name == "gpt2lab.hub"]
    assert len(said) == 1 and "unreachable" in said[0] and "offline mode" in said[0]
    assert time.monotonic() - started < 15  # was about 25 s of retries per request


def test_a_pretrained_tokenizer_on_an_unreachable_hub_fails_offline(unreachable_hub):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"tokenizer.name='gpt2': .*is unreachable.*use tokenizer=bpe"):
        load_pretrained("gpt2")
    assert constants.HF_HUB_OFFLINE
    assert time.monotonic() - started < 15


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
