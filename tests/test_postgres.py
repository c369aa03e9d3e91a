"""Two workers sharing one Optuna study in a real PostgreSQL server, started by the test.

Needs the server binaries (Debian: ``apt-get install postgresql``; ``.ci/run`` installs them) and
psycopg2 (dev extra); skipped with the reason otherwise.
"""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO
from test_sweep import _sweep_args


def _server_binaries() -> str | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return os.path.dirname(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bindir: str, data: Path, sockets: Path, as_postgres: list[str], attempts: int = 5) -> int:
    """Start the PostgreSQL server of ``data`` on a free port of 127.0.0.1 (its log beside ``data``); the port.

    The server is handed a port number, not a socket, so a port found free can be taken by another process before
    the server binds it: a start that fails for that reason is tried again on another port."""
    for attempt in range(attempts):
        port, log = _free_port(), data.parent / f"server{attempt}.log"
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1"
        command = [*as_postgres, f"{bindir}/pg_ctl", "-D", str(data), "-o", options, "-w", "-l", str(log), "start"]
        started = subprocess.run(command, capture_output=True, text=True)
        if started.returncode == 0:
            return port
        said = log.read_text(errors="replace") if log.is_file() else ""
        if "Address already in use" not in said:
            break
    raise RuntimeError(f"PostgreSQL did not start: {started.stdout}{started.stderr}{said[-2000:]}")


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[dev]')")
    bindir = _server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    root = Path(
        tempfile.mkdtemp(prefix="gpt2lab-pg-")
    )  # not under pytest's root-only tmp: the server user must reach it
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a 'postgres' user to run the server as")
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True, capture_output=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    port = start_server(bindir, data, sockets, as_postgres)
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    run(f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tmp_path, corpus_file, cache_dir, postgres_url):
    import optuna

    args = _sweep_args(
        corpus_file, cache_dir, tmp_path / "study", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={postgres_url}"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    workers = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-3000:]
    trials = optuna.load_study(study_name="t", storage=postgres_url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
