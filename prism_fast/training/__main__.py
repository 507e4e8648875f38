"""python -m prism_fast.training: the trainer's command line (also `python -m prism_fast.train`)."""

from prism_fast.training.cli import main

main()
