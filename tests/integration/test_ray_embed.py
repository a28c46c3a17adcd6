"""`clip-sidecar embed --engine ray` on a real Ray cluster: a head and a second node, each its own
`ray start` on loopback (scripts/ray-local), 1 CPU and 2 GiB each. The Ray job's shards hold what
the local job's hold; reruns skip, re-encode and record deletions as the local job does; a killed
driver's rerun and a node lost mid-run lose and duplicate nothing."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from tqdm import tqdm

from sidecar.config import THUMBNAIL_SIDE, TINY_MODEL, Settings
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.shards import ShardSet
from sidecar.model.encoder import Encoder
from sidecar.model.synthetic import sample_items, write_corpus
from sidecar.model.tiny_model import checkpoint_path

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
RAY_LOCAL = REPO / "scripts" / "ray-local"
# Each node has 1 CPU: an encoder actor (0.5) beside a decode and a writer task (0.25 each) fits on
# one node, so the job can finish on the head alone when the second node is lost.
RESOURCE_FLAGS = ("--actor-cpus", "0.5", "--task-cpus", "0.25")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[dict[str, str], str]]:
    """(environment naming the cluster for scripts/ray-local, head address); stopped at the end."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        reason = f"Ray is not installed (pip install 'clip-sidecar[ray]'; scripts/setup does): {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {reason}")
        pytest.skip(reason)
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_LOCAL_DIR": folder, "RAY_BIN": str(Path(sys.executable).with_name("ray")),
           # The GCS declares a silent node dead after ~2 s instead of ~15 s (the node-loss test).
           "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
           "RAY_health_check_failure_threshold": "3"}
    started = subprocess.run([str(RAY_LOCAL), "start", "--nodes", "2", "--cpus", "1"], env=env, capture_output=True,
                             text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr
        yield env, started.stdout.strip()
    finally:
        subprocess.run([str(RAY_LOCAL), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_ray_token_in_home_does_not_stop_the_loopback_cluster_from_starting(tmp_path):
    """A local `ray.init()` (`embed --engine ray --address local`) writes ~/.ray/auth_token; Ray's head then turned
    token authentication on and its second node, without it, failed to join (InvalidAuthToken): every later
    `scripts/ray-local start` failed until the file was removed."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {name: value for name, value in os.environ.items() if name not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(HOME=str(home), RAY_LOCAL_DIR=folder, RAY_BIN=str(Path(sys.executable).with_name("ray")))
    try:
        started = subprocess.run([str(RAY_LOCAL), "start", "--nodes", "2", "--cpus", "1"], env=env,
                                 capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr
        status = subprocess.run([str(RAY_LOCAL), "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.count(" up") == 2, status.stdout
    finally:
        subprocess.run([str(RAY_LOCAL), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_default_address_local_runs_a_ray_of_its_own_and_quiet_prints_the_summary_alone(tmp_path):
    """`--address local` (the default) starts a Ray for the command alone, which turns token authentication on and
    said so in a WARNING on every run, -q included: Ray's default, with nothing for the user to do (-v shows it)."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    manifest = write_corpus(tmp_path / "corpus", 4, seed=48)
    env = {"HOME": str(tmp_path / "home")}  # where Ray writes the token it makes (~/.ray/auth_token)
    process = ray_embed("local", manifest, tmp_path / "shards", env=env)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert stdout.startswith("4 items: 4 embedded") and stderr_lines(stderr) == [], stderr


def ray_embed(address: str, source: Path, out: Path, *extra: str, cwd: Path = REPO,
              env: dict[str, str] | None = None, verbosity: tuple[str, ...] = ("-q",)) -> subprocess.Popen:
    """The real CLI, this checkout's code, as the driver of a job on the cluster (`env`: more variables;
    `verbosity`: the CLI's -q or -v, or neither)."""
    return subprocess.Popen([sys.executable, "-m", "sidecar.cli", *verbosity, "embed", str(source), "--out", str(out),
                             "--engine", "ray", "--address", address, *RESOURCE_FLAGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def finish(process: subprocess.Popen, *, timeout: float = 600) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stdout


def shard_contents(out: Path) -> tuple[Counter, dict[str, tuple[np.ndarray, dict]]]:
    """(how many rows each id has in the folder; id → (vector and fine vector, row fields and thumbnail
    bytes) of its newest row)."""
    shards = ShardSet(out)
    rows = Counter(row.id for _, row, _ in shards.rows())
    latest = {}
    for doc_id, (name, row, index) in shards.latest().items():
        fine = shards.fine_vectors(name)
        thumbnails = shards.thumbnails(name)  # None where the folder holds no thumbnails
        vectors = np.concatenate([shards.vectors(name)[index], [] if fine is None else fine[index]])
        latest[doc_id] = (vectors, {"path": row.path, "text": row.text, "metadata": row.metadata,
                                    "content_hash": row.content_hash,
                                    "thumbnail": None if thumbnails is None else thumbnails[index]})
    return rows, latest


def assert_same_shards(ray_out: Path, local_out: Path) -> None:
    """The same rows (a rerun's new row for a changed item beside the old one, as the local job
    writes it; nothing twice otherwise), the same thumbnail size and, per id, the same newest row,
    vector and thumbnail (the same JPEG bytes: both engines make it by `decode_data`)."""
    assert ShardSet(ray_out).thumbnail_side == ShardSet(local_out).thumbnail_side
    ray_rows, ray_latest = shard_contents(ray_out)
    local_rows, local_latest = shard_contents(local_out)
    assert ray_rows == local_rows
    assert ray_latest.keys() == local_latest.keys()
    for doc_id, (vector, fields) in local_latest.items():
        assert ray_latest[doc_id][1] == fields
        np.testing.assert_allclose(ray_latest[doc_id][0], vector, atol=1e-5, err_msg=doc_id)


def errors(out: Path) -> dict[str, str]:
    lines = (out / "errors.jsonl").read_text().splitlines()
    return {json.loads(line)["id"]: json.loads(line)["reason"] for line in lines}


def test_ray_job_writes_the_local_jobs_rows_and_vectors_and_reruns_like_it(ray_cluster, encoder: Encoder,
                                                                           model_settings: Settings, tmp_path):
    from sidecar.ingest.ray_engine import RayResources, embed_corpus_on_ray

    _, address = ray_cluster
    corpus = tmp_path / "corpus"
    manifest = write_corpus(corpus, 300, seed=31)
    (corpus / "garbage.jpg").write_bytes(b"not an image")
    with manifest.open("a") as fh:
        fh.write(json.dumps({"id": "garbage", "path": "garbage.jpg", "text": "nothing"}) + "\n")
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    resources = RayResources(actor_cpus=0.5, task_cpus=0.25)
    # A fine model (the tiny model again: its training is cached) takes the fine-vector path too.
    settings = dataclasses.replace(model_settings, fine_model=model_settings.model)

    def both_engines() -> tuple[str, str]:
        on_ray = embed_corpus_on_ray(settings, manifest, ray_out, address=address, batch_size=32, shard_size=64,
                                     resources=resources, progress=False)
        local = embed_corpus(encoder, manifest, local_out, batch_size=32, shard_size=64, workers=0,
                             fine_encoder=encoder, progress=False)
        # The same counts (the shard files differ: the Ray job writes one per writer task).
        return on_ray.describe().split(";")[0], local.describe().split(";")[0]

    on_ray, local = both_engines()
    assert on_ray == local
    assert on_ray.startswith("301 items: 300 embedded, 0 unchanged, 1 failed")
    assert_same_shards(ray_out, local_out)
    assert ShardSet(ray_out).thumbnail_side == THUMBNAIL_SIDE  # by default, as the local job
    assert set(shard_contents(ray_out)[0].values()) == {1}
    assert errors(ray_out) == errors(local_out) == {"garbage": errors(local_out)["garbage"]}
    manifest_names = ShardSet(ray_out).manifest["shards"]
    assert manifest_names == ShardSet(ray_out).shard_names() and len(manifest_names) >= 300 // 64
    assert ShardSet(ray_out).fine_signature == ShardSet(local_out).fine_signature == encoder.signature

    # Edit the corpus as a user would: two images replaced, one caption changed, three items
    # gone, four new ones. Both engines must see the same changes.
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for entry, item in zip(lines[:2], sample_items(2, seed=99)):
        item.image.save(corpus / entry["path"], format="JPEG")
    lines[2]["text"] = "a caption edited by hand"
    removed = lines[3:6]
    del lines[3:6]
    for item in sample_items(4, seed=123):
        item.image.save(corpus / f"new-{item.id}.jpg", format="JPEG")
        lines.append({"id": f"new-{item.id}", "path": f"new-{item.id}.jpg", "text": "new", "metadata": {}})
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))

    on_ray, local = both_engines()
    assert on_ray == local
    assert on_ray.startswith("302 items: 6 embedded, 294 unchanged, 1 failed (see errors.jsonl), 3 deleted since last "
                             "run, 1 with new text or metadata only")
    assert_same_shards(ray_out, local_out)
    # The three gone, and the id whose file cannot be used (no store may serve an old image for it).
    assert ShardSet(ray_out).deleted == ShardSet(local_out).deleted == ["garbage", *(entry["id"] for entry in
                                                                                    removed)]


def local_embed(source: Path, out: Path, *extra: str) -> subprocess.Popen:
    """The real CLI on the local engine, as `ray_embed` runs it on the cluster."""
    return subprocess.Popen([sys.executable, "-m", "sidecar.cli", "-q", "embed", str(source), "--out", str(out),
                             "--workers", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def tags_by_id(out: Path) -> dict[str, dict[str, list]]:
    """id → the tag fields (tag_SET, tag_SET_score) of its newest row."""
    return {doc_id: {name: value for name, value in fields["metadata"].items() if name.startswith("tag_")}
            for doc_id, (_, fields) in shard_contents(out)[1].items()}


def test_ray_job_tags_as_the_local_job_does_and_its_rerun_of_a_tagged_folder_tags_the_new_rows(
        ray_cluster, example_prompt_sets: Path, tmp_path, monkeypatch):
    _, address = ray_cluster
    monkeypatch.setenv("SIDECAR_PROMPT_SETS_DIR", str(example_prompt_sets))
    corpus = tmp_path / "corpus"
    manifest = write_corpus(corpus, 40, seed=41)
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"

    def both_engines(*tags: str) -> None:
        finish(ray_embed(address, manifest, ray_out, *tags))
        finish(local_embed(manifest, local_out, *tags))
        assert ShardSet(ray_out).tagging == ShardSet(local_out).tagging
        assert [spec["set"] for spec in ShardSet(ray_out).tagging] == ["shapes", "colors"]
        on_ray, local = tags_by_id(ray_out), tags_by_id(local_out)
        assert on_ray.keys() == local.keys()
        for doc_id, fields in local.items():  # the same labels; scores from vectors equal to within 1e-5
            assert fields.keys() == on_ray[doc_id].keys() == {"tag_shapes", "tag_shapes_score", "tag_colors",
                                                              "tag_colors_score"}
            assert [on_ray[doc_id]["tag_shapes"], on_ray[doc_id]["tag_colors"]] == [fields["tag_shapes"],
                                                                                    fields["tag_colors"]]
            assert len(fields["tag_colors"]) == 2
            np.testing.assert_allclose(on_ray[doc_id]["tag_colors_score"], fields["tag_colors_score"], atol=2e-4)

    both_engines("--tag", "shapes", "--tag", "colors:2")
    # New images, and a rerun without --tag: the folder's recorded sets tag them, on the cluster too.
    lines = manifest.read_text()
    for item in sample_items(4, seed=123):
        item.image.save(corpus / f"new-{item.id}.jpg", format="JPEG")
        lines += json.dumps({"id": f"new-{item.id}", "path": f"new-{item.id}.jpg", "text": "new"}) + "\n"
    manifest.write_text(lines)
    both_engines()
    assert len(tags_by_id(ray_out)) == 44


def test_a_corpus_field_named_as_a_tag_field_is_refused_by_the_driver_before_any_task_as_the_local_job_refuses_it(
        ray_cluster, example_prompt_sets: Path, tmp_path, monkeypatch):
    # Before, the shard-writing task found the clash: the user got Ray's task error and its traceback.
    _, address = ray_cluster
    monkeypatch.setenv("SIDECAR_PROMPT_SETS_DIR", str(example_prompt_sets))
    manifest = write_corpus(tmp_path / "corpus", 8, seed=33)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[2]["metadata"]["tag_shapes"] = "hand-written"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for out, process in ((tmp_path / "ray", ray_embed(address, manifest, tmp_path / "ray", "--tag", "shapes")),
                         (tmp_path / "local", local_embed(manifest, tmp_path / "local", "--tag", "shapes"))):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 1, stderr
        assert stderr.strip().splitlines()[-1] == ("Error: item 'item-000002': its metadata has a field 'tag_shapes', "
                                                   "which tagging with prompt set 'shapes' writes; rename it in the "
                                                   "corpus, or tag with another set")
        assert "Traceback" not in stderr and "RayTaskError" not in stderr
        assert not ShardSet(out).shard_names()  # refused before anything was embedded


def test_relative_paths_are_the_drivers_even_where_the_cluster_started_elsewhere(ray_cluster, encoder: Encoder,
                                                                                  model_settings: Settings, tmp_path):
    """The cluster's processes run in their own folders (here: wherever `ray start` ran); the job reads
    SOURCE, writes --out and loads the --pretrained and --fine-pretrained checkpoints as the user's shell meant
    them. Before, the actors looked for a relative checkpoint in their own folder: the job failed, saying the file
    the driver had just loaded did not exist."""
    _, address = ray_cluster
    write_corpus(tmp_path / "corpus", 12, seed=41)
    (tmp_path / "weights").mkdir()
    shutil.copy(checkpoint_path(model_settings.cache_dir), tmp_path / "weights" / "tiny.pt")
    stdout = finish(ray_embed(address, Path("corpus/manifest.jsonl"), Path("shards"), "--batch-size", "4",
                              "--pretrained", "weights/tiny.pt", "--fine-model", TINY_MODEL, "--fine-pretrained",
                              "weights/tiny.pt", cwd=tmp_path))
    assert "12 embedded" in stdout
    local = tmp_path / "local"
    embed_corpus(encoder, tmp_path / "corpus" / "manifest.jsonl", local, workers=0, fine_encoder=encoder,
                 progress=False)
    assert_same_shards(tmp_path / "shards", local)


# A record of the CLI's log ("2026-12-02 12:33:48,904 INFO sidecar.model.encoder: ..."): its logger's name.
RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ (\S+): ", re.M)


def stderr_lines(stderr: str) -> list[str]:
    """stderr's lines without the progress bars' redraws (which a record may follow on the same line)."""
    bars = re.sub(r"(?:scan|embed \(ray\)): *\d+%\|[^|]*\|[^\[]*\[[^\]]*\]", "\n", stderr)
    return [line for line in re.split(r"[\r\n]", bars) if line.strip()]


def test_quiet_prints_the_summary_alone_the_default_the_jobs_own_records_and_verbose_rays_too(ray_cluster, tmp_path):
    """Before, -q printed Ray's C++ errors (core_worker.cc: an actor with constructor arguments in the object store)
    and the default printed them too; -v showed none of Ray's records, its loggers set to WARNING by the job. The
    default names the cluster the job runs on (`--address auto` takes any on the machine), on a line of its own."""
    _, address = ray_cluster
    manifest = write_corpus(tmp_path / "corpus", 8, seed=46)
    outputs = {}
    for name, verbosity in (("quiet", ("-q",)), ("default", ()), ("verbose", ("-v",))):
        process = ray_embed(address, manifest, tmp_path / name, verbosity=verbosity)
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        assert stdout.splitlines() == [stdout.strip()] and stdout.startswith("8 items: 8 embedded")
        outputs[name] = stderr
    assert outputs["quiet"] == ""
    default = stderr_lines(outputs["default"])
    assert default and all(RECORD.match(line) for line in default), default  # no line of Ray's own (C++'s `[...`)
    assert {RECORD.match(line)[1].partition(".")[0] for line in default} == {"sidecar"}
    assert any(f"8 images to embed on 2 node(s) of the cluster at {address};" in line for line in default), default
    # Each of the job's records starts a line: the line naming the cluster came after the bar's first drawing,
    # on the bar's line.
    assert all(RECORD.match(line) for line in outputs["default"].split("\n") if " INFO sidecar." in line), \
        outputs["default"]
    verbose = {RECORD.match(line)[1] for line in stderr_lines(outputs["verbose"]) if RECORD.match(line)}
    assert any(name.startswith("ray.data.") for name in verbose), verbose
    assert any(name.startswith("ray._private.") for name in verbose), verbose


def test_the_cli_draws_the_ray_jobs_bar_from_0_to_every_image(ray_cluster, tmp_path):
    """Which counts it shows between depends on when the driver polls (`_bar_following`); that it moves per batch is
    the next test's."""
    _, address = ray_cluster
    manifest = write_corpus(tmp_path / "corpus", 16, seed=50)
    process = ray_embed(address, manifest, tmp_path / "shards", "--batch-size", "2", verbosity=())
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert stdout.startswith("16 items: 16 embedded") and "1 new shards" in stdout
    counts = [int(count) for count in re.findall(r"embed \(ray\): *\d+%\|[^|]*\| *(\d+)/16", stderr)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 16, counts


def test_the_bar_moves_to_each_count_the_encoder_actors_send_per_batch_and_a_batch_run_again_counts_once(
        ray_cluster, model_settings: Settings):
    """Before, the bar moved when a writer task returned its shard (4,096 images by default, minutes apart on CPUs):
    a corpus under one shard went from 0 to 100% at the end. The encoder (`_EncodeBatches`, as an actor runs it) is
    given one batch at a time here, the next only once the bar shows the last: a whole job's batches can all end
    between two of the driver's polls, and then no run shows a count between 0 and the total."""
    from sidecar.ingest.ray_engine import _bar_following, _connect, _embedded_counter, _EncodeBatches

    _, address = ray_cluster
    ray = _connect(address, verbose=False)
    try:
        counter = _embedded_counter(ray)
        encode = _EncodeBatches(model_settings, max_pixels=10**7, counter=counter)
        side = encode.encoder.images.spec.output_size[0]

        def batch(first: int) -> dict[str, np.ndarray]:
            ids = [f"item-{first}", f"item-{first + 1}"]
            return {"path": np.array([f"/{i}.jpg" for i in ids], dtype=object),
                    "row": np.array([json.dumps({"id": i}) for i in ids], dtype=object),
                    "reason": np.array(["", ""], dtype=object), "pixels": np.zeros((2, side, side, 3), dtype=np.uint8),
                    "thumbnail": np.array([b"", b""], dtype=object), "decode_s": np.zeros(2)}

        with tqdm(total=6, file=io.StringIO()) as bar, _bar_following(ray, counter, bar):
            for done in (2, 4, 6):
                encode(batch(done - 2))
                wait_for(lambda done=done: bar.n == done, what=f"the bar at {done}", timeout=60)
            encode(batch(0))  # Ray runs a batch again where its actor was lost
            assert ray.get(counter.count.remote()) == 6  # after the add: one caller's calls run in order
    finally:
        ray.shutdown()


@pytest.mark.parametrize(("flags", "refusal"), [
    (["--actor-cpus", "1.5"], "--actor-cpus 1.5: no node of the cluster has that many CPUs (the largest has 1)"),
    (["--task-cpus", "1.5"], "--task-cpus 1.5: no node of the cluster has that many CPUs (the largest has 1)"),
    (["--device", "cuda"], "--device cuda: the cluster has no GPU; use --device auto or cpu"),
])
def test_a_job_no_node_can_run_is_refused_naming_the_flag_before_any_actor_starts(ray_cluster, tmp_path, flags,
                                                                                  refusal):
    """The cluster holds 2 CPUs, 1 per node, and no GPU: 1.5 CPUs for an actor or a task fits the total but no node
    (the job waited forever); an actor on CUDA had none to load its model on (each failed)."""
    _, address = ray_cluster
    manifest = write_corpus(tmp_path / "corpus", 4, seed=43)
    process = ray_embed(address, manifest, tmp_path / "shards", *flags)  # a value given twice: the last counts
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, stderr
    assert f"Error: {refusal}" in stderr
    assert not list((tmp_path / "shards").glob("shard-*"))


def test_workers_that_cannot_import_a_dependency_fail_the_job_in_one_line_saying_what_to_install(ray_cluster, tmp_path):
    """Workers whose Python lacks open_clip: a module of that name that fails to import, first on their path by the
    job's runtime environment (as Ray's job submission injects one). Before, the command ended in Ray's task error
    and its traceback."""
    _, address = ray_cluster
    manifest = write_corpus(tmp_path / "corpus", 4, seed=44)
    shadow = tmp_path / "shadow" / "open_clip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'open_clip'\", name='open_clip')\n")
    job = {"runtime_env": {"env_vars": {"PYTHONPATH": str(shadow.parent)}}}
    process = ray_embed(address, manifest, tmp_path / "shards", env={"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)})
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr
    # The one line alone: Ray Data's log of the task's error and its traceback came before it.
    assert stderr.splitlines() == [
        "Error: a Ray worker cannot import what the job needs (No module named 'open_clip'): every node must run "
        "`ray start` from a Python with clip-sidecar's dependencies, the versions this driver has (pip install "
        "'clip-sidecar[ray]' there)"], stderr


def broken_workers(tmp_path: Path) -> dict[str, str]:
    """The environment of a driver whose job's workers fail in a way no check of the job foresees: open_clip,
    first on their path by the job's runtime environment, raises RuntimeError when the model loads."""
    shadow = tmp_path / "broken" / "open_clip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise RuntimeError('this node is broken')\n")
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {"PYTHONPATH": str(shadow.parent)}}})}


def test_a_worker_failing_fails_the_job_in_one_line_naming_the_workers_error_and_verbose_shows_its_traceback(
        ray_cluster, tmp_path):
    """Before, the command ended in Ray Data's logs of the error and Ray's traceback, tens of lines, with -q too."""
    _, address = ray_cluster
    manifest = write_corpus(tmp_path / "corpus", 4, seed=45)
    env = broken_workers(tmp_path)
    line = ("Error: the job failed on the Ray cluster (RuntimeError: this node is broken); -v shows Ray's report of it, "
            "with the worker's traceback")
    process = ray_embed(address, manifest, tmp_path / "quiet", env=env)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr
    assert stderr.splitlines() == [line], stderr
    process = ray_embed(address, manifest, tmp_path / "verbose", env=env, verbosity=("-v",))
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr
    assert stderr.splitlines()[-1] == line
    assert "raise RuntimeError('this node is broken')" in stderr  # the worker's traceback


def cluster_processes(env: dict[str, str], pattern: str) -> list[str]:
    """Command lines of the cluster's live processes that start with `pattern` (e.g. ray::MapWorker)."""
    sids = set(Path(env["RAY_LOCAL_DIR"], "sid").read_text().split())
    listing = subprocess.run(["ps", "-ww", "-eo", "sid=,stat=,args="], capture_output=True, text=True).stdout
    found = []
    for line in listing.splitlines():
        sid, stat, args = line.split(None, 2)
        if sid in sids and "Z" not in stat and args.startswith(pattern):
            found.append(args)
    return found


def wait_for(predicate, *, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory, encoder: Encoder) -> tuple[Path, Path]:
    """(manifest of 1,200 images, the local job's shards of it)."""
    manifest = write_corpus(tmp_path_factory.mktemp("kill-corpus"), 1200, seed=32)
    local = tmp_path_factory.mktemp("kill-local")
    embed_corpus(encoder, manifest, local, workers=0, progress=False)
    return manifest, local


def test_a_killed_ray_run_continues_where_it_stopped_with_nothing_lost_or_duplicated(ray_cluster, kill_corpus,
                                                                                       tmp_path):
    env, address = ray_cluster
    manifest, local_out = kill_corpus
    out = tmp_path / "shards"
    process = ray_embed(address, manifest, out, "--batch-size", "20", "--shard-size", "60")
    wait_for(lambda: len(list(out.glob("shard-*.jsonl"))) >= 2 or process.poll() is not None,
             what="the Ray job's second shard")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    # The cluster ends a job whose driver died: none of its workers may write on afterwards.
    wait_for(lambda: not cluster_processes(env, "ray::MapBatches") and not cluster_processes(env, "ray::MapWorker"),
             what="the killed job's workers to go", timeout=120)
    done = sum(shard_contents(out)[0].values())
    assert 0 < done < 1200, "the kill must land in the middle of the run"

    stdout = finish(ray_embed(address, manifest, out, "--batch-size", "20", "--shard-size", "60"))
    assert f"1200 items: {1200 - done} embedded, {done} unchanged, 0 failed" in stdout
    assert_same_shards(out, local_out)
    assert not list(out.glob("*.tmp"))
    # Nor a file of a shard the kill cut short: the rerun removed those (their run's name is never taken again).
    complete = set(ShardSet(out).shard_names())
    assert not [path.name for path in out.glob("shard-*") if path.name.partition(".")[0] not in complete]


def test_a_node_lost_mid_run_the_job_completes_on_the_rest_with_nothing_lost_or_duplicated_and_stdout_the_summary(
        ray_cluster, kill_corpus, tmp_path):
    env, address = ray_cluster
    manifest, local_out = kill_corpus
    out = tmp_path / "shards"
    process = ray_embed(address, manifest, out, "--batch-size", "20", "--shard-size", "60")
    try:
        wait_for(lambda: any(out.glob("shard-*.jsonl")) or process.poll() is not None,
                 what="the Ray job's first shard")
        assert process.poll() is None, "the job ended before the node could be lost"
        subprocess.run([str(RAY_LOCAL), "stop-node", "2"], env=env, check=True, capture_output=True, timeout=60)
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
        # Give the cluster its second node back for whatever runs after.
        subprocess.run([str(RAY_LOCAL), "start-node", "2"], env=env, capture_output=True, timeout=180)
    # stdout is the summary alone, and -q keeps Ray's reports of the lost node (its raylet's last log lines, each
    # task it retries) off stderr too: they are Ray's INFO records, for -v.
    assert len(stdout.splitlines()) == 1 and stdout.startswith("1200 items: 1200 embedded, 0 unchanged, 0 failed")
    assert "(raylet)" not in stderr and "Traceback" not in stderr, stderr
    assert_same_shards(out, local_out)



# A mount namespace of a process's own, where a tmpfs can cover a folder for it alone, without privileges.
NAMESPACE = ("unshare", "--user", "--map-root-user", "--mount", "--propagation", "private")


def unseen_line(source: Path, images: Path, then: str) -> re.Pattern:
    """The one line of a job whose workers cannot read `images` where the driver does."""
    return re.compile(
        rf"Error: a Ray worker cannot read {re.escape(str(images))}/item-\d+\.jpg, which this machine reads \(.+ on Ray "
        rf"node 127\.0\.0\.\d\): every node must see SOURCE \({re.escape(str(source))}\) and the images it lists at the "
        rf"same paths as this machine \(storage shared by all, mounted at the same place\); {then}")


def needs_namespaces() -> None:
    if shutil.which("unshare") is None or subprocess.run([*NAMESPACE, "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace of a process's own (unshare --user --mount)")


def test_a_source_the_workers_cannot_see_stops_the_scan_in_one_line_saying_every_node_must_see_it_at_the_same_path(
        ray_cluster, tmp_path):
    """The driver in a mount namespace of its own, where SOURCE is a tmpfs the cluster's nodes do not see (a disk
    mounted on the driver's machine alone; the cluster sees the empty folder under it). Before, the command blamed
    each file as the local engine does ('cannot read …: No such file or directory' … 'Make each readable')."""
    _, address = ray_cluster
    needs_namespaces()
    images = write_corpus(tmp_path / "corpus", 4, seed=48).parent
    source, out = tmp_path / "driver-only", tmp_path / "shards"
    source.mkdir()
    driver = ["-m", "sidecar.cli", "-q", "embed", str(source), "--out", str(out), "--engine", "ray", "--address",
              address, *RESOURCE_FLAGS]
    script = 'mount -t tmpfs tmpfs "$1" && cp "$2"/*.jpg "$1" && shift 2 && exec "$@"'
    process = subprocess.run([*NAMESPACE, "sh", "-c", script, "sh", str(source), str(images), sys.executable, *driver],
                             capture_output=True, text=True, timeout=600, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.returncode == 1, process.stderr
    assert not list(source.iterdir())  # the cluster's view: the tmpfs was the driver's alone
    [line] = process.stderr.splitlines()
    assert unseen_line(source, source, "nothing was embedded").fullmatch(line), line
    assert not list(out.glob("shard-*"))


def test_a_node_that_cannot_see_source_stops_the_job_in_one_line_instead_of_failing_its_items(ray_cluster, tmp_path):
    """Node 2 in a mount namespace of its own, where a tmpfs covers SOURCE: the driver and node 1 see the images. The
    scan's one hash task may run on either node, the decode tasks run on both. Before, the job succeeded with every
    item a node-2 task read failed ('cannot read file: … No such file or directory') and recorded as deleted (an
    index then drops their earlier rows)."""
    env, address = ray_cluster
    needs_namespaces()
    manifest = write_corpus(tmp_path / "corpus", 40, seed=49)
    subprocess.run([str(RAY_LOCAL), "stop-node", "2"], env=env, check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([*NAMESPACE, "sh", "-c", 'mount -t tmpfs tmpfs "$1" && exec "$2" start-node 2', "sh",
                        str(manifest.parent), str(RAY_LOCAL)], env=env, check=True, capture_output=True, timeout=180)
        process = ray_embed(address, manifest, tmp_path / "shards", "--batch-size", "1", "--shard-size", "4")
        _, stderr = process.communicate(timeout=600)
    finally:  # node 2 back as the other tests know it
        subprocess.run([str(RAY_LOCAL), "stop-node", "2"], env=env, capture_output=True, timeout=60)
        subprocess.run([str(RAY_LOCAL), "start-node", "2"], env=env, capture_output=True, timeout=180)
    assert process.returncode == 1, stderr
    [line] = stderr.splitlines()
    assert unseen_line(manifest, manifest.parent, "(nothing was embedded|the job stopped; a rerun goes on from the "
                                                  "shards it wrote)").fullmatch(line), line
