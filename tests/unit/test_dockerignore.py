""".dockerignore read as Docker reads it: the build context keeps every file the Dockerfiles COPY, and
nothing else of a checkout (its .venv, data/, caches, test outputs)."""

import re
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))


def _regex(pattern: str) -> str:
    """A pattern as Docker's patternmatcher translates it: `**/` any folders (none too), `**` anything, `*`
    anything within one path segment, `?` one character of it, `[…]` a class."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] in "*?":
            regex, i = regex + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i) + 1
            regex, i = regex + pattern[i:end], end
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return regex


def _rules() -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, excludes) per line of .dockerignore, in order; a leading `!` re-includes."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
            rules.append((re.compile(f"^{_regex(pattern)}$"), not line.startswith("!")))
    return rules


def sent(path: str, rules: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Whether the context holds `path`: the last rule matching it or a folder above it decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    excluded = False
    for pattern, excludes in rules:
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = excludes
    return not excluded


def copied_sources() -> set[str]:
    """The context paths the Dockerfiles' COPY instructions name (not those copied from another stage)."""
    sources = set()
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text(encoding="utf-8").splitlines():
            words = line.split()
            if words[:1] != ["COPY"] or any(word.startswith("--from") for word in words):
                continue
            sources.update(word for word in words[1:-1] if not word.startswith("--"))
    return sources


def test_every_file_the_dockerfiles_copy_is_in_the_build_context():
    rules = _rules()
    assert DOCKERFILES and {"pyproject.toml", "README.md", "sidecar", "plugin_config"} <= copied_sources()
    files = [path for source in copied_sources()
             for path in ([ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*"))
             if path.is_file() and "__pycache__" not in path.parts]
    assert files
    dropped = [str(path.relative_to(ROOT)) for path in files if not sent(str(path.relative_to(ROOT)), rules)]
    assert dropped == []


def test_a_checkouts_environment_data_caches_and_test_outputs_stay_out_of_the_build_context():
    rules = _rules()
    for path in (".venv/bin/python", "data/shards/shard-00000.npy", "data/store/vectors.f32", ".git/HEAD",
                 ".pytest_cache/v/cache/lastfailed", ".ruff_cache/CACHEDIR.TAG", ".hypothesis/examples/x",
                 "clip_sidecar.egg-info/PKG-INFO", "reports/junit.xml", "build/lib/sidecar/__init__.py",
                 "tests/unit/test_dockerignore.py", "bench/RESULTS.md", "docs/kubernetes.md",
                 "sidecar/__pycache__/config.cpython-311.pyc", "sidecar/api/__pycache__/app.cpython-311.pyc"):
        assert not sent(path, rules), path
