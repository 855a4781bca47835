"""`qcompile demo`: the whole pipeline on the embedded default, all-MiniLM-L6-v2.

Loads the real sentence encoder offline, prepares it with a recipe (nvfp4 by default),
calibrates it on standard-library docstrings (PTQ), GPTQ-rounds its weights on the same
docstrings, distils the float encoder into it for a few steps (QAD, cosine loss on the
embeddings), and measures how faithfully each stage
reproduces the float embeddings on held-out docstrings (mean cosine similarity and top-1
retrieval agreement). Exports the result to ONNX for TensorRT and checks the exported numbers with onnx.reference.
Writes `model.onnx`, `results.json`, `report.txt` and `fidelity.png`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qcompile.demo import corpus, minilm
from qcompile.passes.sites import model_sites

BATCH_SIZE = 32
MAX_LENGTH = 64


@dataclass
class Fidelity:
    """How closely quantized embeddings follow the float ones on the same texts."""

    mean_cosine: float
    min_cosine: float
    top1_agreement: float


def embed(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], desc: str) -> torch.Tensor:
    """Embeddings of every batch, concatenated, with a progress bar."""
    with torch.no_grad():
        return torch.cat([model(**batch) for batch in tqdm(batches, desc=desc, leave=False)])


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> Fidelity:
    """Cosine similarity per text, and whether each text's nearest neighbour is unchanged."""
    cosine = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)

    def nearest(embeddings: torch.Tensor) -> torch.Tensor:
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.argmax(dim=-1)

    agreement = (nearest(reference) == nearest(candidate)).float().mean()
    return Fidelity(cosine.mean().item(), cosine.min().item(), agreement.item())


def text_batches(tokenizer, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """Fixed-shape batches (padded to MAX_LENGTH) of the given texts."""
    return [
        minilm.tokenize(tokenizer, texts[i : i + BATCH_SIZE], max_length=MAX_LENGTH, pad_to_max=True)
        for i in range(0, len(texts), BATCH_SIZE)
    ]


@dataclass
class ExportCheck:
    path: Path
    size_mb: float
    float_size_mb: float
    inspect_summary: str
    texts: int
    parity_cosine: float
    parity_max_diff: float


def export_and_check(qmodel: torch.nn.Module, batch: dict, output: Path, texts: int = 2) -> ExportCheck:
    """Export for TensorRT, inspect it, and prove the numbers on the standard-ONNX form.

    The TensorRT file uses TensorRT's own dynamic-quantize ops, which no CPU evaluator runs;
    the same model exported with `target="onnx"` (standard ops only) runs in onnx.reference
    and is compared with the PyTorch model on a few texts.
    """
    import tempfile

    from qcompile.backends.onnx.export import export_onnx
    from qcompile.backends.onnx.reference import reference_evaluator
    from qcompile.backends.onnx.rules import inspect_onnx

    qmodel.eval()
    example = {k: v[:2] for k, v in batch.items()}
    with tqdm(total=3, desc="ONNX export and parity", leave=False) as bar:
        path = export_onnx(qmodel, (), output / "model.onnx", example_kwargs=example,
                           target="tensorrt", dynamic_sequence=True)
        bar.update()
        inspected = inspect_onnx(path)
        with tempfile.TemporaryDirectory() as scratch:
            standard = export_onnx(qmodel, (), Path(scratch) / "model.onnx",
                                   example_kwargs=example, target="onnx", dynamic_sequence=True)
            bar.update()
            feeds = {k: v[:texts] for k, v in batch.items()}
            got = torch.as_tensor(reference_evaluator(standard).run(None, {k: v.numpy() for k, v in feeds.items()})[0])
            bar.update()
    with torch.no_grad():
        want = qmodel(**feeds)
    weights = f"weights {inspected.weight_bytes / max(1, inspected.weight_float_bytes):.2f} of float"
    summary = f"{weights}, {len(inspected.warnings)} TensorRT fusion warning(s)"
    float_bytes = sum(p.numel() * 4 for p in qmodel.parameters())
    return ExportCheck(
        path=path,
        size_mb=path.stat().st_size / 1e6,
        float_size_mb=float_bytes / 1e6,
        inspect_summary=summary,
        texts=texts,
        parity_cosine=torch.nn.functional.cosine_similarity(got, want, dim=-1).mean().item(),
        parity_max_diff=(got - want).abs().max().item(),
    )


def _plot(results: dict[str, Fidelity], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [r.mean_cosine for r in results.values()], color="#4c72b0")
    ax.set_ylim(min(r.mean_cosine for r in results.values()) - 0.01, 1.0)
    ax.set_ylabel("mean cosine similarity to float")
    ax.set_title("all-MiniLM-L6-v2 embedding fidelity (held-out docstrings)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    recipe: str = "nvfp4",
    calibration_texts: int = 256,
    eval_texts: int = 256,
    qad_steps: int = 40,
    output_dir: str | Path = "qcompile-demo",
    gptq: bool = True,
) -> dict[str, Fidelity]:
    """Run the demo and return the fidelity of each stage against the float model."""
    import qcompile as qc

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"qcompile demo: all-MiniLM-L6-v2, recipe {recipe}")
    model, tokenizer = minilm.load()
    train_texts = corpus.docstrings("train", limit=calibration_texts + BATCH_SIZE * qad_steps)
    calibration = text_batches(tokenizer, train_texts[:calibration_texts])
    distillation = text_batches(tokenizer, train_texts[calibration_texts:])
    evaluation = text_batches(tokenizer, corpus.docstrings("val", limit=eval_texts))
    float_embeddings = embed(model, evaluation, "float embeddings")

    qmodel = qc.prepare(model, recipe, example_kwargs=calibration[0])
    qc.calibrate(qmodel, calibration, method="max")
    results = {f"{recipe} PTQ": fidelity(float_embeddings, embed(qmodel, evaluation, "PTQ embeddings"))}
    if gptq:
        qc.gptq(qmodel, calibration)
        results[f"{recipe} GPTQ"] = fidelity(
            float_embeddings, embed(qmodel, evaluation, "GPTQ embeddings")
        )
    if qad_steps > 0:
        distiller = qc.Distiller(copy.deepcopy(model), qmodel, loss="cosine")
        qc.train(qmodel, distillation, steps=qad_steps, lr=2e-5, distiller=distiller)
        qmodel.eval()
        results[f"{recipe} QAD"] = fidelity(
            float_embeddings, embed(qmodel, evaluation, "QAD embeddings")
        )

    export = export_and_check(qmodel, evaluation[0], output)
    report = str(qc.report(qmodel))
    (output / "report.txt").write_text(report + "\n")
    summary = {name: asdict(r) for name, r in results.items()}
    summary["onnx"] = {"size_mb": export.size_mb, "parity_cosine": export.parity_cosine,
                       "parity_max_diff": export.parity_max_diff}
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(results, output / "fidelity.png")

    print(f"\n{'stage':16} {'mean cos':>9} {'min cos':>9} {'top-1 agree':>12}")
    for name, r in results.items():
        print(f"{name:16} {r.mean_cosine:9.4f} {r.min_cosine:9.4f} {r.top1_agreement:12.3f}")
    print(f"\nONNX for TensorRT: {export.path} ({export.size_mb:.1f} MB vs {export.float_size_mb:.1f} "
          f"MB float); {export.inspect_summary}")
    print(f"ONNX parity (standard-ONNX export run by onnx.reference, {export.texts} texts): "
          f"mean cosine to PyTorch {export.parity_cosine:.6f}, max |diff| {export.parity_max_diff:.2e}")
    print(f"\n{len(model_sites(qmodel))} sites; report, results and plot in {output}/ "
          f"({time.perf_counter() - started:.0f} s)")
    return results
