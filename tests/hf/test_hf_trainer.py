"""QAD through the Hugging Face Trainer: `qcompile.QADTrainer` overrides compute_loss."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import qcompile as qc  # noqa: E402
from qcompile.training.distill import kl_divergence  # noqa: E402


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with (ignored) labels, as a task dataset would have."""

    def __init__(self, count: int, seq_len: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (count, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": torch.tensor(i % 3)}


def test_qad_with_the_trainer_reduces_the_kl_and_leaves_the_teacher_alone(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    teacher = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        teacher.classifier.weight.mul_(20)  # confident logits, as a trained classifier has
    teacher_state = copy.deepcopy(teacher.state_dict())
    data = TokenDataset(64, 16, config.vocab_size)
    example = {k: v[:2] for k, v in torch.utils.data.default_collate([data[0], data[1]]).items()
               if k != "labels"}
    student = qc.prepare(teacher, "mxfp4", example_kwargs=example)

    def mean_kl() -> float:
        batch = torch.utils.data.default_collate([data[i] for i in range(64)])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student.eval()
        with torch.no_grad():
            return kl_divergence(teacher(**inputs).logits, student(**inputs).logits,
                                            1.0).item()

    before = mean_kl()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=30,
        learning_rate=5e-4, report_to=[], save_strategy="no", logging_steps=10,
        use_cpu=True, remove_unused_columns=False,
    )
    trainer = qc.QADTrainer(model=student, teacher=teacher, args=args, train_dataset=data)
    trainer.train()
    after = mean_kl()
    assert after < 0.7 * before, (before, after)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[name]), name
