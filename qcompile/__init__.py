"""qcompile: make a PyTorch model deployable in low precision.

Functional numerics (`fake_quantize`), calibration (`calibrate`), distillation (`Distiller`,
`train`), and the per-site `report`. See README.md for the tour.
"""

from qcompile.calibrate import CalibrationWarning, calibrate
from qcompile.distill import Distiller
from qcompile.fake_quant import fake_quantize
from qcompile.formats import FORMATS, QuantFormat, get_format
from qcompile.quantizer import QuantSpec, Quantizer
from qcompile.report import Report, report
from qcompile.train import freeze, train

__all__ = [
    "FORMATS",
    "CalibrationWarning",
    "Distiller",
    "QuantFormat",
    "QuantSpec",
    "Quantizer",
    "Report",
    "calibrate",
    "fake_quantize",
    "freeze",
    "get_format",
    "report",
    "train",
]
__version__ = "0.1.0"
