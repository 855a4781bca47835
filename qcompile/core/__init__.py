"""Core numerics: formats as data (`formats`), the executable numerics contract (`numerics`),
the `torch.library` ops and their kernels (`ops`, `kernels/`), `fake_quantize`, the quantizer
module and its spec (`quantizer`), and how a model is called with a batch (`calls`). Nothing
here knows of graphs, recipes, training or export."""
