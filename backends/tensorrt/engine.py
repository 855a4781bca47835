"""`build_engine` and `run_engine`: a TensorRT engine from an exported Q/DQ ONNX file, and its run.

This module owns the TensorRT Python API calls (TensorRT 10 and later): the logger that keeps
TensorRT's error messages for our exceptions, the ONNX parse with errors that name the node,
the optimization profile for dynamic inputs, workspace, timing cache, a tqdm progress monitor,
and the name-based tensor API that runs an engine on torch CUDA tensors. `tensorrt` is imported
inside the functions, so importing qcompile never needs it. It knows nothing of how the ONNX file
was produced: precision comes from the graph's Q/DQ nodes (a strongly typed network).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from tqdm import tqdm

from qcompile.backends.tensorrt.formats import check_gpu_supports, formats_in_onnx

INSTALL_HINT = (
    'TensorRT\'s Python package is not installed. Install it with: pip install "qcompile[tensorrt]" '
    "--extra-index-url https://pypi.nvidia.com (the extra pulls tensorrt-cu12, whose wheels NVIDIA "
    "publishes on its own index, pypi.nvidia.com); it needs an NVIDIA GPU and driver. Without it, "
    "TensorRT's trtexec builds the same engine: trtexec --onnx=model.onnx --stronglyTyped "
    "--saveEngine=model.engine"
)
#: precision -> the builder flag of a weakly typed network (None: strongly typed, from the graph).
PRECISIONS = {None: None, "fp16": "FP16", "bf16": "BF16"}
LOG_LEVELS = ("verbose", "info", "warning", "error")
Shapes = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


class TensorRTNotInstalledError(ImportError):
    """`import tensorrt` failed; the message says how to install it."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine; the message names where."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, or `TensorRTNotInstalledError` with the install command."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTNotInstalledError(INSTALL_HINT) from error
    return tensorrt


# --- shapes -------------------------------------------------------------------------------


def onnx_input_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Graph inputs of an onnx.ModelProto: name -> dims (an int, or the name of a dynamic dim)."""
    initializers = {init.name for init in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                              for d in dims]
    return shapes


def _example_triple(dims: list[int | str]) -> tuple[tuple[int, ...], ...]:
    """A (min, opt, max) guess for the error message: dynamic dims 1, 8 and 64."""
    return tuple(tuple(size if isinstance(d, str) else d for d in dims) for size in (1, 8, 64))


def profile_shapes(inputs: dict[str, list[int | str]], shapes: Shapes | None
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) for every input with a dynamic dimension, checked against the graph.

    Inputs without dynamic dimensions need no entry; an entry for one must repeat its shape.
    """
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ValueError(f"shapes= names {unknown}, which are not inputs of the graph; "
                         f"its inputs are {sorted(inputs)}")
    profile = {}
    for name, dims in inputs.items():
        dynamic = any(isinstance(d, str) for d in dims)
        if name not in shapes:
            if dynamic:
                example = _example_triple(dims)
                raise ValueError(
                    f"input '{name}' has dynamic dimensions {dims}; pass its (min, opt, max) "
                    f"shapes, e.g. shapes={{'{name}': {example}}} "
                    f"(CLI: --shape {name}:{_cli_spec(example)})"
                )
            continue
        triple = shapes[name]
        if len(triple) != 3:
            raise ValueError(f"shapes['{name}'] must be (min, opt, max), got {triple!r}")
        triple = tuple(tuple(int(d) for d in shape) for shape in triple)
        for label, shape in zip(("min", "opt", "max"), triple):
            if len(shape) != len(dims):
                raise ValueError(f"shapes['{name}'] {label} {shape} has rank {len(shape)}; "
                                 f"input '{name}' is {dims} (rank {len(dims)})")
            for axis, (given, dim) in enumerate(zip(shape, dims)):
                if isinstance(dim, int) and given != dim:
                    raise ValueError(f"shapes['{name}'] {label} {shape}: axis {axis} is fixed to "
                                     f"{dim} in the graph, got {given}")
                if given < 0:
                    raise ValueError(f"shapes['{name}'] {label} {shape} has a negative size")
        low, opt, high = triple
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise ValueError(f"shapes['{name}'] needs min <= opt <= max on every axis, got {triple}")
        if dynamic:
            profile[name] = triple
    return profile


def _cli_spec(triple: tuple[tuple[int, ...], ...]) -> str:
    return ",".join("x".join(str(d) for d in shape) for shape in triple)


def trtexec_command(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                    shapes: Shapes | None = None) -> str:
    """The `trtexec` command that builds the same strongly typed engine."""
    parts = ["trtexec", f"--onnx={onnx_path}", "--stronglyTyped", f"--saveEngine={engine_path}"]
    if shapes:
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            spec = ",".join(f"{name}:{'x'.join(str(d) for d in triple[index])}"
                            for name, triple in shapes.items())
            parts.append(f"{flag}={spec}")
    return shlex.join(parts)


# --- logger and progress --------------------------------------------------------------------


#: tensorrt module -> its one capturing logger (see `_logger`)
_LOGGERS: dict[Any, Any] = {}


def _logger(trt: Any, log_level: str) -> Any:
    """The process's capturing trt.ILogger, set to print at `log_level` and with no errors kept.

    One logger for every builder and runtime: TensorRT keeps a single logger pointer while any
    of them lives and ignores a different one passed later, whose errors would be lost.
    """
    if trt not in _LOGGERS:
        _LOGGERS[trt] = _make_logger(trt)
    logger = _LOGGERS[trt]
    logger.threshold = int(getattr(trt.ILogger.Severity, log_level.upper()))
    logger.errors = []
    return logger


def _make_logger(trt: Any) -> Any:
    """A trt.ILogger that prints messages up to its `threshold` and keeps every error."""
    error_level = int(trt.ILogger.Severity.ERROR)

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.threshold = int(trt.ILogger.Severity.WARNING)
            self.errors: list[str] = []

        def log(self, level: Any, msg: str) -> None:
            if int(level) <= error_level:
                self.errors.append(msg)
            if int(level) <= self.threshold:
                tqdm.write(f"[TensorRT] {getattr(level, 'name', level)}: {msg}", file=sys.stderr)

    return CapturingLogger()


def _make_progress_monitor(trt: Any) -> Any:
    """A trt.IProgressMonitor that draws one tqdm bar per build phase, nested by parent."""

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, tuple[Any, int]] = {}  # phase -> (bar, depth)
            self._lock = threading.Lock()  # TensorRT may call from several threads
            self.cancelled = False

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._bars[parent_phase][1] + 1 if parent_phase in self._bars else 0
                bar = tqdm(total=num_steps, desc=phase_name, position=depth, leave=depth == 0,
                           file=sys.stderr, dynamic_ncols=True)
                self._bars[phase_name] = (bar, depth)

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self._lock:
                    if phase_name in self._bars:
                        bar = self._bars[phase_name][0]
                        bar.update(step + 1 - bar.n)
                return not self.cancelled
            except KeyboardInterrupt:  # cancel the build instead of raising into TensorRT
                self.cancelled = True
                return False

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar, _ = self._bars.pop(phase_name, (None, 0))
                if bar is not None:
                    bar.close()

    return TqdmProgressMonitor()


# --- errors ---------------------------------------------------------------------------------


def _parser_errors(parser: Any) -> list[str]:
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        name = error.node_name() if hasattr(error, "node_name") else ""
        operator = error.node_operator() if hasattr(error, "node_operator") else ""
        node = error.node()
        where = f"node '{name}'" if name else (f"node #{node}" if node >= 0 else "graph")
        if operator:
            where += f" ({operator})"
        lines.append(f"{where}: {error.desc()}")
    return lines


_LAYER = re.compile(r"(?:node|layer)[:\s]+(\{[^}]*\}|'[^']+'|\"[^\"]+\"|[^\s,:;()]+)", re.IGNORECASE)


def failing_layer(messages: list[str]) -> str | None:
    """The layer or node named in TensorRT's error messages (the last one that names one)."""
    for message in reversed(messages):
        found = _LAYER.findall(message)
        if found:
            return found[-1].strip("'\"").rstrip(".")
    return None


# --- build ----------------------------------------------------------------------------------


def _device_capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device, None when torch sees none."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def _check_precision(precision: str | None) -> None:
    if precision not in PRECISIONS:
        valid = ", ".join(repr(p) for p in PRECISIONS)
        raise ValueError(f"precision must be one of {valid}, got {precision!r}")


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str | None = None,
    workspace_gb: float = 4.0,
    shapes: Shapes | None = None,
    timing_cache: str | os.PathLike | None = None,
    log_level: str = "warning",
    progress: bool = True,
) -> Path:
    """Build a TensorRT engine from `onnx_path` and write it to `engine_path`.

    Args:
        onnx_path: an ONNX file, typically from `qcompile.export_onnx(..., target="tensorrt")`.
        engine_path: where the serialized engine (plan) is written.
        precision: None (default) builds a strongly typed network: every layer runs in the
            type its Q/DQ nodes and inputs give it, which is how explicitly quantized graphs are
            meant to be built, with no precision flags. "fp16" / "bf16" build a weakly typed
            float baseline that lets TensorRT choose half precision (TensorRT 10 only; refused
            for graphs with Q/DQ nodes, whose precision comes from the graph).
        workspace_gb: the builder's workspace memory pool limit, in GiB.
        shapes: (min, opt, max) shape per input with a dynamic dimension, e.g.
            `{"x": ((1, 64), (8, 64), (64, 64))}`; one optimization profile holds them.
        timing_cache: a file to read tactic timings from (if it exists) and save them to, so
            rebuilds are faster.
        log_level: TensorRT messages printed: "verbose", "info", "warning" or "error". Errors are
            kept either way and reported in the exception.
        progress: draw tqdm bars for the build phases.

    Returns the engine path. Raises `TensorRTNotInstalledError` without TensorRT,
    `UnsupportedGPUError` if the GPU cannot run a format of the graph (fp8 before Ada, nvfp4 and
    mxfp8 before Blackwell), `ValueError` for a dynamic input without `shapes`, and
    `EngineBuildError` naming the node or layer where parsing or building failed.
    """
    _check_precision(precision)
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {log_level!r}")
    if not (isinstance(workspace_gb, (int, float)) and math.isfinite(workspace_gb) and workspace_gb > 0):
        raise ValueError(f"workspace_gb must be a positive number of GiB, got {workspace_gb!r}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    trt = import_tensorrt()
    graph = onnx.load(onnx_path, load_external_data=False)
    profile = profile_shapes(onnx_input_shapes(graph), shapes)
    formats = formats_in_onnx(graph)
    if precision is not None and formats:
        raise ValueError(
            f"precision={precision!r} builds a weakly typed float engine, but this graph is "
            f"quantized ({', '.join(sorted(formats))}): its precision comes from its Q/DQ nodes. "
            "Leave precision=None"
        )
    capability = _device_capability()  # the GPU TensorRT builds for; None if torch sees none
    if capability is not None:
        check_gpu_supports(formats, capability)

    logger = _logger(trt, log_level)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, precision))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser) or logger.errors or ["(no error reported)"]
        raise EngineBuildError(
            f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors)
            + f"\n(`qcompile inspect {onnx_path}` lists patterns TensorRT does not fuse)"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision is not None:
        config.set_flag(getattr(trt.BuilderFlag, PRECISIONS[precision]))
    if profile:
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            optimization_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization_profile)
    if timing_cache is not None:
        cache_path = Path(timing_cache)
        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=True)
    monitor = _make_progress_monitor(trt) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        if monitor is not None and monitor.cancelled:
            raise KeyboardInterrupt("TensorRT engine build cancelled")
        raise EngineBuildError(_build_failure(onnx_path, logger.errors))
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with open(engine_path, "wb") as file:
        file.write(serialized)
    if timing_cache is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_path, "wb") as file:
            file.write(config.get_timing_cache().serialize())
    return engine_path


def _network_flags(trt: Any, precision: str | None) -> int:
    """STRONGLY_TYPED for precision=None; no flag for a weakly typed fp16/bf16 baseline."""
    if precision is None:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if not hasattr(trt.BuilderFlag, PRECISIONS[precision]):
        raise ValueError(
            f"TensorRT {getattr(trt, '__version__', '?')} builds strongly typed networks only, so "
            f"precision={precision!r} is not available; export the model in {precision} instead "
            "and leave precision=None"
        )
    return 0


def _build_failure(onnx_path: Path, errors: list[str]) -> str:
    layer = failing_layer(errors)
    where = f" at layer '{layer}'" if layer else ""
    detail = "\n  ".join(errors) if errors else "(TensorRT logged no error; rerun with log_level='verbose')"
    return f"TensorRT could not build an engine from {onnx_path}{where}:\n  {detail}"


# --- run ------------------------------------------------------------------------------------


_TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,
}


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype))
    if name not in _TORCH_DTYPES:
        raise TypeError(f"engine tensor type {name} has no torch equivalent here")
    return _TORCH_DTYPES[name]


def _cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError("run_engine needs a CUDA GPU, and torch.cuda.is_available() is False")
    return torch.device("cuda", torch.cuda.current_device())


def _stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device)


def _bind_inputs(names: list[str], inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    if isinstance(inputs, Mapping):
        missing, unexpected = set(names) - set(inputs), set(inputs) - set(names)
        if missing or unexpected:
            raise ValueError(f"the engine's inputs are {names}; missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        return dict(inputs)
    inputs = list(inputs)
    if len(inputs) != len(names):
        raise ValueError(f"the engine takes {len(names)} inputs {names}, got {len(inputs)}")
    return dict(zip(names, inputs))


def run_engine(engine_path: str | os.PathLike,
               inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a serialized engine once on `inputs` (by name, or in the engine's input order).

    Inputs are moved to the current CUDA device and cast to the engine's input types; outputs
    are torch CUDA tensors allocated here, returned by name.
    """
    trt = import_tensorrt()
    device = _cuda_device()
    logger = _logger(trt, "warning")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EngineBuildError(
            f"TensorRT could not load {engine_path} (engines are tied to the TensorRT version and "
            "GPU that built them):\n  " + "\n  ".join(logger.errors or ["(no error reported)"])
        )
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    output_names = [n for n in names if n not in input_names]
    bound = _bind_inputs(input_names, inputs)

    context = engine.create_execution_context()
    keep_alive = {}
    for name in input_names:
        tensor = bound[name].to(device=device, dtype=_torch_dtype(engine.get_tensor_dtype(name)))
        tensor = keep_alive[name] = tensor.contiguous()
        if not context.set_input_shape(name, tuple(tensor.shape)):
            raise ValueError(f"input '{name}' of shape {tuple(tensor.shape)} is outside the "
                             f"engine's optimization profile:\n  " + "\n  ".join(logger.errors))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for name in output_names:
        shape = tuple(context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"output '{name}' has a data-dependent shape {shape}; "
                               "run_engine supports outputs whose shape follows from the inputs")
        outputs[name] = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)),
                                    device=device)
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = _stream(device)
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT failed to run the engine:\n  " + "\n  ".join(logger.errors))
    stream.synchronize()
    return outputs
