"""check_model_settings and fetch_weights: a model config, a pretrained value or a download that cannot
work is one ModelSettingsError / FetchFailed naming the setting, before anything loads or retries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
from huggingface_hub import constants

import sidecar
from sidecar.config import Settings
from sidecar.model.weights import FetchFailed, ModelSettingsError, check_model_settings, fetch_weights
from tests.support import free_port

TINY_CONFIG = Path(sidecar.__file__).parent / "model" / "model_configs" / "tiny-clip.json"


def settings(tmp_path: Path, **fields: str) -> Settings:
    return Settings(device="cpu", cache_dir=tmp_path / "cache", **fields)


def test_a_model_config_that_is_not_json_is_one_error_naming_the_file_and_open_clip_still_scans_after(tmp_path):
    bad = tmp_path / "my-arch.json"
    bad.write_text('{"embed_dim": 64,')
    with pytest.raises(ModelSettingsError, match=r"model config '.*my-arch.json' \(--model-config / "
                                                 r"SIDECAR_MODEL_CONFIG\) is not a JSON file: Expecting property name"):
        check_model_settings(settings(tmp_path, model="my-arch", model_config=str(bad)))
    # open_clip never took the file on its list, which every later scan would have failed on.
    open_clip.add_model_config(TINY_CONFIG)
    assert "tiny-clip" in open_clip.list_models()


def test_a_model_config_missing_keys_names_them_rather_than_calling_the_model_unknown(tmp_path):
    config = json.loads(TINY_CONFIG.read_text())
    del config["text_cfg"]
    path = tmp_path / "half-arch.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ModelSettingsError, match=r"'.*half-arch.json' \(--model-config / SIDECAR_MODEL_CONFIG\) "
                                                 r"lacks text_cfg: an open_clip architecture has embed_dim, vision_cfg, "
                                                 r"text_cfg"):
        check_model_settings(settings(tmp_path, model="half-arch", model_config=str(path)))


@pytest.mark.parametrize("name", ["ViT-B-32", "tiny-clip"])
def test_a_model_config_named_as_a_built_in_model_is_refused_rather_than_replacing_it(tmp_path, name):
    clash = tmp_path / f"{name}.json"
    shutil.copy(TINY_CONFIG, clash)
    with pytest.raises(ModelSettingsError, match=f"is named as the built-in model '{name}': rename the file"):
        check_model_settings(settings(tmp_path, model="ViT-B-32", model_config=str(clash)))
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512  # open_clip's own, untouched


def test_a_folder_of_model_configs_passes_over_json_that_is_no_architecture(tmp_path):
    shutil.copy(TINY_CONFIG, tmp_path / "folder-arch.json")
    (tmp_path / "notes.json").write_text('{"author": "me"}')
    check_model_settings(settings(tmp_path, model="folder-arch", model_config=str(tmp_path)))


def test_an_hf_hub_name_of_a_known_tag_is_refused_naming_the_model_and_tag_that_load_the_same_weights(tmp_path):
    with pytest.raises(ModelSettingsError) as raised:
        check_model_settings(settings(tmp_path, model="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"))
    assert str(raised.value) == (
        "'hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K' (--model / SIDECAR_MODEL): open_clip's hf-hub: names are "
        "not supported (the server loads only what `clip-sidecar models fetch` cached, offline); give the same "
        "weights by open_clip's name and tag: --model / SIDECAR_MODEL ViT-B-32 --pretrained / SIDECAR_PRETRAINED "
        "laion2b_s34b_b79k")


def test_an_hf_hub_name_open_clip_does_not_list_is_refused_saying_how_to_give_its_files(tmp_path):
    with pytest.raises(ModelSettingsError, match=r"give its open_clip_config.json's \"model_cfg\" saved as "
                                                 r"<name>.json \(--model-config / SIDECAR_MODEL_CONFIG"):
        check_model_settings(settings(tmp_path, model="ViT-B-32", pretrained="hf-hub:someone/their-clip"))


def test_a_pretrained_directory_or_missing_file_says_which_rather_than_listing_tags_alone(tmp_path):
    with pytest.raises(ModelSettingsError, match=r"\(--pretrained / SIDECAR_PRETRAINED\) is a directory: give the "
                                                 r"checkpoint file in it"):
        check_model_settings(settings(tmp_path, model="ViT-B-32", pretrained=str(tmp_path)))
    with pytest.raises(ModelSettingsError, match=r"\(--pretrained / SIDECAR_PRETRAINED\): no such checkpoint file; "
                                                 r"`clip-sidecar models list --model ViT-B-32` lists all \d+ "
                                                 r"pretrained tags of ViT-B-32$"):
        check_model_settings(settings(tmp_path, model="ViT-B-32", pretrained=str(tmp_path / "none.pt")))
    with pytest.raises(ModelSettingsError, match=r"'laion5b' \(--pretrained / SIDECAR_PRETRAINED\): neither a "
                                                 r"checkpoint file nor a pretrained tag of ViT-B-32; closest: "):
        check_model_settings(settings(tmp_path, model="ViT-B-32", pretrained="laion5b"))


def test_an_unknown_tag_or_model_names_the_closest_few_choices_and_the_command_listing_them_all(tmp_path):
    with pytest.raises(ModelSettingsError) as refused:
        check_model_settings(settings(tmp_path, model="ViT-B-32", pretrained="laion2b"))
    said = str(refused.value)
    assert "; closest: laion2b_e16, laion2b_s34b_b79k, " in said  # the tags it begins first
    tags = len(open_clip.list_pretrained_tags_by_model("ViT-B-32"))
    assert f"`clip-sidecar models list --model ViT-B-32` lists all {tags} pretrained tags of ViT-B-32" in said
    assert "openai" not in said and "metaclip" not in said  # not every one of its tags
    with pytest.raises(ModelSettingsError) as refused:
        check_model_settings(settings(tmp_path, model="ViT-B-23"))
    said = str(refused.value)
    assert said.startswith("unknown model 'ViT-B-23' (--model / SIDECAR_MODEL); closest: ViT-B-32, "), said
    assert "`clip-sidecar models list` lists all" in said and "the tiny ones, trained here: tiny-clip, " in said
    assert "RN50" not in said


def test_a_download_from_an_unreachable_hub_fails_at_once_saying_it_is_unreachable(tmp_path, monkeypatch):
    # huggingface_hub would retry the refused connection with back-off, per file, about a minute, then say the
    # file is "neither online nor cached" as it says of one that does not exist.
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(FetchFailed) as raised:
        fetch_weights(settings(tmp_path, model="ViT-B-32", pretrained="laion2b_s34b_b79k"), progress=False)
    message = str(raised.value)
    assert message.startswith(f"could not download ViT-B-32 / laion2b_s34b_b79k: the Hugging Face Hub "
                              f"({constants.ENDPOINT}) is unreachable from this machine (offline, or blocked: "), \
        message
    assert "pass --pretrained /path/to/checkpoint" in message
    assert not any((tmp_path / "cache").rglob("*.bin")) and not any((tmp_path / "cache").rglob("*.safetensors"))


def test_hf_hub_offline_is_named_as_why_nothing_was_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FetchFailed, match="HF_HUB_OFFLINE is set, so the Hugging Face Hub is not asked"):
        fetch_weights(settings(tmp_path, model="ViT-B-32", pretrained="laion2b_s34b_b79k"), progress=False)
