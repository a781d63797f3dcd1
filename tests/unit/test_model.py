import math

import torch

from hivefold.model import build_model
from hivefold.spec import model_config_from_name


def tiny(seq_len=32):
    return model_config_from_name("tiny", vocab_size=257, max_seq_len=seq_len)


def test_tiny_is_about_one_million_parameters():
    assert 0.7e6 < build_model(tiny(128), 0).num_parameters() < 1.2e6


def test_init_is_deterministic_by_seed():
    a, b, c = build_model(tiny(), 1), build_model(tiny(), 1), build_model(tiny(), 2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_forward_shapes_and_initial_loss_near_uniform():
    model = build_model(tiny(), 0)
    x, y = torch.randint(0, 257, (2, 3, 32), generator=torch.Generator().manual_seed(0))
    logits, loss = model(x, y)
    assert logits.shape == (3, 32, 257)
    assert abs(float(loss.detach()) - math.log(257)) < 0.5


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = build_model(tiny(), 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 10, (4, 33))
    first = None
    for _ in range(20):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss) < first - 1.0


def test_generate_extends_the_prompt():
    model = build_model(tiny(16), 0)
    out = model.generate(torch.tensor([[1, 2, 3]]), 20, temperature=0.8, top_k=5,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 23) and torch.equal(out[0, :3], torch.tensor([1, 2, 3]))
    greedy = model.generate(torch.tensor([[1]]), 5, temperature=0)
    assert torch.equal(greedy, model.generate(torch.tensor([[1]]), 5, temperature=0))
