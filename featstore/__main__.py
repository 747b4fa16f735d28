"""`python -m featstore ...`: the `featstore` command (also what `torchrun ... -m featstore` runs on each rank).

Imports nothing heavy itself: the command's subcommands import torch and the trainers when they run.
"""

from featstore.command.cli import main

if __name__ == "__main__":
    main(prog_name="featstore")
