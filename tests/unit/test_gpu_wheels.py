"""bench/gpu_wheels.sh fetches what the lent GPU machine's image lacks: a dependency forgotten there
fails every step of bench/gpu_run.sh at import, on the one run a session gets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def check(pyproject: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYPROJECT"} | ({"PYPROJECT": str(pyproject)} if pyproject else {})
    return subprocess.run(["bash", "bench/gpu_wheels.sh", "--check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_every_dependency_is_fetched_for_the_gpu_machine_or_already_in_its_image():
    result = check()
    assert result.returncode == 0, result.stderr


def test_a_dependency_the_gpu_wheels_do_not_cover_is_named(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch==2.14.1", "Some_New.Dep>=2", "flask>=3.0"]\n')
    result = check(pyproject)
    assert result.returncode != 0
    assert "some-new-dep" in result.stderr and "torch" not in result.stderr.split("(")[0]
