"""The manifest: round trip (build section included), refusal of unknown schema versions, collision-free names."""
from __future__ import annotations

import json
import re

import pytest

from invpt.config import load_config
from invpt.errors import ManifestError
from invpt.manifest import SCHEMA_VERSION, Manifest, Preprocessing, io_for_config, manifest_path_for


def _manifest(**kw) -> Manifest:
    cfg = load_config("tiny_pascal")
    inputs, outputs = io_for_config(cfg, "batch")
    return Manifest(artifact="m.fp16.plan", kind="engine", precision="fp16", config=cfg.to_dict(), inputs=inputs,
                    outputs=outputs, preprocessing=Preprocessing(size=tuple(cfg.image_size)), **kw)


def test_round_trip_keeps_every_section(tmp_path):
    m = _manifest(build={"backend": "tensorrt_rtx", "profile_shapes": {"image": {"min": [1, 3, 128, 128]}}},
                  verification={"passed": True})
    path = m.save(tmp_path / "m.fp16.plan.json")
    back = Manifest.load(path)
    assert back == m and back.build["backend"] == "tensorrt_rtx" and back.inputs[0].shape[0] == "batch"


@pytest.mark.parametrize("content, fragment", [
    ("[]", "a JSON list, not an object"),  # was an AttributeError traceback (exit 1) in every command
    ("null", "a JSON NoneType, not an object"),
    ("config", "malformed field 'config'"),  # was "'x' is neither a config file nor a preset name", no file named
])
def test_a_manifest_of_the_wrong_shape_is_a_manifest_error_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "m.json"
    if content == "config":
        d = _manifest().to_dict()
        d["config"] = "x"
        path.write_text(json.dumps(d))
    else:
        path.write_text(content)
    with pytest.raises(ManifestError, match=re.escape(fragment)) as err:
        Manifest.load(path)
    assert f"Manifest '{path}'" in str(err.value)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, None, "1"])
def test_unknown_schema_version_is_refused(tmp_path, version):
    d = _manifest().to_dict()
    d["schema_version"] = version
    path = tmp_path / "m.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="schema_version"):
        Manifest.load(path)


def test_foreign_json_is_not_a_manifest(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ManifestError, match="not an invpt manifest"):
        Manifest.load(path)


def test_manifest_names_never_collide_across_kinds():
    names = ["m.onnx", "m.fp16.onnx", "m.int8.onnx", "m.plan", "m.fp16.plan", "m.int8.plan", "m.engine"]
    manifests = [manifest_path_for(n).name for n in names]
    assert len(set(manifests)) == len(names), manifests
    assert manifest_path_for("m.onnx").name == "m.json" and manifest_path_for("m.fp16.plan").name == "m.fp16.plan.json"


def test_sections_are_typed_and_round_trip(tmp_path):
    from invpt.manifest import BuildSection, CalibrationSection, ExportSection, VerificationSection

    m = _manifest(export={"exporter": "torch.onnx (dynamo)", "opset": 18, "batch": "dynamic", "tasks": ["semseg"]},
                  calibration={"method": "entropy", "sample_ids": ["a", "b"], "seed": 0, "future_key": {"x": 1}},
                  verification={"passed": False, "samples": 2},
                  build={"backend": "tensorrt_rtx", "timings_s": {"build_s": 1.5}})
    assert isinstance(m.export, ExportSection) and m.export.opset == 18 and m.export.tasks == ("semseg",)
    assert isinstance(m.calibration, CalibrationSection) and m.calibration.sample_ids == ("a", "b")
    assert isinstance(m.verification, VerificationSection) and m.verification.passed is False
    assert isinstance(m.build, BuildSection) and m.build.timings_s == {"build_s": 1.5}
    # a key this invpt does not know (written by a newer one of the same schema version) survives a round trip
    assert m.calibration.extra == {"future_key": {"x": 1}}
    back = Manifest.load(m.save(tmp_path / "m.fp16.plan.json"))
    assert back == m
    d = json.loads((tmp_path / "m.fp16.plan.json").read_text())
    assert d["calibration"] == {"method": "entropy", "sample_ids": ["a", "b"], "seed": 0, "future_key": {"x": 1}}
    assert d["verification"] == {"passed": False, "samples": 2}  # only what was set is written
    # the JSON view: a section reads like the dict in the file
    assert m.calibration["sample_ids"] == ["a", "b"] and m.build.get("backend") == "tensorrt_rtx"
    assert dict(m.verification) == {"passed": False, "samples": 2}
    assert _manifest().to_dict()["export"] == {} and _manifest().to_dict()["build"] is None


@pytest.mark.parametrize("section, value, fragment", [
    ("verification", {"passed": "yes"}, "'verification' field 'passed' must be true or false"),
    ("export", {"opset": "18"}, "'export' field 'opset' must be an integer"),
    ("calibration", {"sample_ids": "a,b"}, "'calibration' field 'sample_ids' must be a list"),
    ("build", {"profile_shapes": [1, 2]}, "'build' field 'profile_shapes' must be an object"),
    ("build", "tensorrt", "section 'build' must be an object"),
])
def test_a_malformed_section_is_refused_naming_it(tmp_path, section, value, fragment):
    d = _manifest().to_dict()
    d[section] = value
    path = tmp_path / "m.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=fragment) as info:
        Manifest.load(path)
    assert str(path) in str(info.value)
