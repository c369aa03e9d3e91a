"""The reliability benchmark: a tiny CPU run stopped in the ways real runs stop, then run again with
``ckpt_path=auto`` (the same command), compared with a run never stopped.

Cases: SIGKILL before any checkpoint, after the first one, in the middle of writing one (a slow disk: the fourth
save, last.ckpt at the second validation, stalls half-written), and at a random step between the first checkpoint
and the end; SIGTERM (Kubernetes, spot instances) and SIGUSR1 under a
simulated SLURM job (a fake ``scontrol`` records the requeue); and a sweep worker killed mid-trial
(``benchmarks/faults_sweep.py``, when it is there). For each: whether the resumed run ends with the final validation
loss of the uninterrupted one (and their relative difference), the checkpoints ``torch.load(weights_only=True)``
cannot read after the fault and after the resume (must be 0), and the sweep's trials lost (must be 0).

Usage: bash benchmarks/faults.sh [workdir]   (about 5 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, VAL_EVERY = 24, 8
TINY = [
    "data=files", "tokenizer=bpe", "tokenizer.vocab_size=320", "tokenizer.show_progress=false",
    "model.context_length=32", "model.d_model=32", "model.num_heads=2", "model.num_layers=2", "model.d_ff=64",
    "data.batch_size=8", f"trainer.max_steps={MAX_STEPS}", f"trainer.val_check_interval={VAL_EVERY}",
    "trainer.limit_val_batches=2", "trainer.log_every_n_steps=2", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "test=false", "sample=null",
]  # fmt: skip
SAME = 1e-5  # relative difference of the final loss under which a resumed run counts as equal
STALLED = "faults: the checkpoint write stalls half-way"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=None, help="for the random kill step (default: from the clock)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else int(time.time()) % 10_000
    started = time.time()

    from gpt2lab.data.pystdlib import pystdlib_documents

    _, texts = pystdlib_documents()
    (work / "corpus.txt").write_text("\n\n".join(t[:3000] for t in texts[::7][:70]))
    common = [*TINY, f"data.path={work / 'corpus.txt'}", f"paths.cache_dir={work / 'cache'}"]
    bench = Bench(work, common)

    whole = bench.run("whole")
    assert whole.returncode == 0, whole.log()
    reference = whole.final_loss()
    random_step = random.Random(seed).randrange(VAL_EVERY + 2, MAX_STEPS)  # past the first checkpoint, not on one
    signal_at = ["+callbacks.stop._target_=helpers.SignalAtStep", f"+callbacks.stop.step={MAX_STEPS // 2 + 1}"]
    killed = -signal.SIGKILL
    cases = [  # (case, run directory, overrides, environment, the interrupted run's exit status)
        ("SIGKILL before any checkpoint", "kill_early", kill_at(VAL_EVERY // 2), {}, killed),
        ("SIGKILL after the first checkpoint", "kill_after", kill_at(VAL_EVERY + 1), {}, killed),
        # saves: 1 and 2 the best and last checkpoints at the first validation, 3 and 4 at the second
        ("SIGKILL while writing a checkpoint", "kill_write", ["--stall-save", "4"], {}, killed),
        (f"SIGKILL at a random step ({random_step})", "kill_random", kill_at(random_step), {}, killed),
        ("SIGTERM, then the same command", "sigterm", signal_at, {}, 128 + signal.SIGTERM),
        ("SIGUSR1 under SLURM, requeued", "sigusr1", [*signal_at, "+callbacks.stop.signal=SIGUSR1"], bench.slurm(),
         128 + signal.SIGUSR1),
    ]  # fmt: skip
    rows = [bench.case(*case, reference=reference) for case in cases]
    resumed_equal = all(r["resumed_equal"] for r in rows)
    rows.append(sweep_row(work))
    print_table(rows, started, seed)
    return 0 if resumed_equal and all(r["unloadable_checkpoints"] == 0 and not r["trials_lost"] for r in rows) else 1


def kill_at(step: int) -> list[str]:
    return ["+callbacks.kill._target_=helpers.KillAtStep", f"+callbacks.kill.step={step}"]


class Run:
    def __init__(self, directory: Path, returncode: int, log_file: Path) -> None:
        self.directory, self.returncode, self.log_file = directory, returncode, log_file

    def log(self) -> str:
        return self.log_file.read_text()[-3000:]

    def final_loss(self) -> float:
        return json.loads((self.directory / "results.json").read_text())["metrics"]["val/loss"]


class Bench:
    """Runs ``train.py`` as a user would (a new process each time), with the test callbacks importable."""

    def __init__(self, work: Path, common: list[str]) -> None:
        self.work, self.common = work, common
        self.env = {
            **os.environ,
            "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "GPT2LAB_TRUSTED_TARGETS": "helpers.*",
        }

    def run(self, tag: str, extra: list[str] = (), env: dict[str, str] | None = None, attempt: str = "") -> Run:
        directory = self.work / tag
        log_file = self.work / f"{tag}{attempt}.log"
        stall = []
        if extra[:1] == ["--stall-save"]:  # this script stands in for train.py, with torch.save made slow
            stall, extra = [__file__, *extra[:2], "--"], extra[2:]
        command = [sys.executable, *stall] if stall else [sys.executable, str(REPO / "train.py")]
        command += [*self.common, *extra, f"hydra.run.dir={directory}", "ckpt_path=auto"]
        with log_file.open("w") as out:
            process = subprocess.Popen(command, cwd=self.work, env={**self.env, **(env or {})}, stdout=out, stderr=out)
            while stall and process.poll() is None and STALLED not in log_file.read_text():
                time.sleep(0.2)
            if stall and process.poll() is None:
                process.send_signal(signal.SIGKILL)  # mid-write, as a node dying or the OOM killer would
            process.wait(timeout=900)
        return Run(directory, process.returncode, log_file)

    def slurm(self) -> dict[str, str]:
        """A SLURM job as Lightning sees one, with an ``scontrol`` that records how it was called."""
        bin_dir = self.work / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {self.work / "scontrol.calls"}\n')
        (bin_dir / "scontrol").chmod(0o755)
        return {
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "faults", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        }  # fmt: skip

    def case(self, name: str, tag: str, extra: list[str], env: dict, expected: int, reference: float) -> dict:
        """Stop a run as ``extra`` says, run the same command again, and compare its end with ``reference``."""
        stopped = self.run(tag, extra, env, attempt=".1")
        notes = [f"stopped with status {stopped.returncode}" + ("" if stopped.returncode == expected else " (!)")]
        checkpoints = self.work / tag / "checkpoints"
        unloadable = set(unloadable_checkpoints(checkpoints))
        left = sorted(p.name for p in checkpoints.glob("*")) if checkpoints.is_dir() else []
        notes.append(f"left {', '.join(left) or 'no checkpoint'}")
        if (checkpoints / "last.ckpt").is_file() and "last.ckpt" not in unloadable:
            notes[-1] += f" (last.ckpt at step {step_of(checkpoints / 'last.ckpt')} of {MAX_STEPS})"
        if env:
            calls = self.work / "scontrol.calls"
            notes.append(f"scontrol {calls.read_text().strip() if calls.is_file() else 'not called'}")
        resumed = self.run(tag, [], env, attempt=".2")  # the same command, as after any stop
        unloadable |= set(unloadable_checkpoints(checkpoints))
        if resumed.returncode != 0:
            notes.append(f"the resumed run failed (status {resumed.returncode}): see {resumed.log_file}")
            return row(name, None, None, len(unloadable), None, notes)
        resumed_from = json.loads((resumed.directory / "results.json").read_text())["resumed_from"]
        notes.append(f"resumed from {Path(resumed_from).name if resumed_from else 'nothing: started afresh'}")
        partial = sorted(p.name for p in checkpoints.glob(".*.tmp"))
        notes.append(f"partial files left after the resume: {', '.join(partial) or 'none'}")
        diff = abs(resumed.final_loss() - reference) / abs(reference)
        return row(name, diff <= SAME, diff, len(unloadable), None, notes)


def step_of(checkpoint: Path) -> int:
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def unloadable_checkpoints(directory: Path) -> list[str]:
    import torch

    bad = []
    for path in sorted(directory.glob("*.ckpt")) if directory.is_dir() else []:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            bad.append(path.name)
    return bad


def row(name: str, equal: bool | None, diff: float | None, unloadable: int, lost: int | None, notes: list) -> dict:
    return {
        "case": name,
        "resumed_equal": equal,
        "rel_diff": diff,
        "unloadable_checkpoints": unloadable,
        "trials_lost": lost,
        "detail": "; ".join(notes),
    }


def sweep_row(work: Path) -> dict:
    """The killed sweep worker, from ``benchmarks/faults_sweep.py`` (one JSON line), when that script is there."""
    script = REPO / "benchmarks" / "faults_sweep.py"
    name = "sweep worker killed mid-trial"
    if not script.is_file():
        return {**row(name, None, None, 0, None, ["not run: benchmarks/faults_sweep.py is not there"]), "run": False}
    result = subprocess.run([sys.executable, str(script), str(work / "sweep")], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        note = f"not run: faults_sweep.py exited {result.returncode}: {result.stderr.strip()[-300:]}"
        return {**row(name, None, None, 0, None, [note]), "run": False}
    return json.loads(lines[-1])


def print_table(rows: list[dict], started: float, seed: int) -> None:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        platform.processor() or platform.machine(),
    ) if Path("/proc/cpuinfo").is_file() else platform.processor()  # fmt: skip
    import torch

    print(
        f"\n{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}; a 2-layer d=32 GPT-2, {MAX_STEPS} steps"
    )
    print("| case | resumed = uninterrupted (rel. diff of final val/loss) | unloadable checkpoints | trials lost |")
    print("|---|---|---|---|")
    for r in rows:
        if r.get("run") is False:
            equal = "not run"
        elif r["resumed_equal"] is None:
            equal = "-" if r["rel_diff"] is None and r["trials_lost"] is not None else "no (did not finish)"
        else:
            equal = f"{'yes' if r['resumed_equal'] else 'no'} ({r['rel_diff']:.1e})"
        lost = "-" if r["trials_lost"] is None else str(r["trials_lost"])
        unloadable = "-" if r.get("run") is False else r["unloadable_checkpoints"]
        print(f"| {r['case']} | {equal} | {unloadable} | {lost} |")
    print()
    for r in rows:
        print(f"- {r['case']}: {r['detail']}")
    print(f"\n{time.time() - started:.0f} s in all (random kill seed {seed})")


def stalled_train(save_number: int, train_args: list[str]) -> None:
    """``train.py`` whose ``save_number``-th checkpoint write stops half-way (half the bytes on disk, then nothing),
    as on a slow or failing disk, so that the benchmark can SIGKILL it in the middle of the write."""
    import io

    import torch
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    save, count = TorchCheckpointIO.save_checkpoint, [0]

    def slow_save(self, checkpoint, path, storage_options=None):
        count[0] += 1
        if count[0] != save_number:
            return save(self, checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        print(f"{STALLED}: {path}", flush=True)
        time.sleep(3600)

    TorchCheckpointIO.save_checkpoint = slow_save
    sys.argv = [str(REPO / "train.py"), *train_args]
    from gpt2lab.train.__main__ import main as train_main

    train_main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stall-save"]:
        stalled_train(int(sys.argv[2]), sys.argv[4:])
    else:
        sys.exit(main())
