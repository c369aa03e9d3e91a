"""``python train.py`` / ``python -m gpt2lab.train`` / ``gpt2lab train`` / ``gpt2lab-train``: train a model.

python train.py [preset=small] [key=value ...]   (-m for a sweep: hparams_search=..., or values separated by commas)
"""

from gpt2lab.cli.app import hydra_app
from gpt2lab.train.run import train

# train returns cfg.optimized_metric: a sweep (Optuna, a grid) reads each job's from Hydra's job return
main = hydra_app("train", train)

if __name__ == "__main__":
    main()
