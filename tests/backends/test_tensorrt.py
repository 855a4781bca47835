"""build_engine / run_engine / `qcompile build` against a fake `tensorrt` module, and for real.

The fake (fake_tensorrt.py) records every call and refuses what TensorRT 10 refuses (a dynamic
input without an optimization profile, precision flags on a strongly typed network), so a
wrong flag or a missing profile fails here. The tests marked `tensorrt` build real int8 / fp8
(/ nvfp4 on SM100+) engines from a prepared, calibrated and exported MLP and compare them with
the prepared PyTorch model; they skip without TensorRT or a CUDA GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import numpy as np
import onnx
import pytest
import torch
from fake_tensorrt import BuilderFlag, FakeTensorRT, MemoryPoolType, ParserError
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qcompile as qc
import qcompile.backends.tensorrt
from qcompile.backends.tensorrt import engine as trt_backend
from qcompile.backends.onnx.rules import inspect_onnx
from qcompile.backends.tensorrt.engine import (
    EngineBuildError,
    TensorRTNotInstalledError,
    build_engine,
    failing_layer,
    run_engine,
    trtexec_command,
)
from qcompile.backends.tensorrt.formats import (
    UnsupportedGPUError,
    check_gpu_supports,
    formats_in_onnx,
    generation,
    supported_formats,
)
from qcompile.cli import main, parse_shape

STRONGLY_TYPED = 1 << 1  # 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
SHAPES = {"x": ((1, 4), (8, 4), (64, 4))}


@pytest.fixture
def fake_trt(monkeypatch) -> FakeTensorRT:
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "_device_capability", lambda: None)  # no GPU check
    return fake


@pytest.fixture
def no_trt(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def _graph(path, *, batch: int | str = "batch", quantized: bool = True, zero_point: int = 0) -> str:
    """x[batch, 4] -> (Q/DQ int8) -> MatMul with an int8 weight DQ (or a float weight)."""
    weight = np.arange(-6, 6, dtype=np.int8).reshape(4, 3)
    if quantized:
        inits = [numpy_helper.from_array(weight, "w"),
                 numpy_helper.from_array(np.array([0.5, 0.25, 0.125], np.float32), "w_scale"),
                 numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                 numpy_helper.from_array(np.array(zero_point, np.int8), "zp")]
        nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"], axis=1, name="w_dq"),
                 helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="x_q"),
                 helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x_dq"], name="x_dq"),
                 helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="/fc1/MatMul")]
    else:
        inits = [numpy_helper.from_array(weight.astype(np.float32), "w_dq")]
        nodes = [helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="/fc1/MatMul")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


# --- the exported graphs (what can be checked without TensorRT) ------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """recipe -> (prepared and calibrated model, exported ONNX path), each built once."""
    cache = {}

    def get(recipe: str):
        if recipe not in cache:
            torch.manual_seed(0)
            x = torch.randn(4, 64)
            model = qc.prepare(MLP().eval(), recipe, example_inputs=(x,))
            qc.calibrate(model, [(torch.randn(8, 64),) for _ in range(2)], progress=False)
            path = tmp_path_factory.mktemp(recipe) / "model.onnx"
            qc.export_onnx(model.eval(), (x,), path)
            cache[recipe] = model, str(path)
        return cache[recipe]

    return get


@pytest.mark.parametrize("recipe", ["int8", "fp8", "nvfp4"])
def test_exported_graph_passes_checker_and_rules_and_names_its_format(exported, recipe):
    _, path = exported(recipe)
    onnx.checker.check_model(path)
    report = inspect_onnx(path)
    assert report.warnings == [], report.render()
    model = onnx.load(path)
    assert formats_in_onnx(model) == {recipe}
    assert trt_backend.onnx_input_shapes(model) == {"x": ["batch", 64]}


def test_gpu_generations_and_formats():
    assert generation((7, 5)) == "Turing" and generation((8, 6)) == "Ampere"
    assert generation((8, 9)) == "Ada" and generation((9, 0)) == "Hopper"
    assert generation((10, 0)) == generation((12, 0)) == "Blackwell"
    assert supported_formats((7, 5)) == ["int8"]
    assert set(supported_formats((9, 0))) == {"int8", "int4", "fp8"}
    assert set(supported_formats((10, 0))) == {"int8", "int4", "fp8", "nvfp4", "mxfp8"}
    check_gpu_supports({"int8"}, (7, 5))
    check_gpu_supports({"fp8", "int8"}, (8, 9))
    with pytest.raises(UnsupportedGPUError, match=r"fp8 needs compute capability 8\.9\+ \(Ada"):
        check_gpu_supports({"fp8"}, (8, 0))


def test_nvfp4_engine_is_refused_before_building_on_hopper(fake_trt, exported, monkeypatch, tmp_path):
    _, path = exported("nvfp4")
    monkeypatch.setattr(trt_backend, "_device_capability", lambda: (9, 0))
    with pytest.raises(UnsupportedGPUError, match=r"nvfp4 needs compute capability 10\.0\+ "
                                                  r"\(Blackwell or newer\).*9\.0 \(Hopper\)"):
        build_engine(path, tmp_path / "m.engine", shapes={"x": ((1, 64), (4, 64), (8, 64))})
    assert fake_trt.called("Builder") == []


# --- build_engine against the fake ---------------------------------------------------------------


def test_static_graph_builds_strongly_typed_with_workspace_and_no_precision_flag(fake_trt, tmp_path):
    onnx_path = _graph(tmp_path / "m.onnx", batch=2)
    engine = build_engine(onnx_path, tmp_path / "out" / "m.engine", workspace_gb=2.5)
    assert engine.read_bytes() == b"fake-engine"
    assert fake_trt.called("create_network") == [(STRONGLY_TYPED,)]
    assert fake_trt.called("parse_from_file") == [(onnx_path,)]
    assert fake_trt.called("set_memory_pool_limit") == [(MemoryPoolType.WORKSPACE, int(2.5 * 2**30))]
    assert fake_trt.called("set_flag") == []  # precision comes from the Q/DQ graph
    assert fake_trt.called("add_optimization_profile") == []  # nothing dynamic
    assert fake_trt.called("create_timing_cache") == []
    (network, config), = fake_trt.called("build_serialized_network")
    assert type(config.progress_monitor).__name__ == "TqdmProgressMonitor"


def test_dynamic_input_gets_one_profile_with_the_given_shapes(fake_trt, tmp_path):
    onnx_path = _graph(tmp_path / "m.onnx")
    build_engine(onnx_path, tmp_path / "m.engine", shapes=SHAPES, progress=False)
    assert fake_trt.called("set_shape") == [("x", (1, 4), (8, 4), (64, 4))]
    assert len(fake_trt.called("add_optimization_profile")) == 1
    (network, config), = fake_trt.called("build_serialized_network")
    assert config.progress_monitor is None


def test_dynamic_input_without_shapes_names_the_input_before_building(fake_trt, tmp_path):
    onnx_path = _graph(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"input 'x' has dynamic dimensions \['batch', 4\]; "
                                         r"pass its \(min, opt, max\) shapes, e\.g\. shapes="):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert fake_trt.called("Builder") == []


@pytest.mark.parametrize(("shapes", "match"), [
    ({"y": SHAPES["x"]}, r"names \['y'\], which are not inputs.*\['x'\]"),
    ({"x": ((1, 4), (8, 4))}, r"must be \(min, opt, max\)"),
    ({"x": ((1, 5), (8, 4), (64, 4))}, r"axis 1 is fixed to 4"),
    ({"x": ((1, 4, 1), (8, 4), (64, 4))}, r"has rank 3"),
    ({"x": ((8, 4), (1, 4), (64, 4))}, r"min <= opt <= max"),
])
def test_bad_shapes_are_refused(fake_trt, tmp_path, shapes, match):
    with pytest.raises(ValueError, match=match):
        build_engine(_graph(tmp_path / "m.onnx"), tmp_path / "m.engine", shapes=shapes)


def test_fake_refuses_a_missing_profile_and_precision_flags(fake_trt, tmp_path, monkeypatch):
    """The safety net: were build_engine to skip the profile or set INT8, the fake would fail."""
    monkeypatch.setattr(trt_backend, "profile_shapes", lambda inputs, shapes: {})
    with pytest.raises(EngineBuildError, match="no optimization profile has been defined for input x"):
        build_engine(_graph(tmp_path / "m.onnx"), tmp_path / "m.engine", progress=False)
    monkeypatch.setattr(trt_backend, "PRECISIONS", {None: None, "int8": "INT8"})
    monkeypatch.setattr(trt_backend, "_network_flags", lambda trt, precision: STRONGLY_TYPED)
    monkeypatch.setattr(trt_backend, "formats_in_onnx", lambda graph: set())
    with pytest.raises(EngineBuildError, match=r"precision flags \['INT8'\] are not allowed"):
        build_engine(_graph(tmp_path / "s.onnx", batch=2), tmp_path / "s.engine",
                     precision="int8", progress=False)


def test_parser_error_names_the_node(fake_trt, tmp_path):
    fake_trt.parser_errors = [ParserError("Assertion failed: scale must be positive", node=3,
                                          node_name="/fc1/MatMul", node_operator="MatMul"),
                              ParserError("graph has no outputs")]
    onnx_path = _graph(tmp_path / "m.onnx", batch=2)
    with pytest.raises(EngineBuildError) as caught:
        build_engine(onnx_path, tmp_path / "m.engine")
    message = str(caught.value)
    assert "node '/fc1/MatMul' (MatMul): Assertion failed: scale must be positive" in message
    assert "graph: graph has no outputs" in message and "qcompile inspect" in message
    assert not (tmp_path / "m.engine").exists()


def test_build_failure_names_the_layer_from_the_logger(fake_trt, tmp_path, capsys):
    fake_trt.build_errors = ["IBuilder::buildSerializedNetwork: Error Code 10: Internal Error "
                             "(Could not find any implementation for node /fc1/MatMul.)"]
    onnx_path = _graph(tmp_path / "m.onnx", batch=2)
    with pytest.raises(EngineBuildError, match=r"at layer '/fc1/MatMul':\n  IBuilder::"):
        build_engine(onnx_path, tmp_path / "m.engine", progress=False)
    assert "[TensorRT] ERROR: IBuilder" in capsys.readouterr().err  # printed at log_level warning
    fake_trt.build_errors = ["Error Code 2: Internal Error (out of memory)"]
    with pytest.raises(EngineBuildError) as caught:
        build_engine(onnx_path, tmp_path / "m.engine", progress=False, log_level="error")
    assert "out of memory" in str(caught.value) and "/fc1/MatMul" not in str(caught.value)
    # TensorRT keeps one logger pointer per process: every builder gets the same logger.
    (first,), (second,) = fake_trt.called("Builder")
    assert first is second


def test_failing_layer_reads_tensorrt_messages():
    assert failing_layer(["Could not find any implementation for node {ForeignNode[/a...b]}."]) \
        == "{ForeignNode[/a...b]}"
    assert failing_layer(["[layer.cpp::validate] Error: layer '/fc2/Gemm' input mismatch",
                          "unrelated"]) == "/fc2/Gemm"
    assert failing_layer(["out of memory"]) is None


def test_timing_cache_is_loaded_and_saved(fake_trt, tmp_path):
    onnx_path, cache = _graph(tmp_path / "m.onnx", batch=2), tmp_path / "cache" / "timing.cache"
    build_engine(onnx_path, tmp_path / "m.engine", timing_cache=cache, progress=False)
    assert cache.read_bytes() == b"cache:"
    build_engine(onnx_path, tmp_path / "m.engine", timing_cache=cache, progress=False)
    assert fake_trt.called("create_timing_cache") == [(b"",), (b"cache:",)]
    assert [ignore for _, ignore in fake_trt.called("set_timing_cache")] == [True, True]


def test_precision_is_validated(fake_trt, tmp_path):
    quantized, plain = _graph(tmp_path / "q.onnx", batch=2), _graph(tmp_path / "f.onnx", batch=2,
                                                                    quantized=False)
    with pytest.raises(ValueError, match=r"precision must be one of None, 'fp16', 'bf16', got 'int8'"):
        build_engine(quantized, tmp_path / "m.engine", precision="int8")
    with pytest.raises(ValueError, match=r"this graph is quantized \(int8\).*Leave precision=None"):
        build_engine(quantized, tmp_path / "m.engine", precision="fp16")
    build_engine(plain, tmp_path / "m.engine", precision="fp16", progress=False)
    assert fake_trt.called("create_network") == [(0,)]  # weakly typed float baseline
    assert fake_trt.called("set_flag") == [(BuilderFlag.FP16,)]


def test_fp16_baseline_is_refused_by_a_strongly_typed_only_tensorrt(fake_trt, tmp_path, monkeypatch):
    monkeypatch.setattr(fake_trt, "BuilderFlag", type("BuilderFlag", (), {}))  # TensorRT 11
    with pytest.raises(ValueError, match="builds strongly typed networks only"):
        build_engine(_graph(tmp_path / "f.onnx", batch=2, quantized=False), tmp_path / "m.engine",
                     precision="fp16")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"workspace_gb": 0}, "workspace_gb must be a positive"),
    ({"log_level": "loud"}, "log_level must be one of"),
])
def test_bad_arguments_are_refused(fake_trt, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_engine(_graph(tmp_path / "m.onnx", batch=2), tmp_path / "m.engine", **kwargs)


# --- without tensorrt -------------------------------------------------------------------------


def test_missing_tensorrt_says_how_to_install(no_trt, tmp_path):
    onnx_path = _graph(tmp_path / "m.onnx", batch=2)
    for call in (lambda: build_engine(onnx_path, tmp_path / "m.engine"),
                 lambda: run_engine(tmp_path / "m.engine", [])):
        with pytest.raises(TensorRTNotInstalledError) as caught:
            call()
        message = str(caught.value)
        assert isinstance(caught.value, ImportError)
        assert 'pip install "qcompile[tensorrt]"' in message
        assert "tensorrt-cu12" in message and "pypi.nvidia.com" in message


def test_importing_qcompile_needs_no_tensorrt(no_trt, monkeypatch):
    monkeypatch.delitem(sys.modules, "qcompile.backends.tensorrt.engine")
    monkeypatch.setattr(qcompile.backends.tensorrt, "engine", trt_backend)  # restored after the test
    module = importlib.import_module("qcompile.backends.tensorrt.engine")  # a fresh import, no tensorrt
    assert qc.build_engine is module.build_engine and qc.run_engine is module.run_engine
    assert {"build_engine", "run_engine"} <= set(qc.__all__)


def test_trtexec_command():
    assert trtexec_command("m.onnx", "m.engine") == \
        "trtexec --onnx=m.onnx --stronglyTyped --saveEngine=m.engine"
    assert trtexec_command("m.onnx", "m.engine", SHAPES).endswith(
        "--minShapes=x:1x4 --optShapes=x:8x4 --maxShapes=x:64x4")


# --- run_engine against the fake -------------------------------------------------------------


class _Stream:
    cuda_stream = 1234
    synchronized = False

    def synchronize(self):
        self.synchronized = True


def test_run_engine_binds_inputs_and_outputs_by_name(fake_trt, tmp_path, monkeypatch):
    engine_path = tmp_path / "m.engine"
    engine_path.write_bytes(b"fake-engine")
    stream = _Stream()
    monkeypatch.setattr(trt_backend, "_cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(trt_backend, "_stream", lambda device: stream)
    outputs = run_engine(engine_path, {"input": torch.randn(3, 64, dtype=torch.float64)})
    assert list(outputs) == ["output"]
    assert outputs["output"].shape == (3, 32) and outputs["output"].dtype == torch.float32
    assert fake_trt.called("set_input_shape") == [("input", (3, 64))]
    addresses = dict(fake_trt.called("set_tensor_address"))
    assert addresses["output"] == outputs["output"].data_ptr() and addresses["input"] != 0
    assert fake_trt.called("execute_async_v3") == [(1234,)] and stream.synchronized
    assert run_engine(engine_path, [torch.randn(2, 64)])["output"].shape == (2, 32)
    with pytest.raises(ValueError, match=r"inputs are \['input'\]; missing \['input'\], unexpected \['x'\]"):
        run_engine(engine_path, {"x": torch.randn(2, 64)})
    (tmp_path / "bad.engine").write_bytes(b"other")
    with pytest.raises(EngineBuildError, match="could not load"):
        run_engine(tmp_path / "bad.engine", [torch.randn(2, 64)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_run_engine_without_cuda_says_so(fake_trt, tmp_path):
    with pytest.raises(RuntimeError, match="run_engine needs a CUDA GPU"):
        run_engine(tmp_path / "m.engine", [])


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_build_checks_inspects_and_builds(fake_trt, tmp_path, capsys):
    onnx_path = _graph(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    assert main(["build", onnx_path, "--shape", "x:1x4,8x4,64x4", "--workspace-gb", "1",
                 "--timing-cache", str(cache), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "onnx.checker: ok" in printed and "opset 21" in printed and "0 warning(s)" in printed
    assert f"wrote {tmp_path / 'm.engine'}" in printed
    assert fake_trt.called("set_shape") == [("x", (1, 4), (8, 4), (64, 4))]
    assert fake_trt.called("set_memory_pool_limit") == [(MemoryPoolType.WORKSPACE, 2**30)]
    assert cache.read_bytes() == b"cache:"


def test_cli_build_reports_errors(fake_trt, tmp_path, capsys):
    onnx_path = _graph(tmp_path / "m.onnx")
    assert main(["build", onnx_path, "-o", str(tmp_path / "x.engine")]) == 1
    assert "error: input 'x' has dynamic dimensions" in capsys.readouterr().err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    assert main(["build", str(broken)]) == 1
    assert "is not a valid ONNX model" in capsys.readouterr().err
    asymmetric = _graph(tmp_path / "zp.onnx", batch=2, zero_point=3)
    assert main(["build", asymmetric, "--strict"]) == 1
    captured = capsys.readouterr()
    assert "[zero-point]" in captured.out and "--strict" in captured.err
    assert fake_trt.called("Builder") == []


def test_cli_build_without_tensorrt_prints_install_and_trtexec(no_trt, tmp_path, capsys):
    onnx_path = _graph(tmp_path / "m.onnx")
    assert main(["build", onnx_path, "--shape", "x:1x4,8x4,64x4"]) == 1
    err = capsys.readouterr().err
    assert 'pip install "qcompile[tensorrt]"' in err
    assert "equivalent: trtexec --onnx=" in err and "--maxShapes=x:64x4" in err


def test_parse_shape():
    assert parse_shape("input_ids:1x8,4x128,8x512") == ("input_ids", ((1, 8), (4, 128), (8, 512)))
    assert parse_shape("a:b:1,2,3") == ("a:b", ((1,), (2,), (3,)))
    for bad in ("x", "x:1x4,8x4", "x:1xa,2,3", ":1,2,3"):
        with pytest.raises(Exception, match="expected name:min,opt,max"):
            parse_shape(bad)


# --- real TensorRT on a GPU ------------------------------------------------------------------------

#: what the real-TensorRT tests lack here, for their skip reason
MISSING = [what for what, present in (
    ('TensorRT (pip install "qcompile[tensorrt]" --extra-index-url https://pypi.nvidia.com)',
     importlib.util.find_spec("tensorrt") is not None),
    ("a CUDA GPU", torch.cuda.is_available()),
) if not present]
#: recipe -> lowest compute capability; nvfp4 runs on Blackwell (SM100) and later only.
REAL_RECIPES = {"int8": (7, 5), "fp8": (8, 9), "nvfp4": (10, 0)}


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(bool(MISSING), reason="needs " + " and ".join(MISSING))
@pytest.mark.parametrize("recipe", list(REAL_RECIPES))
def test_real_engine_matches_the_prepared_model(exported, tmp_path, recipe):
    capability = torch.cuda.get_device_capability()
    if capability < REAL_RECIPES[recipe]:
        pytest.skip(f"{recipe} needs compute capability {REAL_RECIPES[recipe]}, this GPU is {capability}")
    model, onnx_path = exported(recipe)
    engine = build_engine(onnx_path, tmp_path / f"{recipe}.engine", progress=False,
                          shapes={"x": ((1, 64), (8, 64), (32, 64))})
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    (got,) = run_engine(engine, [x]).values()
    # The same quantized values; only the matmul accumulation order differs.
    torch.testing.assert_close(got.float().cpu(), expected,
                               atol=2e-3 * expected.abs().max().item(), rtol=1e-2)
