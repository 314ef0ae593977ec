import os

import pytest
import torch
from torch.testing import assert_close

from ssd.model_file import ModelFileError, load_model_file, read_model_file, save_model_file
from ssd.models import ssdlite_mobilenet_v2


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ssdlite_mobilenet_v2(num_classes=4, width_mult=0.25, image_size=96).eval()


def test_round_trip_gives_the_same_outputs(model, tmp_path):
    path = tmp_path / "m.pt"
    save_model_file(path, model, ["a", "b", "c"], meta={"steps": 3})
    loaded, info = load_model_file(path)
    assert info["class_names"] == ["a", "b", "c"]
    assert info["image_size"] == 96 and info["meta"] == {"steps": 3}
    assert not loaded.training
    x = torch.rand(2, 3, 96, 96)
    assert_close(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind


def test_loading_needs_only_the_file_in_a_fresh_process(model, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "m.pt"
    save_model_file(path, model, ["a", "b", "c"])
    code = (
        "import sys, torch; from ssd.model_file import load_model_file; "
        "m, info = load_model_file(sys.argv[1]); "
        "print(m.priors.shape[0], info['arch']['name'], len(info['class_names']))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(model.priors.shape[0]), "ssdlite_mobilenet_v2", "3"]


def test_class_name_count_must_match(model, tmp_path):
    with pytest.raises(ValueError, match="class names"):
        save_model_file(tmp_path / "m.pt", model, ["a"])


def test_failed_write_leaves_no_file(model, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_model_file(tmp_path / "m.pt", model, ["a", "b", "c"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content, message",
    [(b"not a torch file", "not a readable model file"), (None, "not an ssd-model file"), ("missing", "not found")],
)
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "m.pt"
    if content is None:
        torch.save({"weights": torch.zeros(1)}, path)
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as e:
        read_model_file(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("state", [None, "missing", {"w": [1.0]}])
def test_a_model_file_without_a_state_dict_of_tensors_is_named(model, tmp_path, state):
    path = tmp_path / "m.pt"
    save_model_file(path, model, ["a", "b", "c"])
    payload = torch.load(path, weights_only=True)
    if state == "missing":
        del payload["state_dict"]
    else:
        payload["state_dict"] = state
    torch.save(payload, path)
    with pytest.raises(ModelFileError) as e:
        load_model_file(path)
    assert str(e.value) == f"{path}: no state_dict of tensors in the model file"


def test_truncated_file_is_refused(model, tmp_path):
    path = tmp_path / "m.pt"
    save_model_file(path, model, ["a", "b", "c"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable model file"):
        load_model_file(path)


def test_an_onnx_graph_is_named_as_such(model, tmp_path):
    """predict and detect run model files; given the deployed .onnx, torch's own error advised
    loading it with weights_only=False (unsafe, and useless)."""
    from ssd.export import onnx_bytes

    path = tmp_path / "m.onnx"
    path.write_bytes(onnx_bytes(model))
    with pytest.raises(ModelFileError) as e:
        read_model_file(path)
    assert str(e.value) == f"{path}: an ONNX graph, not a PyTorch model file (.pt)"
