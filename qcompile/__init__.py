"""qcompile: make a PyTorch model deployable in low precision.

`prepare` (capture and insert quantizers), functional numerics (`fake_quantize`), calibration
(`calibrate`, `smooth`, `gptq`, `search_weight_scales`), mixed precision by measurement (`auto_recipe`), distillation (`Distiller`, `train`), the per-site `report`, checkpoints
(`save`, `load`) and FSDP2 sharding (`fully_shard`). See README.md for the tour.
"""

from qcompile.algorithms.auto_recipe import auto_recipe
from qcompile.algorithms.calibrate import CalibrationWarning, calibrate
from qcompile.algorithms.gptq import gptq
from qcompile.algorithms.smooth import smooth
from qcompile.algorithms.weight_scales import search_weight_scales
from qcompile.blocks import BlockError
from qcompile.core.fake_quant import fake_quantize
from qcompile.core.formats import FORMATS, QuantFormat, get_format
from qcompile.core.quantizer import Quantizer, QuantSpec
from qcompile.core.weight_cache import clear_weight_cache, set_weight_cache
from qcompile.passes.capture import CaptureError
from qcompile.passes.sites import Site, SiteKind, SiteStatus
from qcompile.prepare import PreparedBlock, PreparedModel, PrepareWarning, prepare
from qcompile.recipe import RECIPES, Recipe, SiteSpecs, get_recipe
from qcompile.report import Report, report
from qcompile.training.checkpoint import CheckpointError, load, save
from qcompile.training.distill import Distiller
from qcompile.training.distributed import fully_shard
from qcompile.training.train import freeze, train
from qcompile.version import __version__ as __version__

__all__ = [
    "FORMATS",
    "RECIPES",
    "BlockError",
    "CalibrationWarning",
    "CaptureError",
    "CheckpointError",
    "PreparedBlock",
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
    "auto_recipe",
    "calibrate",
    "clear_weight_cache",
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
    "search_weight_scales",
    "set_weight_cache",
    "smooth",
    "train",
    "export_onnx",
    "inspect_onnx",
    "onnxruntime_session",
    "verify_onnx",
    "build_engine",
    "run_engine",
    "QADTrainer",
]

# Optional extras, imported on first use so that `import qcompile` needs neither onnx,
# tensorrt nor transformers: name -> (module, attribute).
_LAZY = {
    "export_onnx": ("qcompile.backends.onnx.export", "export_onnx"),
    "inspect_onnx": ("qcompile.backends.onnx.rules", "inspect_onnx"),
    "onnxruntime_session": ("qcompile.backends.onnx.ort", "onnxruntime_session"),
    "verify_onnx": ("qcompile.backends.onnx.verify", "verify_onnx"),
    "build_engine": ("qcompile.backends.tensorrt.engine", "build_engine"),
    "run_engine": ("qcompile.backends.tensorrt.engine", "run_engine"),
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
