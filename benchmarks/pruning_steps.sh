#!/usr/bin/env bash
# Training steps with and without median pruning: two 10-trial TPE sweeps (same seed) over the learning
# rate of a small model, 100 steps per trial, validated every 10. Prints each study's trials and total steps.
# Usage: bash benchmarks/pruning_steps.sh [workdir]   (about 3 minutes on 2 CPU cores)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work/conf/hparams_search" && cd "$work"
python - <<'PY'
from gpt2lab.data.pystdlib import pystdlib_documents
_, texts = pystdlib_documents()
open("corpus.txt", "w").write("\n\n".join(t[:3000] for t in texts[::7][:70]))
PY
cat > conf/hparams_search/lr_wide.yaml <<'YAML'
# @package _global_
defaults:
  - override /hydra/sweeper: gpt2lab_optuna
test: false
sample: null
hydra:
  sweep:
    subdir: trial_${optuna_trial}
  sweeper:
    n_trials: 10
    n_startup_trials: 3
    n_warmup_steps: 20
    sampler:
      seed: 7
    params:
      optimizer.lr: tag(log, interval(1e-6, 1e-1))
YAML
args=(data=files data.path="$work/corpus.txt" tokenizer=bpe tokenizer.vocab_size=320 model.context_length=32
      model.d_model=64 model.num_heads=2 model.num_layers=2 model.d_ff=128 data.batch_size=16 trainer.max_steps=100
      trainer.val_check_interval=10 trainer.limit_val_batches=4 trainer.enable_progress_bar=false paths.cache_dir="$work/cache")
for pruner in median none; do
  python "$repo/train.py" -m --config-dir conf hparams_search=lr_wide "${args[@]}" hydra.sweep.dir="$pruner" \
    hydra.sweeper.study_name="$pruner" hydra.sweeper.pruner="$pruner" > "$pruner.log" 2>&1
  echo "== pruner=$pruner"
  python -m gpt2lab.sweep report --storage "sqlite:///$work/$pruner/optuna.db" --study-name "$pruner"
done
