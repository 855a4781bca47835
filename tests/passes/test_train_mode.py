"""train_mode: captured dropout, batch-norm and attention dropout follow .train()/.eval()."""

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.passes.capture import capture
from qcompile.passes.train_mode import TrainingSwitch, bind_training_mode


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop(self.bn(self.conv(x)).flatten(1))
        q = h.view(h.shape[0], 1, -1, 4)
        a = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5 if self.training else 0.0)
        return h + a.flatten(1)


def test_train_and_eval_match_the_eager_model():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 6, 6)
    gm = bind_training_mode(capture(model, (x,)))
    assert sum(isinstance(m, TrainingSwitch) for m in gm.modules()) == 4  # drop, bn, count, sdpa

    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))
    assert torch.equal(gm(x), gm(x))
    assert int(gm.bn.num_batches_tracked) == 0

    gm.train()
    assert not torch.equal(gm(x), gm(x))  # dropout is live again
    assert int(gm.bn.num_batches_tracked) == 2
    assert not torch.equal(gm.bn.running_mean, model.bn.running_mean)
