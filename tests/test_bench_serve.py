"""``python -m gpt2lab.bench serve``: its pure parts (percentiles, table rows, server-sent events, requests), and the
load generator against a fake OpenAI-style server of the standard library's, started as gpt2lab.serve would be."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from conftest import TINY

from gpt2lab.bench import serve
from gpt2lab.bench.__main__ import main as bench_main

# Answers as gpt2lab.serve does: /health, /v1/models, /v1/completions (streamed with usage in the last chunk, or
# not); max_tokens - len(prompt) % 2 tokens, so that counts are known; broken=1 cuts short the streams of prompts
# whose length is a multiple of 3.
FAKE_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = dict(a.split("=", 1) for a in sys.argv[1:])

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, body, kind="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.send(200, "ok", "text/plain")
        self.send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] != "fake":
            return self.send(404, json.dumps({"error": {"message": "unknown model"}}))
        tokens = body["max_tokens"] - len(body["prompt"]) % 2
        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
        if not body.get("stream"):
            return self.send(200, json.dumps({"choices": [{"text": "a" * tokens}], "usage": usage}))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(tokens):
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n')
        if ARGS.get("broken") and len(body["prompt"]) % 3 == 0:
            return
        self.wfile.write(("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\ndata: [DONE]\n\n").encode())

ThreadingHTTPServer(("127.0.0.1", int(ARGS["port"])), Handler).serve_forever()
"""
LOAD = ["--requests", "5", "--clients", "3", "--max-tokens", "4", "--warmup", "1", "--busy-ok"]


@pytest.fixture
def fake_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake server's script; the bench starts it in place of ``python -m gpt2lab.serve``."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    monkeypatch.setattr(serve, "server_command", lambda args, port: [sys.executable, str(script), f"port={port}"])
    monkeypatch.setattr(serve, "served_tokenizer", lambda args: (None, None))  # no checkpoint behind it
    return script


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert serve.percentile(values, 50) == pytest.approx(50.5)
    assert serve.percentile(values, 99) == pytest.approx(99.01)
    assert serve.percentile([3.0], 99) == 3.0
    assert serve.percentile([], 50) is None


def test_sse_data() -> None:
    assert serve.sse_data('data: {"choices": [{"text": "a"}]}') == {"choices": [{"text": "a"}]}
    assert serve.sse_data("data:{}") == {}
    assert serve.sse_data("data: [DONE]") is serve.DONE
    for nothing in ["", ": keep-alive", "event: message", "id: 3"]:
        assert serve.sse_data(nothing) is None
    with pytest.raises(ValueError):
        serve.sse_data("data: {broken")


def test_summary_and_table_row() -> None:
    outcomes = [
        serve.Outcome(seconds=1.0, stream=True, tokens=10, prompt_tokens=30, first_token_s=0.25),
        serve.Outcome(seconds=3.0, stream=False, tokens=20, prompt_tokens=34),
        serve.Outcome(seconds=9.0, stream=True, error="HTTP 500: boom"),
    ]
    level = serve.Level(8, 2.0, outcomes, client_cpu=0.25, rss_before=100 * 2**20, rss_after=101 * 2**20)
    summary = serve.summarize(level, baseline_tokens_per_s=5.0)
    assert summary["lost"] == 1
    assert summary["requests_per_s"] == 1.0  # answered requests only
    assert summary["tokens_per_s"] == 15.0
    assert summary["prompt_tokens_per_request"] == 32.0
    row = serve.table_row(summary)
    assert row == ["8", "3", "1", "1.00", "15.0", "3.00x", "15.0", "2.000", "2.980", "0.250", "25%", "100 -> 101"]
    assert len(row) == len(serve.COLUMNS)
    bare = serve.table_row(serve.summarize(serve.Level(1, 1.0, [serve.Outcome(1.0, False, error="x")])))
    assert bare == ["1", "1", "1", "0.00", "0.0", "-", "0.0", "-", "-", "-", "0%", "-"]


def test_requests_and_prompts() -> None:
    prompts = serve.make_prompts(4, 32, seed=1)
    assert prompts == serve.make_prompts(4, 32, seed=1) != serve.make_prompts(4, 32, seed=2)
    assert all(64 < len(p) <= 32 * serve.CHARS_PER_TOKEN for p in prompts)
    both = serve.request_bodies("m", prompts, 16, "both")
    assert [b.get("stream", False) for b in both] == [True, False, True, False]
    assert both[0]["stream_options"] == {"include_usage": True}
    assert {b["model"] for b in both} == {"m"} and {b["max_tokens"] for b in both} == {16}
    assert all("stream" not in b for b in serve.request_bodies("m", prompts, 16, "off"))
    assert all(b["stream"] for b in serve.request_bodies("m", prompts, 16, "on"))


def test_prompts_of_the_served_tokenizer(trained_run: Path, capsys) -> None:
    """With the checkpoint's tokenizer, every prompt is the tokens asked for (or one or two fewer, where decoding
    and encoding again merge differently), so that prompt and max_tokens fit the context."""
    tokenizer, context = serve.served_tokenizer(argparse.Namespace(ckpt=str(trained_run), onnx=None, url=None))
    assert f"model.context_length={context}" in TINY
    for prompt in serve.make_prompts(8, 20, seed=3, tokenizer=tokenizer):
        assert 18 <= len(tokenizer.encode(prompt).ids) <= 20
    # A --max-tokens the context cannot hold stops before any server starts.
    assert serve.main(["--ckpt", str(trained_run), "--prompt-tokens", "8", "--max-tokens", str(context)]) == 1
    expected = f"Error: --prompt-tokens 8 and --max-tokens {context} do not fit the model's context of {context} tokens"
    assert capsys.readouterr().err.strip() == expected


def test_bench_starts_measures_and_stops_the_server(fake_server: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    started = []
    start = serve.start_server
    monkeypatch.setattr(serve, "start_server", lambda command, log: started.append(start(command, log)) or started[0])
    out = tmp_path / "out.json"
    assert bench_main(["serve", "--ckpt", "run", *LOAD, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| clients |" in printed and "load: other processes kept" in printed
    result = json.loads(out.read_text())
    assert [level["clients"] for level in result["levels"]] == [1, 3]  # the 1-client baseline first
    tokens = [[o["tokens"] for o in outcomes] for outcomes in result["outcomes"]]
    assert tokens[0] == tokens[1] and set(tokens[0]) <= {3, 4} and len(tokens[0]) == 5
    for level in result["levels"]:
        assert level["requests"] == 5 and level["lost"] == 0
        assert level["rss_before"] > 0 and level["rss_after"] > 0  # the server's memory, read from /proc
        assert level["p50_first_token_s"] is not None  # every other request streamed
    assert result["levels"][0]["vs_baseline"] == 1.0
    assert started[0].poll() is not None  # stopped
    with pytest.raises(ProcessLookupError):
        os.killpg(started[0].pid, 0)


def test_lost_requests_are_counted(fake_server: Path, tmp_path: Path, capsys) -> None:
    port = serve.free_port()
    process = serve.start_server([sys.executable, str(fake_server), f"port={port}", "broken=1"], tmp_path / "log")
    try:
        serve.wait_ready(process, f"http://127.0.0.1:{port}", tmp_path / "log", 30)
        out = tmp_path / "out.json"
        argv = ["--url", f"http://127.0.0.1:{port}", *LOAD, "--warmup", "0", "--stream", "on", "--json", str(out)]
        assert serve.main(argv) == 1
    finally:
        serve.stop_server(process)
    broken = sum(len(prompt) % 3 == 0 for prompt in serve.make_prompts(5, 32))  # the bench's prompts
    assert 0 < broken < 5
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == f"Error: {2 * broken} requests lost; the first, at 1 clients: the stream ended before data: [DONE]"
    levels = json.loads(out.read_text())["levels"]
    assert [(level["requests"], level["lost"]) for level in levels] == [(5, broken), (5, broken)]


def test_a_server_that_dies_is_named_with_its_log(monkeypatch, capsys) -> None:
    command = [sys.executable, "-c", "import sys; print('no checkpoint here'); sys.exit(3)"]
    monkeypatch.setattr(serve, "server_command", lambda args, port: command)
    monkeypatch.setattr(serve, "served_tokenizer", lambda args: (None, None))
    assert serve.main(["--ckpt", "missing", "--busy-ok"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint here" in err  # the log's tail
    error = err.strip().splitlines()[-1]
    assert error.startswith("Error: the server exited with status 3 before it was ready; its log: ")
    assert "no checkpoint here" in Path(error.split("its log: ")[1]).read_text()


def test_bad_arguments() -> None:
    wrong = [
        ["--ckpt", "run", "--url", "http://127.0.0.1:1"],
        ["--ckpt", "run", "--onnx", "x"],
        ["--onnx", "x", "--clients", "0"],
    ]
    for argv in [[], *wrong]:
        with pytest.raises(SystemExit) as e:
            serve.main(argv)
        assert e.value.code == 2


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        bench_main(["serve", "--help"])
    assert e.value.code == 0 and "--clients" in capsys.readouterr().out


@pytest.mark.slow
def test_a_stopped_bench_stops_its_server(fake_server: Path) -> None:
    """SIGTERM (as kill and timeout send; Ctrl-C takes the same path) mid-level: exit 130, and the server is gone."""
    driver = (
        "import sys; from gpt2lab.bench import serve; "
        f"serve.server_command = lambda args, port: [sys.executable, {str(fake_server)!r}, f'port={{port}}']; "
        "serve.served_tokenizer = lambda args: (None, None); "
        "sys.exit(serve.main(['--ckpt', 'x', '--busy-ok', '--requests', '100000', '--max-tokens', '4']))"
    )
    bench = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True)
    started = next(line for line in bench.stderr if line.startswith("server: "))  # "server: <command> port=P ..."
    port = int(started.split("port=")[1].split()[0])
    serve.wait_ready(None, f"http://127.0.0.1:{port}", None, 30)  # then the warm-up and the first level
    time.sleep(2)
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=30) == 130
    assert bench.stderr.read().strip().endswith("Error: interrupted; the server is stopped")
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"http://127.0.0.1:{port}/health", timeout=5)
