"""The scripts in bench/ against today's code. A benchmark broken by a change under it fails only when
someone runs it, minutes in (after its corpus is embedded), on the OpenSearch node or the lent GPU
machine it needed: the names it imports, the clip-sidecar command lines it runs and the flags
bench/gpu_run.sh passes it are checked here instead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
# serve_floor is a gunicorn app module: importing it loads a model (request_pieces.py and serve_load.py run it).
SCRIPTS = sorted(path.stem for path in BENCH.glob("*.py") if path.stem != "serve_floor")


def test_every_bench_script_imports_on_todays_code():
    imports = "; ".join(f"import {name}" for name in SCRIPTS)
    result = subprocess.run([sys.executable, "-c", imports], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}:{BENCH}"})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def opensearch_native(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import opensearch_native

    return opensearch_native


@pytest.mark.parametrize("command", [
    ["setup"],
    ["connect", "--sidecar-url", "http://127.0.0.1:18290", "--set-defaults", "--rerank", "none"],
    ["connect", "--disconnect"],
])
def test_the_opensearch_commands_bench_opensearch_native_runs_parse(opensearch_native, command):
    name, *flags = command
    args = [*flags, *opensearch_native.store_args("http://127.0.0.1:9200", "bench-native-q")]
    cli.commands["opensearch"].commands[name].make_context(name, args)  # click's usage error where one is refused


def gpu_steps() -> list[tuple[str, list[str]]]:
    """(script, its flags) of each `bench/NAME.py` that bench/gpu_run.sh runs."""
    text = (BENCH / "gpu_run.sh").read_text().replace("\\\n", " ")
    return [(script, re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", line.split(f"bench/{script}.py", 1)[1]))
            for line in text.splitlines() if line.startswith("step ")
            for script in re.findall(r"bench/(\w+)\.py", line)]


def test_gpu_run_passes_its_scripts_only_flags_they_take():
    steps = gpu_steps()
    assert {script for script, _ in steps} >= {"text_tower", "serve_load", "embed_throughput"}
    unknown = [(script, flag) for script, flags in steps for flag in flags
               if f'"{flag}"' not in (BENCH / f"{script}.py").read_text()]
    assert not unknown, f"bench/gpu_run.sh passes flags its scripts do not take: {unknown}"
