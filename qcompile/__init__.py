"""qcompile: make a PyTorch model deployable in low precision.

`prepare` (capture and insert quantizers), functional numerics (`fake_quantize`), calibration
(`calibrate`, `smooth`, `gptq`), distillation (`Distiller`, `train`), the per-site `report`, checkpoints
(`save`, `load`) and FSDP2 sharding (`fully_shard`). See README.md for the tour.
"""

from qcompile.calibrate import CalibrationWarning, calibrate
from qcompile.checkpoint import CheckpointError, load, save
from qcompile.distill import Distiller
from qcompile.distributed import fully_shard
from qcompile.fake_quant import fake_quantize
from qcompile.formats import FORMATS, QuantFormat, get_format
from qcompile.gptq import gptq
from qcompile.passes.capture import CaptureError
from qcompile.passes.sites import Site, SiteKind, SiteStatus
from qcompile.prepare import PreparedModel, PrepareWarning, prepare
from qcompile.quantizer import QuantSpec, Quantizer
from qcompile.recipe import RECIPES, Recipe, SiteSpecs, get_recipe
from qcompile.report import Report, report
from qcompile.smooth import smooth
from qcompile.train import freeze, train

__all__ = [
    "FORMATS",
    "RECIPES",
    "CalibrationWarning",
    "CaptureError",
    "CheckpointError",
    "PreparedModel",
    "PrepareWarning",
    "Recipe",
    "Site",
    "SiteKind",
    "SiteSpecs",
    "SiteStatus",
    "Distiller",
    "QuantFormat",
    "QuantSpec",
    "Quantizer",
    "Report",
    "calibrate",
    "fake_quantize",
    "freeze",
    "fully_shard",
    "get_format",
    "get_recipe",
    "gptq",
    "load",
    "prepare",
    "report",
    "save",
    "smooth",
    "train",
    "export_onnx",
    "inspect_onnx",
    "build_engine",
    "run_engine",
    "QADTrainer",
]
__version__ = "0.1.0"

# Optional extras, imported on first use so that `import qcompile` needs neither onnx,
# tensorrt nor transformers: name -> (module, attribute).
_LAZY = {
    "export_onnx": ("qcompile.backends.onnx", "export_onnx"),
    "inspect_onnx": ("qcompile.backends.onnx_rules", "inspect_onnx"),
    "build_engine": ("qcompile.backends.tensorrt", "build_engine"),
    "run_engine": ("qcompile.backends.tensorrt", "run_engine"),
    "QADTrainer": ("qcompile.hf", "QADTrainer"),
}


def __getattr__(name: str):
    import importlib

    if name == "hf":  # the Hugging Face integration: qcompile.hf.prepare_causal_lm, ...
        return importlib.import_module("qcompile.hf")
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
