"""The `clip-sidecar` command line: one module per command group, registered on `main` here."""

from __future__ import annotations

from sidecar.cli.cache import cache
from sidecar.cli.demo import demo
from sidecar.cli.hard_examples import hard_examples
from sidecar.cli.ingest import embed, index
from sidecar.cli.keys import keys
from sidecar.cli.models import models
from sidecar.cli.opensearch import opensearch
from sidecar.cli.prompts import prompts, tag
from sidecar.cli.query import eval_command, search
from sidecar.cli.root import main
from sidecar.cli.serve import serve
from sidecar.cli.store import store

for _command in (embed, index, search, serve, models, eval_command, demo, cache, opensearch, store, keys,
                 prompts, tag, hard_examples):
    main.add_command(_command)

__all__ = ["main"]
