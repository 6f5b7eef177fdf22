"""`python -m tuner`: the CLI, from a source tree (a Ray job's uploaded working directory)."""

from tuner.cli import main

main()
