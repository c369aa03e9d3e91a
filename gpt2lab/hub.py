"""Reach the Hugging Face Hub only when it answers: one quick probe per process, else offline mode.

Without this, every Hub request from a machine with no route to the Hub retries for about 25 s
before ``huggingface_hub`` and ``datasets`` fall back to their local cache.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import urllib.request
from urllib.parse import urlsplit

import datasets
from huggingface_hub import constants

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def go_offline_if_unreachable() -> str | None:
    """Why the Hub will not be asked (None: it will be), for error messages.

    A user's HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE) is taken as is. Otherwise
    the Hub's endpoint (or the proxy the environment names for it) is probed once per process; when it
    does not answer, ``huggingface_hub`` and ``datasets`` are switched to offline mode, so that they
    look in their local cache at once instead of retrying.
    """
    if any(os.environ.get(var, "").upper() in datasets.config.ENV_VARS_TRUE_VALUES for var in OFFLINE_VARS):
        return "the Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    endpoint = constants.ENDPOINT
    if reachable(*first_hop(endpoint)):
        return None
    if not (constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE):
        log.warning(
            "The Hugging Face Hub at %s is unreachable from this machine: offline mode, only the local cache is used "
            "(set HF_HUB_OFFLINE=1 to skip this check)",
            endpoint,
        )
        constants.HF_HUB_OFFLINE = True  # both are read at each request
        datasets.config.HF_HUB_OFFLINE = True
    return f"the Hub at {endpoint} is unreachable from this machine, so only the local cache was searched"


@functools.cache
def reachable(host: str, port: int) -> bool:
    """Whether ``host:port`` accepts a TCP connection within PROBE_TIMEOUT_S (asked once per process)."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:  # refused, timed out, or the name does not resolve
        return False
    return True


def first_hop(endpoint: str) -> tuple[str, int]:
    """Where a request to ``endpoint`` connects first: the proxy the environment names for it, else the host."""
    url = urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
