"""The `qcompile` command line, run as a user runs it (through `main(argv)`)."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.cli import main
from qcompile.core.formats import FORMATS


def _qdq_matmul(zero_point: int = 0) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul with an int8 weight DQ (per output channel)."""
    inits = [
        numpy_helper.from_array(np.arange(-6, 6, dtype=np.int8).reshape(4, 3), "w"),
        numpy_helper.from_array(np.array([0.5, 0.25, 0.125], np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(zero_point, np.int8), "zp"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"], axis=1),
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x_dq"]),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_formats_lists_every_format(capsys):
    assert main(["formats"]) == 0
    printed = capsys.readouterr().out
    for name, fmt in FORMATS.items():
        assert name in printed and fmt.element.name in printed


def test_inspect_reports_counts_and_strict_fails_on_a_rule(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_qdq_matmul(), good)
    onnx.save(_qdq_matmul(zero_point=3), bad)
    assert main(["inspect", str(good), "--strict"]) == 0
    printed = capsys.readouterr().out
    assert "opset 21" in printed and "0 warning(s)" in printed
    assert main(["inspect", str(bad)]) == 0
    assert main(["inspect", str(bad), "--strict"]) == 1
    assert "[zero-point]" in capsys.readouterr().out


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["bogus"])


@pytest.mark.slow
def test_demo_runs_the_pipeline_on_the_real_minilm(tmp_path, capsys):
    assert main(["demo", "--calibration-texts", "32", "--eval-texts", "64", "--qad-steps", "2",
                 "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    # the table: one row per stage, its figures as results.json records them
    assert "stage" in printed and "mean cos" in printed
    for stage, figures in results.items():
        if stage != "onnx":
            assert f"{stage:16} {figures['mean_cosine']:9.4f}" in printed, stage
    assert set(results) == {"nvfp4 PTQ", "nvfp4 GPTQ", "nvfp4 QAD", "onnx"}
    assert 0.9 < results["nvfp4 PTQ"]["mean_cosine"] <= 1.0
    assert results["nvfp4 GPTQ"]["mean_cosine"] > results["nvfp4 PTQ"]["mean_cosine"]
    # The exported standard-ONNX model, run by onnx.reference, computes what PyTorch computes.
    assert results["onnx"]["parity_max_diff"] < 1e-4
    # Float MiniLM is ~90 MB, 47 MB of it the (unquantized) embedding table; 4-bit Linears
    # shrink the other ~43 MB to ~6 MB.
    assert (tmp_path / "model.onnx").stat().st_size < 60e6
    assert (tmp_path / "fidelity.png").stat().st_size > 1000
    assert "quantized" in (tmp_path / "report.txt").read_text()
