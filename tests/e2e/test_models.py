"""`clip-sidecar models fetch|train` and the server's refusal to download or train a missing model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.config import Settings
from sidecar.model.encoder import load_encoder
from sidecar.model.tiny_model import checkpoint_path
from tests.support import free_port, gunicorn_boot


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_fetch_and_train_report_the_cached_tiny_model(test_cache_dir):
    result = run_cli("models", "fetch")
    assert result.returncode == 0, result.stderr
    assert f"tiny-clip is cached: {checkpoint_path(test_cache_dir)}" in result.stdout
    result = run_cli("models", "train")
    assert result.returncode == 0, result.stderr
    assert f"tiny-clip is already trained: {checkpoint_path(test_cache_dir)}" in result.stdout


def test_train_and_list_name_the_fine_tiny_model_so_the_command_they_show_trains_it(test_cache_dir, fine_encoder):
    large = checkpoint_path(test_cache_dir, model="tiny-clip-large")
    # `serve --fine-model tiny-clip-large` without it says: run `models train` with the same model settings.
    for flags in (["--fine-model", "tiny-clip-large"], ["--model", "tiny-clip-large"]):
        result = CliRunner().invoke(main, ["-q", "models", "train", *flags])
        assert result.exit_code == 0, result.output
        assert f"tiny-clip-large is already trained: {large}" in result.output
    listed = CliRunner().invoke(main, ["models", "list"]).output
    assert "tiny-clip-large                      trained here (`clip-sidecar models train --model tiny-clip-large`)" \
        in listed
    result = CliRunner().invoke(main, ["models", "train", "--model", "ViT-B-32"])
    assert result.exit_code == 2
    assert "only the tiny models (tiny-clip, tiny-clip-large) are trained here" in result.output


def test_serve_refuses_a_model_that_is_not_cached_and_names_the_command(tmp_path):
    empty = {"SIDECAR_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = run_cli("serve", "--port", str(free_port()), env=empty, timeout=60)
    assert result.returncode == 1
    assert "not starting the server: the tiny model is not trained yet" in result.stderr
    assert "clip-sidecar models train" in result.stderr
    assert not any((tmp_path / "empty-cache").rglob("*.pt"))

    result = run_cli("serve", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", env=empty, timeout=60)
    assert result.returncode == 1
    assert "weights ViT-B-32 / laion2b_s34b_b79k are not in" in result.stderr
    assert "clip-sidecar models fetch" in result.stderr


def test_a_gunicorn_worker_without_the_model_fails_to_boot_in_one_line_instead_of_training(tmp_path, store_path):
    # gunicorn started directly (as a container's CMD does), past `serve`'s check.
    result = gunicorn_boot({**os.environ, "SIDECAR_CACHE_DIR": str(tmp_path / "empty-cache"),
                            "SIDECAR_STORE_PATH": str(store_path)})
    assert result.returncode != 0
    assert "the tiny model is not trained yet" in result.stderr and "clip-sidecar models train" in result.stderr
    assert "Traceback" not in result.stderr and "App failed to load" in result.stderr
    assert not any((tmp_path / "empty-cache").rglob("*.pt")), "a worker trained the model"


def test_a_gunicorn_worker_given_an_unknown_model_fails_to_boot_in_one_line_naming_the_setting(store_path):
    # One worker: where several fail at once, gunicorn's master itself prints a traceback of its
    # HaltServer (raised again while it stops the others), whatever the workers report.
    result = gunicorn_boot({**os.environ, "SIDECAR_MODEL": "ViT-Q-99", "SIDECAR_STORE_PATH": str(store_path)})
    assert result.returncode != 0
    assert "unknown model 'ViT-Q-99' (--model / SIDECAR_MODEL); " in result.stderr
    assert "the tiny ones, trained here: tiny-clip, tiny-clip-large" in result.stderr
    assert "Traceback" not in result.stderr


WRONG_MODELS = {
    "model": (["--model", "ViT-Q-99"],
              "Error: unknown model 'ViT-Q-99' (--model / SIDECAR_MODEL); "),
    "pretrained": (["--pretrained", "/nonexistent/none.pt"],
                   "Error: pretrained '/nonexistent/none.pt' (--pretrained / SIDECAR_PRETRAINED): no such checkpoint "
                   "file; the pretrained tags of tiny-clip: none"),
    "model config": (["--model", "my-arch", "--model-config", "{tmp}/my-arch.json"],
                     "Error: model config '{tmp}/my-arch.json' (--model-config / SIDECAR_MODEL_CONFIG) is not a JSON "
                     "file: "),
    "fine model": (["--fine-model", "ViT-Q-99"], "Error: unknown model 'ViT-Q-99' (--fine-model / SIDECAR_FINE_MODEL)"),
}


@pytest.mark.parametrize("wrong", WRONG_MODELS)
@pytest.mark.parametrize("command", [["search", "red"], ["embed", "{tmp}", "--out", "{tmp}/shards"],
                                     ["models", "fetch"]])
def test_a_wrong_model_or_weights_is_one_line_naming_the_setting_and_the_choices(tmp_path, store_path, command,
                                                                                 wrong):
    flags, message = WRONG_MODELS[wrong]
    (tmp_path / "my-arch.json").write_text('{"embed_dim": 64,')  # for "model config": cut short
    args = [arg.format(tmp=tmp_path) for arg in [*command, *flags]]
    result = CliRunner().invoke(main, ["-q", *args], env={"SIDECAR_STORE_PATH": str(store_path)})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.splitlines()[-1].startswith(message.format(tmp=tmp_path)), result.output


def unloadable_checkpoint(tmp_path: Path, test_cache_dir: Path, content: str) -> Path:
    bad = tmp_path / "bad.pt"
    if content == "another model's":
        bad.write_bytes(checkpoint_path(test_cache_dir, model="tiny-clip-large").read_bytes())
    else:
        bad.write_bytes(checkpoint_path(test_cache_dir).read_bytes()[:3000] if content == "cut short" else b"id,path\n")
    return bad


@pytest.mark.parametrize("content", ["cut short", "not a checkpoint", "another model's"])
@pytest.mark.parametrize("command", [["search", "red"], ["serve", "--port", "{port}"], ["models", "fetch"]])
def test_a_checkpoint_file_that_does_not_load_is_one_line_naming_the_setting(tmp_path, test_cache_dir, fine_encoder,
                                                                             store_path, command, content):
    # A truncated download or the wrong file given to --pretrained ended in torch's traceback (RuntimeError,
    # UnpicklingError or IndexError, by what the file held), from every command that loads the model; `models
    # fetch`, which a user runs to check the model is ready, said such a file "is cached" without loading it.
    bad = unloadable_checkpoint(tmp_path, test_cache_dir, content)
    args = [arg.format(port=free_port()) for arg in command]
    result = CliRunner().invoke(main, ["-q", *args, "--pretrained", str(bad)], env={"SIDECAR_STORE_PATH": str(store_path)})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.splitlines()[-1].startswith(
        f"Error: checkpoint '{bad}' (--pretrained / SIDECAR_PRETRAINED) does not load into tiny-clip ("), result.output


def test_a_gunicorn_worker_given_a_checkpoint_cut_short_fails_to_boot_in_one_line(tmp_path, test_cache_dir, store_path):
    bad = unloadable_checkpoint(tmp_path, test_cache_dir, "cut short")
    result = gunicorn_boot({**os.environ, "SIDECAR_PRETRAINED": str(bad), "SIDECAR_STORE_PATH": str(store_path)})
    assert result.returncode != 0
    assert f"checkpoint '{bad}' (--pretrained / SIDECAR_PRETRAINED) does not load into tiny-clip" in result.stderr
    assert "Traceback" not in result.stderr and "App failed to load" in result.stderr


def damaged_tiny_checkpoint(cache_dir: Path, test_cache_dir: Path) -> Path:
    """The trained tiny model in `cache_dir`, cut short (a copy of the cache dir that did not finish)."""
    damaged = checkpoint_path(cache_dir)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(checkpoint_path(test_cache_dir).read_bytes()[:3000])
    return damaged


@pytest.mark.parametrize("command", [["models", "fetch"], ["search", "red"], ["serve", "--port", "{port}"]])
def test_a_cached_tiny_checkpoint_cut_short_is_one_line_naming_the_file_and_the_remedy(tmp_path, test_cache_dir,
                                                                                      store_path, command):
    # `models fetch` said such a file "is cached" without loading it, and every command that loads the model
    # ended in torch's traceback.
    damaged = damaged_tiny_checkpoint(tmp_path / "cache", test_cache_dir)
    args = [arg.format(port=free_port()) for arg in command]
    result = CliRunner().invoke(main, ["-q", *args], env={"SIDECAR_CACHE_DIR": str(tmp_path / "cache"),
                                                           "SIDECAR_STORE_PATH": str(store_path)})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.splitlines()[-1].startswith("Error: the cached weights of tiny-clip do not load ("), \
        result.output
    assert (f"{damaged} is cut short or damaged; delete it and run `clip-sidecar models fetch` with the same model "
            "settings to train it again") in result.output


def test_a_gunicorn_worker_given_a_cached_tiny_checkpoint_cut_short_fails_to_boot_in_one_line(tmp_path, test_cache_dir,
                                                                                             store_path):
    damaged = damaged_tiny_checkpoint(tmp_path / "cache", test_cache_dir)
    result = gunicorn_boot({**os.environ, "SIDECAR_CACHE_DIR": str(tmp_path / "cache"),
                            "SIDECAR_STORE_PATH": str(store_path)})
    assert result.returncode != 0
    assert f"{damaged} is cut short or damaged" in result.stderr
    assert "Traceback" not in result.stderr and "App failed to load" in result.stderr


def test_a_cached_download_cut_short_is_one_line_naming_the_file_and_the_remedy(tmp_path):
    # `models fetch` said it "is cached" and every command loading it ended in safetensors' traceback. Offline:
    # the Hub is not asked for a newer file, as the server (gunicorn_config) does not ask it.
    damaged = hub_download(tmp_path, "ViT-B-32", "laion2b_s34b_b79k", b"cut short")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\n", encoding="utf-8")
    # A command that loads the model before anything else (`search` opens the store first: none in a clean checkout).
    for command in (["models", "fetch"], ["cache", "warm", str(prompts)]):
        result = run_cli(*command, "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k",
                         env={"SIDECAR_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 1, result.stderr
        message = result.stderr.splitlines()[-1]
        assert message.startswith("Error: the cached weights of ViT-B-32 / laion2b_s34b_b79k do not load "
                                  "(SafetensorError: "), result.stderr
        assert message.endswith(f"{damaged} is cut short or damaged; delete it and run `clip-sidecar models fetch` "
                                "with the same model settings to download it again"), result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("wrong", ["model", "fine model"])
def test_serve_refuses_a_wrong_model_before_starting_gunicorn(wrong):
    flags, message = WRONG_MODELS[wrong]
    result = run_cli("serve", "--port", str(free_port()), *flags, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(message), result.stderr
    assert "gunicorn" not in result.stderr


@pytest.mark.parametrize("command", [["models", "fetch"], ["embed", "{tmp}", "--out", "{tmp}/shards"]])
def test_a_download_from_an_unreachable_hub_is_one_line_saying_so_without_retrying(tmp_path, command):
    # huggingface_hub retried the refused connection with back-off for about a minute, then said the file was
    # "neither online nor cached" (`embed`: in open_clip's traceback), as it says of a file that does not exist.
    cache = tmp_path / "cache"
    endpoint = f"http://127.0.0.1:{free_port()}"
    unreachable = {"SIDECAR_CACHE_DIR": str(cache), "HF_ENDPOINT": endpoint}
    args = [arg.format(tmp=tmp_path) for arg in command]
    result = run_cli(*args, "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", env=unreachable)
    assert result.returncode == 1
    message = result.stderr.splitlines()[-1]
    assert message.startswith(f"Error: could not download ViT-B-32 / laion2b_s34b_b79k: the Hugging Face Hub "
                              f"({endpoint}) is unreachable from this machine (offline, or blocked: "), message
    assert "pass --pretrained /path/to/checkpoint" in message and "Traceback" not in result.stderr
    assert not [p for p in Path(cache).rglob("*") if p.is_file() and p.stat().st_size > 0 and "lock" not in p.name]


def checkpoint_forms(tmp_path: Path, test_cache_dir: Path) -> dict[str, Path]:
    """The tiny model's trained weights as a user may hold them: open_clip's .pt state dict, a .bin, a
    .safetensors file, and a training checkpoint (open_clip's "state_dict" with DDP's "module." prefix)."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(checkpoint_path(test_cache_dir), map_location="cpu", weights_only=True)
    forms = {"pt": tmp_path / "tiny.pt", "bin": tmp_path / "tiny.bin", "safetensors": tmp_path / "tiny.safetensors",
             "training checkpoint": tmp_path / "epoch_1.pt"}
    torch.save(state, forms["pt"])
    torch.save(state, forms["bin"])
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, forms["safetensors"])
    torch.save({"epoch": 1, "state_dict": {f"module.{name}": tensor for name, tensor in state.items()}},
               forms["training checkpoint"])
    return forms


def test_each_form_of_a_checkpoint_file_loads_and_embeds_as_the_trained_model(tmp_path, test_cache_dir, encoder):
    texts = ["a red circle", "two blue squares"]
    for form, path in checkpoint_forms(tmp_path, test_cache_dir).items():
        result = CliRunner().invoke(main, ["-q", "models", "fetch", "--pretrained", str(path)])
        assert result.exit_code == 0, (form, result.output)
        assert f"tiny-clip / {path} is cached: {path}" in result.output, (form, result.output)
        loaded = load_encoder(Settings.from_env(pretrained=str(path), device="cpu"), fetch=False)
        np.testing.assert_allclose(loaded.encode_texts(texts), encoder.encode_texts(texts), atol=1e-6, err_msg=form)


def test_models_list_names_the_tiny_models_first_then_each_open_clip_model_with_its_tags():
    result = CliRunner().invoke(main, ["-q", "models", "list"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in result.output.splitlines()}
    assert list(rows)[:2] == ["tiny-clip", "tiny-clip-large"]
    assert "laion2b_s34b_b79k" in rows["ViT-B-32"].split(", ") and "openai" in rows["ViT-B-32"].split(", ")


def hub_download(cache_dir: Path, model: str, tag: str, content: bytes) -> Path:
    """What `models fetch` leaves in `cache_dir` for a tag open_clip downloads from the Hub (huggingface_hub's
    cache layout), holding `content`."""
    import open_clip

    repo = open_clip.get_pretrained_cfg(model, tag)["hf_hub"].strip("/")
    snapshot = cache_dir / "weights" / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(content)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    return snapshot / "open_clip_model.safetensors"


def test_models_list_of_one_model_marks_each_tag_cached_or_not_from_the_cache_dir_alone(tmp_path):
    hub_download(tmp_path, "ViT-B-32", "openai", b"weights")
    # A configured checkpoint of another model does not stand in the way of listing the tags to choose from.
    result = CliRunner().invoke(main, ["-q", "models", "list", "--model", "ViT-B-32"],
                                env={"SIDECAR_CACHE_DIR": str(tmp_path), "SIDECAR_PRETRAINED": "/nonexistent/other.pt"})
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.startswith(f"ViT-B-32: {len(rows)} pretrained tags (cache: {tmp_path / 'weights'})")
    marks = dict(row.split(maxsplit=1) for row in rows)
    assert marks["openai"] == "cached" and marks["laion2b_s34b_b79k"] == "not cached"
