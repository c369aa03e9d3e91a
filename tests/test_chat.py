"""``python -m gpt2lab.chat``, driven through a pseudo-terminal as a person would: type, watch the reply
stream, change a setting, stop a reply with Ctrl-C, leave with Ctrl-D."""

import os
import pty
import select
import signal
import sys
import time

import pytest

from gpt2lab.generate import TextGenerator  # with interactive_mode, the terminal chat
from gpt2lab.inference.chat import Chat


def read_until(fd: int, marker: bytes | tuple[bytes, ...], seen: bytearray, timeout: float = 120) -> bytes:
    """Read the terminal into ``seen`` until ``marker`` (or one of several) appears in what is read from now on;
    returns the one that did."""
    markers = marker if isinstance(marker, tuple) else (marker,)
    start = len(seen)
    deadline = time.time() + timeout
    while not any(m in seen[start:] for m in markers):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.time(), 0))
        if not ready:
            raise AssertionError(
                f"no {marker!r} within {timeout} s; the terminal shows:\n{seen.decode(errors='replace')}"
            )
        try:
            seen += os.read(fd, 4096)
        except OSError:  # the child has exited
            raise AssertionError(f"the chat ended before {marker!r}:\n{seen.decode(errors='replace')}") from None
    return next(m for m in markers if m in seen[start:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="pseudo-terminals need a POSIX system")
def test_chat_in_a_terminal(trained_run, tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat, as a user starts it
        # A process started in the background by a script ignores Ctrl-C, and so would the chat it execs;
        # in a user's terminal Ctrl-C is delivered.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(tmp_path)
        args = [f"ckpt={trained_run}", "inference.max_new_tokens=8", "inference.stop=[]"]
        os.execv(sys.executable, [sys.executable, "-m", "gpt2lab.chat", *args])
    screen = bytearray()
    read_until(fd, b"you> ", screen)
    os.write(fd, b"def main():\r")
    read_until(fd, b"model> ", screen)
    if b"you> " not in screen.split(b"model> ")[-1]:
        read_until(fd, b"you> ", screen)  # the reply streamed, and the prompt is back

    os.write(fd, b"/top_p 1.5\r")  # refused, naming the range
    read_until(fd, b"expected in (0, 1]", screen)
    os.write(fd, b"/max_new_tokens 100000\r")
    read_until(fd, b"(max_new_tokens = 100000)", screen)
    # Ctrl-C while a long reply streams stops the reply, not the chat. A sampled reply may end by itself
    # (<|endoftext|>) before the key arrives, and then Ctrl-C meets the prompt: try again.
    for _ in range(10):
        os.write(fd, b"class Foo:\r")
        read_until(fd, b"model> ", screen)
        os.write(fd, b"\x03")  # at once: this small model's replies often end (<|endoftext|>) within 0.2 s
        outcome = read_until(fd, (b"(stopped)", b"(Ctrl-D or /quit to leave)"), screen)
        if b"you> " not in screen.split(outcome)[-1]:
            read_until(fd, b"you> ", screen)
        if outcome == b"(stopped)":
            break
    assert b"(stopped)" in screen, screen.decode(errors="replace")
    replies = [r.split(b"you> ")[0].split(b"(stopped)")[0] for r in screen.split(b"model> ")[1:]]
    assert any(r.strip() for r in replies), screen.decode(errors="replace")  # the model's text streamed

    os.write(fd, b"\x04")  # Ctrl-D: leaves
    _, status = os.waitpid(pid, 0)
    try:
        while select.select([fd], [], [], 0.5)[0]:
            screen += os.read(fd, 4096)
    except OSError:
        pass
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"Traceback" not in screen


def test_the_oldest_turns_make_room_for_the_reply(trained_run):
    chat = Chat(TextGenerator(str(trained_run), device="cpu"), {"max_new_tokens": 8, "do_sample": False})
    chat.turns = [f"x{i}\n" for i in range(40)]  # far more than a 32-token context holds
    context = chat.context("hello")
    assert context.endswith("x38\nx39\nhello\n") and not context.startswith("x0\n")  # the latest turns kept
    assert len(chat.generator.tokenizer.encode(context).ids) <= 32 - 8
    assert chat.command("/reset") and chat.turns == []
    assert chat.command("/top_k 0").startswith("/top_k 0: inference.top_k=0: expected at least 1")
    assert chat.command("/top_k 1.5") == "/top_k 1.5: expected a whole number, e.g. /top_k 40"
    assert chat.command("/temperature") == "/temperature : expected a number, e.g. /temperature 0.7"
    assert chat.command("/quit") is None


def test_interactive_mode_from_python(trained_run, monkeypatch, capsys):
    lines = iter(["def f():", "/max_new_tokens 3", "import os"])

    def typed(prompt):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    TextGenerator(str(trained_run), device="cpu").interactive_mode({"max_new_tokens": 5, "stop": [], "seed": 0})
    screen = capsys.readouterr().out
    assert screen.count("model> ") == 2 and "(max_new_tokens = 3)" in screen


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], r"ckpt=\.\.\. is required"),
        (["ckpt=nope.ckpt"], "ckpt='nope.ckpt': no such file or directory"),
        (["ckpt=RUN", "inference.top_p=1.5"], r"inference.top_p=1.5: expected in \(0, 1\]"),
        (["ckpt=RUN", "inference.max_new_tokens=0"], "inference.max_new_tokens=0: expected at least 1"),
        (["ckpt=RUN", "device=foo"], "device='foo' cannot be used here"),
    ],
)
def test_bad_input_is_one_error_line_before_the_chat_starts(run_main, trained_run, tmp_path, args, message):
    import re

    args = [a.replace("RUN", str(trained_run)) for a in args]
    result = run_main("gpt2lab.chat", *args, cwd=tmp_path)
    assert result.returncode == 1
    assert re.search("Error: " + message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "you> " not in result.stdout
