"""TensorRT: engines built from exported Q/DQ ONNX files (`engine`) and which GPU generations
run which formats (`formats`). `tensorrt` itself is imported only when an engine is built or run."""

from qcompile.backends.tensorrt.engine import (
    EngineBuildError,
    TensorRTNotInstalledError,
    build_engine,
    run_engine,
)
from qcompile.backends.tensorrt.formats import UnsupportedGPUError

__all__ = ["EngineBuildError", "TensorRTNotInstalledError", "UnsupportedGPUError", "build_engine", "run_engine"]
