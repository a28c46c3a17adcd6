"""`python -m sidecar.cli`: the same as the `clip-sidecar` script."""

from sidecar.cli import main

main()
