"""invpt-quantize: FP16 and INT8 files, Q/DQ placement, parity within stated tolerances, cache, errors."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from invpt.calib import load_calibration_data, run_quantize
from invpt.calib.cli import main as quantize_main
from invpt.calib.evaluate import PRECISION_TOLERANCES
from invpt.errors import ConfigError, InputError, ManifestError, VerificationError
from invpt.export.ort import ort_session
from invpt.manifest import Manifest, Preprocessing, sha256_file


# The session's shared artifacts (tests/conftest.py), read-only here: every quantization below writes to tmp_path.
@pytest.fixture
def fp32(pascal_onnx):
    return pascal_onnx


@pytest.fixture
def calib_dir(calib_images) -> Path:
    """Real photo crops in two strata (smaller than the 128x128 model, so the manifest's 'pad' mode applies)."""
    return calib_images


@pytest.fixture
def int8(pascal_int8):
    """Made with calib_samples=4, holdout_samples=2 and the default calibrator (entropy)."""
    return pascal_int8


@pytest.fixture
def fp16(pascal_fp16):
    return pascal_fp16


def _consumers_of_dq(path) -> Counter:
    g = onnx.load(str(path)).graph
    uses = {}
    for n in g.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    return Counter(c.op_type for n in g.node if n.op_type == "DequantizeLinear" for c in uses.get(n.output[0], []))


def test_int8_graph(int8):
    onnx.checker.check_model(str(int8.onnx_path), full_check=True)
    into = _consumers_of_dq(int8.onnx_path)
    assert into["Conv"] > 0 and into["MatMul"] > 0
    for op in ("LayerNormalization", "Softmax", "Resize"):
        assert into[op] == 0, op
    g = onnx.load(str(int8.onnx_path)).graph
    names = {n.name: n for n in g.node}
    # The attention-score MatMuls and the message-fusion conv stay unquantized.
    inits = {i.name for i in g.initializer}
    dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    score = names["multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn/MatMul"]
    assert not set(score.input) & dq_out
    fuse = names["multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn.fuse_attn/Conv"]
    assert not set(fuse.input) & dq_out
    # Per-channel weights: weight DQs carry an axis.
    q_of_weight = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
    w_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and (n.input[0] in inits or n.input[0] in q_of_weight)]
    assert w_dq and sum(any(a.name == "axis" for a in n.attribute) for n in w_dq) >= len(w_dq) // 2


def test_int8_weights_are_stored_as_int8(int8, fp32):
    """Weights are INT8 initializers read by DequantizeLinear (TensorRT's offline form), so the file shrinks."""
    g = onnx.load(str(int8.onnx_path)).graph
    inits = {i.name: i for i in g.initializer}
    w_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(w_dq) > 10 and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in w_dq)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in g.node)
    assert int8.onnx_path.stat().st_size < 0.5 * fp32.onnx_path.stat().st_size


def test_int8_parity_and_manifest(int8, fp32):
    assert int8.parity.passed and int8.parity.tolerance == PRECISION_TOLERANCES["int8"]
    assert int8.parity.reference == "pytorch-fp32"
    m = Manifest.load(int8.manifest_path)
    assert m.precision == "int8" and m.parent["sha256"] == fp32.manifest.sha256
    assert m.calibration["num_samples"] == 4 and m.calibration["method"] == "entropy"
    assert m.calibration["per_node"] is False  # a 20 MB model calibrates the whole graph at once
    assert len(m.calibration["sample_list_sha256"]) == 64
    held, used = m.verification["holdout_ids"], m.calibration["sample_ids"]
    assert len(held) == 2 and len(used) == 4 and set(held).isdisjoint(used)  # parity never on calibration images
    assert m.precision_policy["name"] == "default" and m.precision_policy["kept_node_counts"]["decoder.attention_scores"] > 0
    assert m.verification["task_agreement"]["semseg"]["miou_vs_reference"] > 0.5
    assert "mean_angle_deg" in m.verification["task_agreement"]["normals"]


def test_fp16_graph_and_parity(fp16):
    onnx.checker.check_model(str(fp16.onnx_path), full_check=True)
    sess = ort_session(fp16.onnx_path)
    assert all(i.type == "tensor(float)" for i in sess.get_inputs() + sess.get_outputs())  # I/O stays FP32
    g = onnx.load(str(fp16.onnx_path)).graph
    assert sum(n.op_type == "Cast" for n in g.node) > 0
    fp16_inits = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer)
    assert fp16_inits > 0
    assert fp16.parity.passed
    for t in fp16.parity.tasks.values():
        assert t.rel_err <= 1e-2
    kept = fp16.manifest.precision_policy["kept_node_counts"]
    assert kept["op.LayerNormalization"] == 18 and kept["op.Softmax"] == 7
    rule = fp16.manifest.precision_policy["graph"]["data_range_rule"]  # AutoCast's data-max rule, applied by invpt
    assert rule["data_max"] == 512 and isinstance(rule["kept_nodes"], list)


def test_keep_term_extends_policy(sensitivity_run, fp32, tmp_path):
    """--keep terms (here every block the sensitivity run does not sweep) join the policy's kept nodes."""
    res, others, _ = sensitivity_run
    policy = res.manifest.precision_policy
    assert list(policy["keep_terms"]) == ["backbone.attention_scores", "decoder.attention_scores", *others]
    assert policy["kept_node_counts"]["head.human_parts"] >= 2 and policy["kept_node_counts"]["backbone.block.3"] > 0
    assert any(n.startswith("heads.edge.") for n in policy["kept_nodes"])  # the nodes themselves are listed
    with pytest.raises(ConfigError, match="Unknown model term 'head.depth'"):
        run_quantize(fp32.onnx_path, "fp16", tmp_path / "k2.onnx", keep_terms=["head.depth"], verify=False)
    assert list(tmp_path.iterdir()) == []


def test_calibration_cache_reuse_and_invalidation(calib_dir, tmp_path):
    calib_dir = Path(shutil.copytree(calib_dir, tmp_path / "images"))  # this test edits an image
    prep = Preprocessing(size=(128, 128), mode="pad")
    cache = tmp_path / "cache"
    a = load_calibration_data(calib_dir, prep, 4, holdout=2, cache_dir=cache)
    assert not a.cache_hit and len(list(cache.glob("calib-*.npz"))) == 1
    b = load_calibration_data(calib_dir, prep, 4, holdout=2, cache_dir=cache)
    assert b.cache_hit and np.array_equal(a.calib, b.calib) and a.calib_ids == b.calib_ids
    assert set(a.calib_ids).isdisjoint(a.holdout_ids)
    assert {i.split("/")[0] for i in a.calib_ids} == {"a", "b"}  # stratified over sub-folders
    c = load_calibration_data(calib_dir, Preprocessing(size=(128, 128), mode="resize"), 4, holdout=2, cache_dir=cache)
    assert not c.cache_hit  # preprocessing changed
    victim = calib_dir / "a" / "crop0.png"
    img = cv2.imread(str(victim))
    cv2.imwrite(str(victim), 255 - img)  # data changed
    d = load_calibration_data(calib_dir, prep, 4, holdout=2, cache_dir=cache)
    touched = "a/crop0" in a.calib_ids + a.holdout_ids
    assert d.cache_hit is (not touched)


def test_calibration_errors(tmp_path, calib_dir):
    prep = Preprocessing(size=(128, 128), mode="pad")
    with pytest.raises(InputError, match="does not exist"):
        load_calibration_data(tmp_path / "missing", prep, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        load_calibration_data(tmp_path / "empty", prep, 4)
    with pytest.raises(InputError, match="were asked for"):
        load_calibration_data(calib_dir, prep, 50, holdout=2, cache_dir=tmp_path)
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for i in range(4):
        (bad / f"x{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="x"):
        load_calibration_data(bad, prep, 2, holdout=1, cache_dir=tmp_path)


def test_quantize_errors(tmp_path, fp32, calib_dir):
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(fp32.onnx_path.read_bytes())
    with pytest.raises(ManifestError, match="manifest"):
        run_quantize(bare, "fp16")
    assert quantize_main(["--onnx", str(bare), "--precision", "fp16"]) == 2
    assert quantize_main(["--onnx", str(fp32.onnx_path), "--precision", "int8", "--out", str(tmp_path / "x.onnx")]) == 2
    assert quantize_main(["--onnx", str(tmp_path / "nope.onnx"), "--precision", "fp16"]) == 2
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.json").exists()


def test_parity_failure_writes_nothing_unless_allowed(fp32, calib_dir, tmp_path, monkeypatch):
    from invpt.export.parity import Tolerance

    monkeypatch.setitem(PRECISION_TOLERANCES, "int8", Tolerance(max_rel_err=1e-9, min_cosine=1.0, min_agreement=1.0))
    out = tmp_path / "strict.int8.onnx"
    kw = dict(calib_data=calib_dir, calib_samples=2, holdout_samples=1, calib_method="max", cache_dir=tmp_path / "c")
    with pytest.raises(VerificationError, match="outside the stated tolerance") as err:
        run_quantize(fp32.onnx_path, "int8", out, **kw)
    assert err.value.exit_code == 3  # what invpt-quantize exits with
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # nor any staging folder
    # --allow-mismatch writes the model, records the failure, and still exits 3
    import invpt.calib.pipeline as pipeline

    results, real_quantize = [], pipeline.quantize
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: results.append(real_quantize(*a, **k)) or results[-1])
    argv = ["--onnx", str(fp32.onnx_path), "--precision", "int8", "--out", str(out), "--calib-data", str(calib_dir),
            "--calib-samples", "2", "--holdout-samples", "1", "--calib-method", "max", "--cache-dir", str(tmp_path / "c"),
            "--allow-mismatch"]
    assert quantize_main(argv) == 3 and out.exists()
    (res,) = results
    man = Manifest.load(res.manifest_path)
    assert res.onnx_path == out and not res.parity.passed
    assert man.verification["passed"] is False and man.sha256 == sha256_file(out)
    assert {"data_s", "reference_s", "calibrate_s", "parity_s"} <= set(res.timings)
    recorded = man.timings  # the same phase timer, in the manifest (bench reads it)
    assert recorded["seconds"] == res.timings and recorded["total_s"] > 0
    assert all(v > 0 for v in recorded["peak_rss_bytes"].values())


def test_dynamic_batch_model_calibrates_in_one_step(pascal_dynamic_onnx, calib_dir, tmp_path, caplog):
    """A --dynamic-batch export takes all samples in one calibration step and stays dynamic after quantization."""
    with caplog.at_level("INFO", logger="invpt.calib"):
        res = run_quantize(pascal_dynamic_onnx.onnx_path, "int8", tmp_path / "d.int8.onnx", calib_data=calib_dir,
                           calib_samples=4, holdout_samples=3, calib_method="max", cache_dir=tmp_path / "c")
    assert "4 sample(s) in 1 step(s) of batch 4" in caplog.text
    assert res.parity.passed and res.parity.samples == 3
    assert ort_session(res.onnx_path).get_inputs()[0].shape[0] != 1


def test_percentile(fp32, calib_dir, tmp_path):
    res = run_quantize(fp32.onnx_path, "int8", tmp_path / "p.int8.onnx", calib_data=calib_dir, calib_samples=4,
                       holdout_samples=2, calib_method="percentile", cache_dir=tmp_path / "c")
    assert res.parity.passed and res.manifest.calibration["tool"] == "onnxruntime quantize_static"
    into = _consumers_of_dq(res.onnx_path)
    assert into["Conv"] > 0 and all(into[op] == 0 for op in ("LayerNormalization", "Softmax", "Resize"))


# The sweep runs on three blocks; every other block is kept in high precision (--keep), which the sweep skips, so the
# search and the final model see exactly the swept blocks: the full sweep's code path at a fifth of its cost.
SWEPT = ("backbone.block.0", "decoder.stage2", "head.normals")


@pytest.fixture(scope="module")
def sensitivity_run(pascal_onnx, calib_images, tmp_path_factory):
    """One INT8 run with --sensitivity and a semseg budget, every block but SWEPT kept by --keep:
    (QuantizeResult, the kept block terms, the output folder)."""
    from invpt.calib.policy import block_terms

    cfg = pascal_onnx.manifest.model_config
    others = [b for b in block_terms(cfg.tasks, cfg.backbone.depth) if b not in SWEPT]
    d = tmp_path_factory.mktemp("sensitivity")
    res = run_quantize(pascal_onnx.onnx_path, "int8", d / "s.int8.onnx", calib_data=calib_images, calib_samples=4,
                       holdout_samples=2, calib_method="max", cache_dir=d / "c", sensitivity=True,
                       budgets={"semseg": 0.02}, keep_terms=others)
    return res, others, d


def test_sensitivity_and_budget_search(sensitivity_run, fp32):
    from invpt.calib.sensitivity import greedy_keep

    res, others, folder = sensitivity_run
    cfg = fp32.manifest.model_config
    assert res.parity.passed
    rep = json.loads((folder / "m.int8.sensitivity.json").read_text())
    assert rep == res.sensitivity
    assert (folder / "m.int8.sensitivity.png").stat().st_size > 1000
    assert "| decoder.stage2 |" in (folder / "m.int8.sensitivity.md").read_text()
    assert set(rep["per_block"]) == set(SWEPT) and rep["failed_blocks"] == {}  # blocks kept by --keep are not swept
    # The ranges were measured once for the sweep (one pass over the samples), not once per quantized model.
    assert rep["ranges"]["sessions"] == 1 and rep["ranges"]["tensors_reused"] >= rep["ranges"]["tensors_measured"] > 0
    for block in SWEPT:
        assert set(rep["per_block"][block]) == set(cfg.tasks)
    # A head only moves its own task.
    assert rep["per_block"]["head.normals"]["semseg"]["rel_l2"] < 1e-5  # float noise at most
    assert rep["per_block"]["head.normals"]["normals"]["rel_l2"] > 1e-3
    assert all(v["rel_l2"] > 1e-5 for v in rep["per_block"]["backbone.block.0"].values())  # the shared backbone: all
    # The search is the greedy rule applied to the measured sweep, and the model it chose meets the budgets.
    budgets = rep["search"]["budgets"]
    assert budgets["semseg"] == 0.02 and budgets["normals"] == 0.05
    assert rep["search"]["keep_blocks"] == greedy_keep(rep["per_block"], budgets)
    assert rep["search"]["measured"]["semseg"]["rel_l2"] <= 0.02
    kept = res.manifest.precision_policy["keep_terms"]
    assert set(rep["search"]["keep_blocks"]) <= set(kept) and set(others) <= set(kept)


def _sweep(**per_block: dict[str, float]) -> dict:
    return {b: {t: {"rel_l2": v} for t, v in errs.items()} for b, errs in per_block.items()}


def test_greedy_keep_fits_every_budget_most_damaging_first():
    """The budget search on a sweep built in code: blocks are kept, the most damaging (relative to the budgets of the
    tasks still over) first, until every task's summed single-block error fits."""
    from invpt.calib.sensitivity import greedy_keep

    sweep = _sweep(a={"s": 0.010, "n": 0.001}, b={"s": 0.030, "n": 0.002}, c={"s": 0.001, "n": 0.040},
                   d={"s": 0.005, "n": 0.005})
    assert greedy_keep(sweep, {"s": 1.0, "n": 1.0}) == []  # everything fits: nothing kept
    assert greedy_keep(sweep, {"s": 0.02, "n": 1.0}) == ["b"]  # 0.046 -> 0.016
    assert greedy_keep(sweep, {"s": 0.02, "n": 0.01}) == ["c", "b"]  # c is 4x the n budget; then s is over alone
    assert greedy_keep(sweep, {"s": 0.012, "n": 1.0}) == ["b", "a"]  # 0.016 still over: the next worst for s
    assert greedy_keep(sweep, {"s": 1e-9, "n": 1e-9}) == ["c", "b", "a", "d"]  # impossible: every block, then stop
    # Only tasks over budget steer the choice: c hurts n most but n is within its budget.
    assert greedy_keep(sweep, {"s": 0.03, "n": 0.05}) == ["b"]
    assert greedy_keep({}, {"s": 1e-9}) == []


NODES = [("backbone.patch_embed.proj/Conv", "Conv"), ("backbone.blocks.0.attn/MatMul", "MatMul"),
         ("backbone.blocks.0.attn/Softmax", "Softmax"), ("backbone.blocks.0.mlp.fc1/MatMul", "MatMul"),
         ("backbone.blocks.1.norm1/LayerNormalization", "LayerNormalization"),
         ("multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn/MatMul", "MatMul"),
         ("multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn.fuse_attn/Conv", "Conv"),
         ("multi_task_decoder.invpt.invpt_stages.2.blocks.0.mlp/MatMul", "MatMul"),
         ("multi_task_decoder.invpt.mt_proj.normals.0/Conv", "Conv"), ("heads.normals.linear_pred/Conv", "Conv"),
         ("heads.semseg.linear_pred/Conv", "Conv"), ("/Resize", "Resize")]


def test_policy_terms_resolve_to_node_names():
    """Model terms (globs and op.<Type> included) against a node list built in code: no graph, no file."""
    from invpt.calib.policy import quantizable_nodes, resolve_terms

    got = resolve_terms(["head.*", "backbone.block.0", "op.Resize", "decoder.attention_scores"], NODES,
                        ["semseg", "normals"], depth=2)
    assert got["head.normals"] == ["multi_task_decoder.invpt.mt_proj.normals.0/Conv", "heads.normals.linear_pred/Conv"]
    assert got["head.semseg"] == ["heads.semseg.linear_pred/Conv"]
    assert got["backbone.block.0"] == ["backbone.blocks.0.attn/MatMul", "backbone.blocks.0.attn/Softmax",
                                       "backbone.blocks.0.mlp.fc1/MatMul"]
    assert got["op.Resize"] == ["/Resize"]
    assert got["decoder.attention_scores"] == ["multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn/MatMul",
                                               "multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn.fuse_attn/Conv"]
    # decoder.stage2's MLP is not an attention-score node; block 1 has no quantizable node here
    kept = {n for names in got.values() for n in names}
    assert quantizable_nodes(NODES, kept) == ["backbone.patch_embed.proj/Conv",
                                              "multi_task_decoder.invpt.invpt_stages.2.blocks.0.mlp/MatMul"]
    assert resolve_terms(["op.Gemm"], NODES, ["semseg"], 2) == {"op.Gemm": []}
    for bad in ("head.depth", "backbone.block.2", "decoder"):  # a task the model lacks, a block past its depth
        with pytest.raises(ConfigError, match=f"Unknown model term '{bad}'"):
            resolve_terms([bad], NODES, ["semseg", "normals"], depth=2)


def test_static_batch_model_is_fed_in_its_batch(nyud_b2_onnx):
    """A batch-2 export gets 3 held-out samples: two chunks, the last padded, 3 results back."""
    from invpt.calib.evaluate import run_onnx_batches

    res = nyud_b2_onnx
    x = np.random.default_rng(0).standard_normal((3, 3, 128, 192), dtype=np.float32)
    out = run_onnx_batches(res.onnx_path, x, ["semseg", "depth"])
    assert out["semseg"].shape == (3, 40, 128, 192)
    single = run_onnx_batches(res.onnx_path, x[2:3], ["depth"])["depth"]
    np.testing.assert_allclose(out["depth"][2:3], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_static_batch_2_model_calibrates_in_its_batch(nyud_b2_onnx, calib_dir, tmp_path, method):
    """Both calibrators feed a batch-2 export two samples a step; an odd sample count is refused by name."""
    res = nyud_b2_onnx
    q = run_quantize(res.onnx_path, "int8", tmp_path / "b2.int8.onnx", calib_data=calib_dir, calib_samples=4,
                     holdout_samples=2, calib_method=method, cache_dir=tmp_path / "c")
    assert q.parity.passed and ort_session(q.onnx_path).get_inputs()[0].shape[0] == 2
    with pytest.raises(InputError, match="multiple of 2"):
        run_quantize(res.onnx_path, "int8", tmp_path / "odd.onnx", calib_data=calib_dir, calib_samples=3,
                     holdout_samples=2, calib_method=method, cache_dir=tmp_path / "c")
    assert not (tmp_path / "odd.onnx").exists()


def test_split_selects_the_split_file(tmp_path):
    """Sampling from a PASCAL-Context root honours --split: train ids only, never val ids."""
    root = tmp_path / "PASCALContext"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Context").mkdir(parents=True)
    ids = {"train": [f"2008_{i:06d}" for i in range(6)], "val": [f"2010_{i:06d}" for i in range(6)]}
    for split, names in ids.items():
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for n in names:
            cv2.imwrite(str(root / "JPEGImages" / f"{n}.jpg"), np.full((64, 80, 3), 128, np.uint8))
    prep = Preprocessing(size=(128, 128), mode="pad")
    data = load_calibration_data(root, prep, 3, holdout=1, cache_dir=tmp_path / "c", split="train")
    assert set(data.calib_ids + data.holdout_ids) <= set(ids["train"])
    assert data.provenance["split"] == "train" and data.provenance["source_kind"] == "PascalContextReader"
    val = load_calibration_data(root, prep, 3, holdout=1, cache_dir=tmp_path / "c", split="val")
    assert not val.cache_hit and set(val.calib_ids) <= set(ids["val"])


def _identity_onnx(path: Path, batch) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 3, 8, 8])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "g", [x], [y])), path)
    return path


def test_calibration_batch(tmp_path):
    """Static models are fed in their batch; dynamic ones in equal steps of up to MAX_CALIBRATION_BATCH."""
    from invpt.calib.int8 import MAX_CALIBRATION_BATCH, calibration_batch, quantize_int8

    static1, static2 = _identity_onnx(tmp_path / "s1.onnx", 1), _identity_onnx(tmp_path / "s2.onnx", 2)
    dynamic = _identity_onnx(tmp_path / "d.onnx", "batch")
    assert calibration_batch(static1, 8) == (1, False)
    assert calibration_batch(static2, 8) == (2, False)
    assert calibration_batch(dynamic, 8) == (8, True)
    assert calibration_batch(dynamic, 7) == (7, True)
    assert calibration_batch(dynamic, 40) == (10, True) and MAX_CALIBRATION_BATCH == 16
    assert calibration_batch(dynamic, 17) == (1, True)  # prime above the cap: one sample a step
    with pytest.raises(InputError, match="multiple of 2"):
        quantize_int8(static2, tmp_path / "q.onnx", np.zeros((3, 3, 8, 8), np.float32), "max", [])
    assert not (tmp_path / "q.onnx").exists()


def test_calibrates_per_node_by_size_unless_told(tmp_path, monkeypatch):
    """Node-by-node calibration is automatic above the size threshold; the CLI flag overrides it either way."""
    from invpt.calib import int8 as int8_mod
    from invpt.calib.cli import build_parser

    model = _identity_onnx(tmp_path / "s1.onnx", 1)
    assert int8_mod.calibrates_per_node(model) is False
    monkeypatch.setattr(int8_mod, "PER_NODE_CALIBRATION_BYTES", model.stat().st_size - 1)
    assert int8_mod.calibrates_per_node(model) is True
    assert int8_mod.calibrates_per_node(model, False) is False
    assert int8_mod.calibrates_per_node(model, True) is True
    base = ["--onnx", str(model), "--precision", "int8"]
    assert build_parser().parse_args(base).calibrate_per_node is None
    assert build_parser().parse_args(base + ["--no-calibrate-per-node"]).calibrate_per_node is False
    assert build_parser().parse_args(base + ["--calibrate-per-node"]).calibrate_per_node is True


def test_every_cli_flag_reaches_the_stage_options(fp32, tmp_path, monkeypatch):
    """The CLI parses into QuantizeOptions and nothing is dropped: --dataset and --video-step (unreachable before)
    arrive at the calibration reader."""
    import invpt.calib.pipeline as pipeline
    from invpt.calib.cli import build_parser, options_from_args

    argv = ["--onnx", str(fp32.onnx_path), "--precision", "int8", "--out", str(tmp_path / "o.onnx"),
            "--calib-data", str(tmp_path), "--calib-samples", "5", "--holdout-samples", "2", "--calib-method", "max",
            "--no-calibrate-per-node", "--dataset", "video", "--split", "train", "--video-step", "3", "--seed", "7",
            "--cache-dir", str(tmp_path / "c"), "--keep", "head.normals", "--policy", "backbone-only",
            "--no-verify", "--allow-mismatch", "--budget", "semseg=0.1"]
    opts = options_from_args(build_parser().parse_args(argv))
    assert (opts.calib_samples, opts.holdout_samples, opts.calib_method, opts.calibrate_per_node) == (5, 2, "max", False)
    assert (opts.dataset, opts.split, opts.video_step, opts.seed) == ("video", "train", 3, 7)
    assert opts.keep_terms == ("head.normals",) and opts.policy == "backbone-only" and opts.budgets == (("semseg", 0.1),)
    assert opts.verify is False and opts.allow_mismatch is True and opts.command.startswith("invpt-quantize")
    seen = {}

    def fake_load(path, prep, n, holdout, seed, cache_dir, dataset, split, calibrating, video_step):
        seen.update(dataset=dataset, split=split, video_step=video_step, n=n, seed=seed)
        raise InputError("stop here")

    monkeypatch.setattr(pipeline, "load_calibration_data", fake_load)
    assert quantize_main(argv) == 2
    assert seen == {"dataset": "video", "split": "train", "video_step": 3, "n": 5, "seed": 7}


def test_bad_video_step_is_refused_before_any_work(fp32, tmp_path):
    out = tmp_path / "o.onnx"
    assert quantize_main(["--onnx", str(fp32.onnx_path), "--precision", "fp16", "--video-step", "0",
                          "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("budget, fragment", [
    ("semseg=0", "a finite number > 0"), ("semseg=-0.1", "a finite number > 0"), ("semseg=nan", "a finite number > 0"),
    ("depth=0.05", "does not predict"),
])
def test_bad_budgets_are_refused_before_any_work(pascal_onnx, calib_images, tmp_path, budget, fragment, monkeypatch):
    """--budget semseg=0 used to crash (ZeroDivisionError) after the whole sweep; now exit 2 before any model work."""
    import invpt.calib.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_held_out", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(InputError, match=fragment):
        run_quantize(pascal_onnx.onnx_path, "int8", tmp_path / "q.onnx", calib_data=calib_images, sensitivity=True,
                     budgets={budget.split("=")[0]: float(budget.split("=")[1])})
    assert not (tmp_path / "q.onnx").exists()
