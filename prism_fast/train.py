"""`python -m prism_fast.train`: the trainer's command line under its first name. The trainer
is the `prism_fast.training` package; its public names are re-exported here so that
`from prism_fast.train import TrainConfig` keeps working."""

from prism_fast.training import *  # noqa: F401,F403
from prism_fast.training.cli import main

if __name__ == "__main__":
    main()
