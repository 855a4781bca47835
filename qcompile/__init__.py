"""qcompile: make a PyTorch model deployable in low precision.

Public API: `fake_quantize` (functional numerics of every format) and the format table.
"""

from qcompile.fake_quant import fake_quantize
from qcompile.formats import FORMATS, QuantFormat, get_format

__all__ = ["FORMATS", "QuantFormat", "fake_quantize", "get_format"]
__version__ = "0.1.0"
