"""The reliability benchmark's sweep case: a sweep worker killed mid-trial (SIGKILL), on the CPU.

Two workers share one SQLite study that is to hold ``N_TRIALS`` trials (``hydra.sweeper.n_trials_per=study``). Once
one worker's trial has reported its first validation loss, that worker is SIGKILLed; the other must fail the dead
trial by its heartbeat, re-run it with the same parameters and fill the study. Prints one JSON line for
``benchmarks/faults.py``'s table: checkpoints in the sweep that ``torch.load(weights_only=True)`` cannot read, and
trials lost (requested trials not COMPLETE or PRUNED at the end). Exits 0 once the case has run, whatever it found;
1 when it could not run it (a worker failed, or the kill came after the trial had ended).

Usage: python benchmarks/faults_sweep.py [workdir]   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 4
CASE = "sweep worker killed mid-trial"
SEARCH_SPACE = """# @package _global_
defaults:
  - override /hydra/sweeper: gpt2lab_optuna
test: false
sample: null
hydra:
  sweep:
    subdir: trial_${optuna_trial}
  sweeper:
    sampler:
      seed: 7
    params:
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
"""


def main(work: Path) -> int:
    import optuna
    import torch

    from gpt2lab.data.pystdlib import pystdlib_documents

    work.mkdir(parents=True, exist_ok=True)
    _, texts = pystdlib_documents()
    (work / "corpus.txt").write_text("\n\n".join(t[:3000] for t in texts[::7][:70]))
    (work / "conf" / "hparams_search").mkdir(parents=True, exist_ok=True)
    (work / "conf" / "hparams_search" / "lr.yaml").write_text(SEARCH_SPACE)
    sweep = work / "sweep"
    url = f"sqlite:///{sweep / 'optuna.db'}"
    args = [
        "-m", "--config-dir", str(work / "conf"), "hparams_search=lr", "data=files", f"data.path={work / 'corpus.txt'}",
        "tokenizer=bpe", "tokenizer.vocab_size=320", "tokenizer.show_progress=false", "model.context_length=32",
        "model.d_model=32", "model.num_heads=2", "model.num_layers=2", "model.d_ff=64", "data.batch_size=8",
        "trainer.max_steps=40", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"paths.cache_dir={work / 'cache'}",
        f"hydra.sweep.dir={sweep}", "hydra.sweeper.study_name=faults", f"hydra.sweeper.n_trials={N_TRIALS}",
        "hydra.sweeper.n_trials_per=study", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=5",
    ]  # fmt: skip
    started = time.time()

    def worker(name: str) -> subprocess.Popen:
        with (work / f"{name}.log").open("w") as log:
            return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=work, stdout=log, stderr=log)

    survivor, victim = worker("survivor"), worker("victim")
    killed_trial = None
    while killed_trial is None and victim.poll() is None:  # SIGKILL once the victim's trial is mid-way
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="faults", storage=url).trials
        except Exception:  # the study is not created yet
            continue
        for t in trials:
            if (t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
                    and t.intermediate_values):  # fmt: skip
                os.kill(victim.pid, signal.SIGKILL)
                killed_trial = t.number
                break
    victim.wait()
    if survivor.wait(timeout=1800) != 0 or killed_trial is None:
        print(f"{CASE}: a worker failed; see {work}/survivor.log and victim.log", file=sys.stderr)
        return 1

    trials = optuna.load_study(study_name="faults", storage=url).trials
    if trials[killed_trial].state.name != "FAIL":  # the trial ended between the poll and the kill: nothing tested
        print(f"{CASE}: trial {killed_trial} ended before the kill reached it; run again", file=sys.stderr)
        return 1
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    retries = [t for t in finished if t.system_attrs.get("failed_trial") == killed_trial]
    unloadable = 0
    for ckpt in sweep.glob("trial_*/checkpoints/*.ckpt"):
        try:
            torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception:
            unloadable += 1
    states = [t.state.name for t in trials]
    detail = (
        f"{len(finished)} of {N_TRIALS} trials COMPLETE/PRUNED; trial {killed_trial} (killed) "
        + (
            f"re-run as trial {retries[0].number}, same params: {retries[0].params == trials[killed_trial].params}"
            if retries
            else "not re-run"
        )  # fmt: skip
        + f"; {states.count('RUNNING')} left RUNNING; {time.time() - started:.0f} s"
    )
    row = {
        "case": CASE,
        "resumed_equal": None,
        "rel_diff": None,
        "unloadable_checkpoints": unloadable,
        "trials_lost": max(N_TRIALS - len(finished), states.count("RUNNING")),
        "detail": detail,
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="faults-sweep-"))))
