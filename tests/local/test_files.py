"""What both local commands share: the configured model, and the file names of explain's
pictures, which neither command reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.engine.cam.methods import METHOD_NAMES
from service.engine.imaging.images import ImageLimits, decode_image
from service.errors import InvalidImageError
from service.local.files import is_explain_picture, local_wording, safe_name


def test_a_models_file_with_several_models_needs_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = {"architecture": "resnet18", "num_classes": 2, "weights": "random"}
    models = [{"name": name, **tiny} for name in ("a", "b")]
    monkeypatch.setenv("GRADCAM_MODELS", json.dumps(models))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    assert main(["explain", str(image)]) == 2  # refused before any model is loaded
    assert "2 models are configured (a, b); choose one with --model" in capsys.readouterr().err


def test_method_names_stay_apart_in_file_names() -> None:
    assert len({safe_name(method) for method in METHOD_NAMES}) == len(METHOD_NAMES)
    assert safe_name("gradcam++") == "gradcam++"  # not gradcam's name
    is_picture = is_explain_picture
    assert is_picture(Path("im0.gradcam++.layer4.1.tabby.panel.png"))
    assert is_picture(Path("im0.png.layercam.layer4.crane.134.overlay.png"))
    assert not is_picture(Path("beach.overlay.png"))  # the user's, not named as ours
    assert not is_picture(Path("im0.gradcam.layer4.cat.npy.png"))


def test_random_weights_from_an_unreachable_hub_are_said_once_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from service.engine import loading
    from service.engine.hub import HubAccess
    from service.local.files import load_configured_model
    from service.settings import Settings

    tiny = {"name": "tiny", "architecture": "resnet18", "num_classes": 2, "weights": "hub"}
    monkeypatch.setenv("GRADCAM_MODELS", json.dumps([tiny | {"fallback_to_random": True}]))
    monkeypatch.setattr(
        loading, "hub_access", lambda: HubAccess(False, "huggingface.co cannot be reached")
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = load_configured_model(Settings(), None, "cpu")
    assert model.weights.random
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        "warning: Model 'tiny' runs with RANDOM weights: its maps and scores are meaningless."
        " Fell back to random: hub weights unavailable, huggingface.co cannot be reached and"
        " they are not in the local cache."
    ]


def test_image_errors_speak_of_the_file_while_the_api_keeps_its_upload_wording() -> None:
    with pytest.raises(InvalidImageError) as raised:
        decode_image(b"not an image", ImageLimits())
    api = raised.value.detail
    assert api.startswith("The uploaded data is not an image in any recognised format; send ")
    local = local_wording(api)
    assert local.startswith("not an image in any recognised format; use a JPEG, PNG")
    assert "upload" not in local
    assert local_wording("The JPEG image is truncated or corrupt") == (
        "The JPEG image is truncated or corrupt"  # nothing to re-word
    )
