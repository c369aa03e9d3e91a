"""``python -m gpt2lab.bench serve --ckpt <run>``: gpt2lab's OpenAI-compatible server (``gpt2lab.serve``) under a
real HTTP load, at 1, 8 and 32 concurrent clients. It starts the server on a free port (or measures one already
running: ``--url``), then runs a closed loop per level: C clients, each sending ``/v1/completions`` requests one
after the other until the level's ``--requests`` are answered. The prompts are the same at every level, drawn from
the standard library's text with a fixed seed.

Why a closed loop of real HTTP clients: the server's claim is that concurrent requests are decoded together, so
the figure that matters is the throughput at C clients against one client at a time, through the same sockets,
JSON and server-sent events a user's tools go through. One client at a time is the baseline, measured in the same
run. Each level reports requests/s, generated tokens/s (``usage.completion_tokens``: the model may stop before
``max_tokens``), p50 and p99 latency, p50 time to first token of the streamed requests, the requests lost (any
status but 200, a stream without ``data: [DONE]`` or usage, a timeout), the bench's own CPU (near a whole core,
the clients would set the pace) and the server's resident memory before and after (a leak shows as a growing
column). The guard of ``bench.machine`` (``--busy-ok``, ``--busy-wait``) applies: on a shared CPU the server and
the clients would measure the sharing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from time import monotonic, perf_counter, process_time, sleep
from typing import Any

import httpx2
import numpy as np
import torch
from tokenizers import Tokenizer

from gpt2lab.bench import machine
from gpt2lab.checkpoint import find_checkpoint, read_checkpoint, read_payload
from gpt2lab.console import table
from gpt2lab.data.pystdlib import pystdlib_documents
from gpt2lab.errors import ConfigError
from gpt2lab.inference.onnx import export_config
from gpt2lab.lit.speed import describe_load
from gpt2lab.presets.probe import device_name

DEFAULT_CLIENTS = [1, 8, 32]
TEMPERATURE = 0.8  # sampled, as users decode; no seed, so that a server may batch requests as it likes
CHARS_PER_TOKEN = 4  # GPT-2's BPE on English and code, to size the prompts; the header prints the measured count
START_TIMEOUT_S = 600.0  # loading (and compiling) a model on a cold machine
URL_TIMEOUT_S = 30.0  # a server already running (--url)
STOP_TIMEOUT_S = 10.0
DONE = "[DONE]"  # the data of the last server-sent event of an OpenAI stream
COLUMNS = ["clients", "requests", "lost", "requests/s", "tokens/s", "vs 1 client", "tokens/request", "p50 s",
           "p99 s", "p50 first token s", "client CPU", "server RSS MiB"]  # fmt: skip


@dataclass
class Outcome:
    """One request: its latency, the tokens it generated, and, streamed, when the first text came; or why it was
    lost (``error``)."""

    seconds: float
    stream: bool
    tokens: int = 0
    prompt_tokens: int = 0
    first_token_s: float | None = None
    error: str | None = None


@dataclass
class Level:
    """One concurrency level: its clients, the wall time of its requests, their outcomes in request order, the
    bench's CPU time over the wall time, and the server's resident memory (bytes, all its processes) before and
    after."""

    clients: int
    seconds: float
    outcomes: list[Outcome]
    client_cpu: float = 0.0
    rss_before: int | None = None
    rss_after: int | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolated as numpy does; None for no values."""
    return float(np.percentile(values, q)) if values else None


def summarize(level: Level, baseline_tokens_per_s: float | None = None) -> dict[str, Any]:
    """A level's figures (the JSON's and the table's): throughput counts the answered requests over the level's wall
    time; latency and time to first token are over the answered requests (streamed ones for the latter)."""
    answered = [o for o in level.outcomes if o.error is None]
    tokens = sum(o.tokens for o in answered)
    tokens_per_s = tokens / level.seconds if level.seconds > 0 else 0.0
    return {
        "clients": level.clients,
        "requests": len(level.outcomes),
        "lost": len(level.outcomes) - len(answered),
        "seconds": level.seconds,
        "requests_per_s": len(answered) / level.seconds if level.seconds > 0 else 0.0,
        "tokens_per_s": tokens_per_s,
        "vs_baseline": tokens_per_s / baseline_tokens_per_s if baseline_tokens_per_s else None,
        "tokens_per_request": tokens / len(answered) if answered else 0.0,
        "prompt_tokens_per_request": sum(o.prompt_tokens for o in answered) / len(answered) if answered else 0.0,
        "p50_s": percentile([o.seconds for o in answered], 50),
        "p99_s": percentile([o.seconds for o in answered], 99),
        "p50_first_token_s": percentile([o.first_token_s for o in answered if o.first_token_s is not None], 50),
        "client_cpu": level.client_cpu,
        "rss_before": level.rss_before,
        "rss_after": level.rss_after,
    }


def table_row(summary: dict[str, Any]) -> list[str]:
    """A ``summarize``d level as the table's cells, in ``COLUMNS`` order; ``-`` for what was not measured."""
    before, after, ratio = summary["rss_before"], summary["rss_after"], summary["vs_baseline"]
    memory = "-" if before is None or after is None else f"{before / 2**20:,.0f} -> {after / 2**20:,.0f}"
    times = ["-" if summary[key] is None else f"{summary[key]:.3f}" for key in ("p50_s", "p99_s", "p50_first_token_s")]
    return [str(summary["clients"]), str(summary["requests"]), str(summary["lost"]), f"{summary['requests_per_s']:.2f}",
            f"{summary['tokens_per_s']:,.1f}", "-" if ratio is None else f"{ratio:.2f}x",
            f"{summary['tokens_per_request']:.1f}", *times, f"{summary['client_cpu']:.0%}", memory]  # fmt: skip


def sse_data(line: str) -> Any:
    """The payload of one line of a server-sent-events stream: the JSON of a ``data:`` line, ``DONE`` for
    ``data: [DONE]``, None for what carries none (blank lines between events, comments, ``event:``/``id:``
    fields). A ``data:`` line that is not JSON raises ``ValueError`` (the stream is broken)."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    return DONE if data == DONE else json.loads(data)


def make_prompts(count: int, prompt_tokens: int, seed: int = 0, tokenizer: Tokenizer | None = None) -> list[str]:
    """``count`` prompts of ``prompt_tokens`` tokens of ``tokenizer`` (the served model's: then the requests fit its
    context), or of about as many GPT-2 tokens: slices of the standard library's text (the corpus the default run
    trains on), starting at whitespace, drawn with ``seed``, the same on every run of the bench."""
    _, texts = pystdlib_documents()
    chars = prompt_tokens * CHARS_PER_TOKEN * (2 if tokenizer else 1)  # then cut to the tokens
    texts = [t for t in texts if len(t) > 4 * chars]
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        text = rng.choice(texts)
        start = rng.randrange(len(text) - 2 * chars)
        start = next((i + 1 for i in range(start, start + chars) if text[i].isspace()), start)
        piece = text[start : start + chars]
        if tokenizer is None:
            cut = max(piece.rfind(" "), piece.rfind("\n"))
            prompts.append(piece[:cut] if cut > chars // 2 else piece)
            continue
        ids = tokenizer.encode(piece).ids[:prompt_tokens]
        while len(tokenizer.encode(tokenizer.decode(ids)).ids) > prompt_tokens:  # decoding can merge differently
            ids = ids[:-1]
        prompts.append(tokenizer.decode(ids))
    return prompts


def served_tokenizer(args: argparse.Namespace) -> tuple[Tokenizer | None, int | None]:
    """The tokenizer and context of the model the bench serves (``--ckpt``, ``--onnx``); nothing for ``--url``."""
    if args.onnx:
        context = export_config(args.onnx)["gpt2lab"]["context_length"]
        return Tokenizer.from_file(str(args.onnx / "tokenizer.json")), context
    if args.url:
        return None, None
    checkpoint = read_checkpoint(find_checkpoint(args.ckpt, "outputs"))  # serve's paths.log_dir, for last/best
    return read_payload(checkpoint).tokenizer, checkpoint["hyper_parameters"]["model"].get("context_length")


async def complete(client: httpx2.AsyncClient, body: dict[str, Any]) -> Outcome:
    """Send one ``/v1/completions`` request and read its answer whole, streamed (server-sent events, usage in the
    last chunk) or not; any failure is the outcome's ``error``, never an exception."""
    stream = bool(body.get("stream"))
    start = perf_counter()
    outcome = Outcome(seconds=0.0, stream=stream)
    usage = None
    try:
        if stream:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                usage = await (
                    read_stream(response, outcome, start) if response.status_code == 200 else response.aread()
                )
        else:
            response = await client.post("/v1/completions", json=body)
            usage = response.json().get("usage") if response.status_code == 200 else None
        if response.status_code != 200:
            outcome.error = f"HTTP {response.status_code}: {response.text[:200]}"
        elif outcome.error is None and not (isinstance(usage, dict) and "completion_tokens" in usage):
            outcome.error = "no usage.completion_tokens" + (" in the stream's last chunk" if stream else "")
        elif outcome.error is None:
            outcome.tokens, outcome.prompt_tokens = int(usage["completion_tokens"]), int(usage.get("prompt_tokens", 0))
    except (httpx2.HTTPError, ValueError, TypeError, AttributeError) as e:
        outcome.error = f"{type(e).__name__}: {e}"
    outcome.seconds = perf_counter() - start
    return outcome


async def read_stream(response: httpx2.Response, outcome: Outcome, start: float) -> dict[str, Any] | None:
    """Read an OpenAI stream whole (past ``data: [DONE]``, so that its connection serves the next request): set
    ``outcome.first_token_s`` at the first chunk with text, or ``outcome.error`` for an error event or a stream that
    ends before ``[DONE]``; return the last usage seen."""
    usage, done = None, False
    async for line in response.aiter_lines():
        data = sse_data(line)
        if data is None or done:
            continue
        if data == DONE:
            done = True
        elif "error" in data:
            outcome.error = f"error event: {json.dumps(data['error'])[:200]}"
            return None
        else:
            if outcome.first_token_s is None and any(c.get("text") for c in data.get("choices") or []):
                outcome.first_token_s = perf_counter() - start
            usage = data.get("usage") or usage
    outcome.error = None if done else "the stream ended before data: [DONE]"
    return usage


async def run_level(url: str, bodies: list[dict[str, Any]], clients: int, timeout_s: float) -> Level:
    """A closed loop: ``clients`` clients, each sending the next of ``bodies`` as soon as its last one is answered,
    until all are; the wall time from the first request to the last answer, the outcomes in ``bodies``' order, and
    the bench's own CPU time over it (a load generator near one whole core would measure itself)."""
    outcomes: list[Outcome | None] = [None] * len(bodies)
    queue = iter(range(len(bodies)))  # shared: the event loop runs one client at a time between awaits

    async def client_loop(client: httpx2.AsyncClient) -> None:
        for i in queue:
            outcomes[i] = await complete(client, bodies[i])

    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=httpx2.Timeout(timeout_s)) as client:
        start, cpu = perf_counter(), process_time()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        seconds, cpu = perf_counter() - start, process_time() - cpu
    return Level(clients, seconds, [o for o in outcomes if o is not None], cpu / seconds)


def request_bodies(model: str, prompts: list[str], max_tokens: int, stream: str) -> list[dict[str, Any]]:
    """The requests of a level: one per prompt; ``stream`` ``on``, ``off`` or ``both`` (every other one)."""
    bodies = []
    for i, prompt in enumerate(prompts):
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": TEMPERATURE}
        if stream == "on" or (stream == "both" and i % 2 == 0):
            body.update(stream=True, stream_options={"include_usage": True})
        bodies.append(body)
    return bodies


def session_rss(session: int) -> int | None:
    """Resident bytes of the processes of ``session`` (the server runs in a session of its own, with the worker
    processes LitServe decodes in), read from ``/proc``; pages they share count once per process. None if none."""
    total = None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name: state, ppid, ...
            if int(fields[3]) == session:
                total = (total or 0) + int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # stat's 24th field: rss pages
        except (OSError, IndexError, ValueError):
            continue  # ended while we read
    return total


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    """``python -m gpt2lab.serve`` with the bench's checkpoint and device (or ONNX export) and server overrides."""
    return [sys.executable, "-m", "gpt2lab.serve", *server_args(args), f"port={port}"]


def server_args(args: argparse.Namespace) -> list[str]:
    """What the server is given besides its port: the model, the device, the overrides."""
    model = [f"onnx={args.onnx}"] if args.onnx else [f"ckpt={args.ckpt}", f"device={args.device}"]
    return [*model, *args.overrides]


def start_server(command: list[str], log: Path) -> subprocess.Popen:
    """The server, its output to ``log``, in a session of its own: Ctrl-C reaches the bench only, which stops the
    server's whole process group (its workers too)."""
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip


def wait_ready(process: subprocess.Popen | None, url: str, log: Path | None, timeout_s: float) -> None:
    """Poll ``GET /health`` until it answers 200. A ``ConfigError`` naming the log if the server exits first or is
    not ready after ``timeout_s`` (the log's last lines go to stderr before)."""
    deadline = monotonic() + timeout_s
    where = f"; its log: {log}" if log else ""
    while monotonic() < deadline:
        if process is not None and process.poll() is not None:
            print_tail(log)
            raise ConfigError(f"the server exited with status {process.returncode} before it was ready{where}")
        with suppress(httpx2.HTTPError):
            if httpx2.get(f"{url}/health", timeout=5).status_code == 200:
                return
        sleep(0.5)
    print_tail(log)
    raise ConfigError(f"the server at {url} was not ready (GET /health) after {timeout_s:g} s{where}; "
                      "--start-timeout SECONDS waits longer")  # fmt: skip


def print_tail(log: Path | None, lines: int = 20) -> None:
    """The last ``lines`` of the server's log on stderr, where the reason it failed usually is."""
    if log and log.is_file():
        print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]), file=sys.stderr)


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL to whatever is left after ``STOP_TIMEOUT_S``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = monotonic() + STOP_TIMEOUT_S
        while monotonic() < deadline:
            process.poll()  # reaps the leader, so that the group empties
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            sleep(0.1)


def model_id(url: str) -> str:
    """The model requests must name: the first of ``GET /v1/models``."""
    try:
        return httpx2.get(f"{url}/v1/models", timeout=30).raise_for_status().json()["data"][0]["id"]
    except (httpx2.HTTPError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"{url}/v1/models named no model ({type(e).__name__}: {e}); --model NAME names it") from e


def measure(
    args: argparse.Namespace, url: str, pid: int | None, tokenizer: Tokenizer | None
) -> tuple[str, list[Level]]:
    """The model's name, one warm-up round (untimed: caches, compilation; a failure there stops the bench) and the
    levels, baseline first."""
    model = args.model or model_id(url)
    prompts = make_prompts(args.requests, args.prompt_tokens, args.seed, tokenizer)
    bodies = request_bodies(model, prompts, args.max_tokens, args.stream)
    if args.warmup:
        warmup = asyncio.run(run_level(url, bodies[: args.warmup], 1, args.timeout))
        if errors := [o.error for o in warmup.outcomes if o.error]:
            raise ConfigError(f"the warm-up request failed: {errors[0]}")
    levels = []
    for clients in args.clients:
        before = session_rss(pid) if pid else None
        levels.append(asyncio.run(run_level(url, bodies, clients, args.timeout)))
        levels[-1].rss_before, levels[-1].rss_after = before, session_rss(pid) if pid else None
        print(f"measured: {clients} clients", file=sys.stderr, flush=True)
    return model, levels


def report(args: argparse.Namespace, model: str, levels: list[Level], loads: tuple[float, float]) -> int:
    """Print the table (and write ``--json``); 1 with an ``Error:`` line if any request was lost."""
    summaries = [summarize(level) for level in levels]
    base = summaries[0]["tokens_per_s"]
    summaries = [summarize(level, base) for level in levels]
    gpu = torch.cuda.is_available() and args.device != "cpu" and not args.onnx
    where = device_name(torch.device("cuda")) + ", host " if gpu else ""
    server = args.url or " ".join(["python -m gpt2lab.serve", *server_args(args)])
    prompt = np.mean([s["prompt_tokens_per_request"] for s in summaries])
    print(f"{server}: model {model!r}, {where if args.url is None else 'client '}{device_name(torch.device('cpu'))}")
    print(f"{args.requests} /v1/completions per level, prompts of {prompt:.0f} tokens, max_tokens {args.max_tokens}, "
          f"temperature {TEMPERATURE}, stream {args.stream}")  # fmt: skip
    print("\n" + table(COLUMNS, [table_row(s) for s in summaries], markdown=True, align=["right"] * len(COLUMNS)))
    print(describe_load(*loads))
    if args.json:
        options = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        outcomes = [[asdict(o) for o in level.outcomes] for level in levels]
        result = {"args": options, "model": model, "load": loads, "levels": summaries, "outcomes": outcomes}
        args.json.write_text(json.dumps(result, indent=1))
    lost = [(lv.clients, o.error) for lv in levels for o in lv.outcomes if o.error]
    if lost:
        clients, first = lost[0]
        print(f"Error: {len(lost)} requests lost; the first, at {clients} clients: {first}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="more server overrides, as for gpt2lab serve (serve.x=y)")
    parser.add_argument("--ckpt", help="a .ckpt file or a run directory, for the server this bench starts")
    parser.add_argument("--onnx", type=Path, help="an ONNX export directory instead, served with onnxruntime")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="the server's device")
    parser.add_argument("--url", help="measure the server already running here (http://127.0.0.1:8000) instead")
    parser.add_argument("--model", help="the model name requests carry (default: the first of /v1/models)")
    parser.add_argument("--clients", type=int, nargs="+", default=DEFAULT_CLIENTS,
                        help="concurrency levels; 1 (the baseline) is always measured, first")  # fmt: skip
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (GPT-2's, about, with --url)")
    parser.add_argument("--stream", choices=["both", "on", "off"], default="both", help="both: every other request")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first, one at a time")
    parser.add_argument("--seed", type=int, default=0, help="draws the prompts")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take before it is lost")
    parser.add_argument("--start-timeout", type=float, help=f"seconds to wait for /health (default: {START_TIMEOUT_S:g}, "
                        f"with --url {URL_TIMEOUT_S:g})")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures and every request's outcome here")
    machine.add_busy_options(parser)
    args = parser.parse_args(argv)
    if [bool(args.ckpt), bool(args.onnx), bool(args.url)].count(True) != 1:
        parser.error("give --ckpt or --onnx for a server this bench starts, or --url for one already running")
    if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 1 or args.prompt_tokens < 1:
        parser.error("--clients, --requests, --max-tokens and --prompt-tokens must be 1 or more")
    args.clients = sorted({1, *args.clients})
    process, log = None, None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill or timeout: stopped as by Ctrl-C
    try:
        gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available() and not args.onnx)
        tokenizer, context = served_tokenizer(args)
        if context and args.prompt_tokens + args.max_tokens > context:
            raise ConfigError(f"--prompt-tokens {args.prompt_tokens} and --max-tokens {args.max_tokens} do not fit "
                              f"the model's context of {context} tokens")  # fmt: skip
        at_start = machine.wait_for_free_cores(args.busy_ok, args.busy_wait, gpu=gpu)
        port = free_port()
        url = args.url.rstrip("/") if args.url else f"http://127.0.0.1:{port}"
        if not args.url:
            log = Path(tempfile.mkstemp(prefix="gpt2lab-bench-serve-", suffix=".log")[1])
            process = start_server(command := server_command(args, port), log)
            print(f"server: {' '.join(command)} (its log: {log})", file=sys.stderr, flush=True)
        wait_ready(process, url, log, args.start_timeout or (URL_TIMEOUT_S if args.url else START_TIMEOUT_S))
        model, levels = measure(args, url, process.pid if process else None, tokenizer)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Error: interrupted; the server is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process is not None:
            stop_server(process)
    return report(args, model, levels, (at_start, machine.busy_share()))


if __name__ == "__main__":
    raise SystemExit(main())
