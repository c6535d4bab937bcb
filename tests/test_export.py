"""Export: OpenVINO FP32 equals TensorFlow, INT8 keeps the AUROC, both backends through evaluate,
and bad input."""

import json
import shutil

import numpy as np
import pytest
from conftest import assert_one_line_error, module, small_disk

from chexnet_hvd import data, export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_cnn):
    ckpt = trained_cnn / "run" / "checkpoints" / "best"
    module("export", "--checkpoint", ckpt, "--format", "openvino", "--precision", "fp32", check=True, timeout=300)
    module("export", "--checkpoint", ckpt, "--format", "openvino", "--precision", "int8",
           "--calib", trained_cnn / "records", "--calib-images", 200, check=True, timeout=300)
    return ckpt, trained_cnn / "run" / "export-openvino-fp32", trained_cnn / "run" / "export-openvino-int8"


def test_openvino_fp32_equals_tensorflow(exported, trained_cnn):
    ckpt, fp32, _ = exported
    batch = next(iter(data.eval_dataset(trained_cnn / "records", "test", 64, 64)))["image"].numpy()
    tf_predict, _ = export.load_predictor(ckpt, "tf")
    ov_predict, meta = export.load_predictor(fp32, "openvino")
    assert meta["classes"][0] == "Atelectasis" and meta["precision"] == "fp32"
    np.testing.assert_allclose(ov_predict(batch), tf_predict(batch), atol=1e-4)


def test_int8_keeps_the_mean_auroc_through_evaluate(exported, trained_cnn, tmp_path):
    ckpt, fp32, int8 = exported
    means = {}
    for name, backend, path in (("tf", "tf", ckpt), ("fp32", "openvino", fp32), ("int8", "openvino", int8)):
        module("evaluate", "--checkpoint", path, "--backend", backend, "--data", trained_cnn / "records",
               "--bootstrap", 50, "--out", tmp_path / name, check=True, timeout=300)
        means[name] = json.loads((tmp_path / name / "report.json").read_text())["mean_auroc"]["value"]
    assert means["tf"] > 0.8
    assert means["fp32"] == pytest.approx(means["tf"], abs=1e-4)
    assert abs(means["int8"] - means["fp32"]) <= 0.01, means


def test_export_and_backend_errors(exported, trained_cnn, tmp_path):
    ckpt, fp32, _ = exported
    assert_one_line_error(module("export", "--checkpoint", ckpt, "--precision", "int8"), "--calib")
    assert_one_line_error(module("export", "--checkpoint", ckpt, "--precision", "int8", "--calib", tmp_path),
                          "no manifest.json")
    assert_one_line_error(module("evaluate", "--checkpoint", ckpt, "--backend", "openvino",
                                 "--data", trained_cnn / "records"), "not an OpenVINO export")
    unknown = module("predict", trained_cnn / "syn" / "images", "--checkpoint", fp32, "--backend", "onnx")
    assert unknown.returncode == 2 and "invalid choice: 'onnx'" in unknown.stderr
    assert_one_line_error(module("predict", trained_cnn / "syn" / "images", "--checkpoint", fp32,
                                 "--backend", "openvino", "--cam", tmp_path), "--cam")
    # flags that would be ignored: refused
    assert_one_line_error(module("export", "--checkpoint", ckpt, "--format", "savedmodel", "--precision", "int8"),
                          "--precision", "--format openvino")
    assert_one_line_error(module("export", "--checkpoint", ckpt, "--calib", trained_cnn / "records"),
                          "--calib", "only an int8 export calibrates")


def test_export_replaces_an_earlier_export_and_refuses_any_other_folder(trained_cnn, tmp_path):
    """--out naming a folder that holds something else (the run directory, the current one)
    was deleted and replaced; now it is refused, untouched. An earlier export is replaced."""
    ckpt = trained_cnn / "run" / "checkpoints" / "best"
    for out in (trained_cnn / "run", "."):
        assert_one_line_error(module("export", "--checkpoint", ckpt, "--format", "savedmodel", "--out", out),
                              "exists and is not an export")
    assert (ckpt / "meta.json").is_file()
    # the second from a copy that says it was trained on caffe inputs and crops (not the
    # defaults): the export carries what predict needs to feed it as it trained
    other = shutil.copytree(ckpt, tmp_path / "caffe")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(meta | {"scaling": "caffe", "crop": True}))
    for source in (ckpt, other):
        module("export", "--checkpoint", source, "--format", "savedmodel", "--out", tmp_path / "sm", check=True,
               timeout=300)
    exported = json.loads((tmp_path / "sm" / "meta.json").read_text())
    assert (exported["format"], exported["scaling"], exported["crop"]) == ("savedmodel", "caffe", True)


def test_a_full_disk_ends_an_export_with_one_line_and_leaves_nothing(trained_cnn, tmp_path):
    with small_disk(tmp_path / "disk", "100k") as disk:
        proc = module("export", "--checkpoint", trained_cnn / "run" / "checkpoints" / "best", "--format",
                      "savedmodel", "--out", disk / "exported", timeout=300)
        assert_one_line_error(proc, f"{disk / 'exported'}: cannot write the export: No space left on device")
        assert not list(disk.iterdir())  # its partial folder removed
