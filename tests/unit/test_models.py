"""model.path as a folder: a missing one, or one without a model, is a one-line ConfigError."""

import pytest

from rlcore.config import ConfigError
from rlcore.models import resolve_model_path


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"^model.path={tmp_path}/nope: no such folder$"):
        resolve_model_path(f"{tmp_path}/nope")


def test_a_folder_without_a_model_says_what_to_name(tmp_path):
    with pytest.raises(ConfigError, match=r"no model in this folder \(no config.json\); name a folder saved by save_pretrained"):
        resolve_model_path(str(tmp_path))


def test_a_checkpoint_folder_points_to_its_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"a checkpoint's model is its model/ folder: model.path={tmp_path}/model$"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path(str(tmp_path / "model")) == str(tmp_path / "model")


def test_a_hub_id_is_left_to_transformers():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
