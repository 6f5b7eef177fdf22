"""`python -m tuner`: the CLI, from a source tree (a Ray job's uploaded working directory)."""

from tuner.face.cli import main

main()
