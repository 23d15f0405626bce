import math

import torch

from secompress.perplexity import mean_loss, perplexity
from secompress.testing import make_tiny


def test_mean_loss_matches_transformers_loss_and_uniform_bound():
    model = make_tiny("qwen3_moe")
    ids = torch.randint(0, 256, (4, 32))
    ours = mean_loss(model, ids, batch_size=3)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.item()
    assert abs(ours - ref) < 1e-4
    assert abs(perplexity(model, ids) - math.exp(ours)) < 1e-3
    assert ours < math.log(model.config.vocab_size) + 0.5  # a random model is near uniform
