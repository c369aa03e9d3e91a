"""``python -m gpt2lab.bench data``: a synthetic corpus prepared through the real path, with its figures."""

import json
from pathlib import Path

import pytest

from gpt2lab.bench import data
from gpt2lab.bench.__main__ import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gigabytes", "0"], "--gigabytes 0: expected a positive size"),
        (["--shard-mb", "-1"], "--shard-mb -1: expected a positive size"),
        (["--ceiling-mb", "0"], "--ceiling-mb 0: expected a positive size"),
        (["--workers", "0"], "--workers 0: expected 1 or more processes"),
        (["--vocab", "10"], "--vocab 10: expected 512 or more (a byte-level BPE starts at 256 tokens)"),
        (
            ["--dir", "/nonexistent/deep/x"],
            "--dir /nonexistent/deep/x: its parent directory /nonexistent/deep does not exist",
        ),
    ],
)
def test_bad_options_stop_with_one_error_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", *argv, "--busy-ok"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"Error: {message}"]
    assert not Path("/nonexistent").exists()


def test_a_directory_that_is_not_empty_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["data", "--dir", str(tmp_path), "--busy-ok"]) == 1
    assert capsys.readouterr().err.strip().startswith(f"Error: --dir {tmp_path} is not empty")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_the_synthetic_text_is_paragraphs_of_words(tmp_path: Path) -> None:
    data.synthetic_file((tmp_path / "a.txt", 300_000, 1))
    text = (tmp_path / "a.txt").read_text()
    assert len(text.encode()) == 300_000
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert 1_500 < sum(map(len, paragraphs)) / len(paragraphs) < 6_000  # about 2.8 KB, a web page's text
    assert len(set(text.split())) > 1_000
    data.synthetic_file((tmp_path / "b.txt", 300_000, 1))
    assert (tmp_path / "b.txt").read_text() == text  # seeded


@pytest.mark.slow
def test_a_small_corpus_is_prepared_within_the_disk_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    argv = ["data", "--gigabytes", "0.02", "--vocab", "512", "--ceiling-mb", "2", "--shard-mb", "1", "--workers", "2"]
    assert main([*argv, "--busy-ok", "--json", str(out), "--dir", str(tmp_path / "work")]) == 0
    r = json.loads(out.read_text())
    assert r["text_mb"] == pytest.approx(20, rel=0.01)
    assert r["tokens"] * 2 == pytest.approx(r["token_mb"] * 1e6)  # uint16 tokens, every one in the files
    assert r["token_mb"] < r["peak_disk_mb"] <= r["disk_budget_mb"]
    assert r["peak_pss_mb"] > 0 and r["mb_per_s"] > 0 and set(r["ceiling_mb_per_s"]) >= {"encode_batch"}
    assert not (tmp_path / "work").exists()  # removed without --keep
    printed = capsys.readouterr().out
    assert "peak disk under the cache directory" in printed and "ceiling: encode_batch" in printed
