"""bench.py --profile sorts every profiled op into a kind of work; checked here against what the ops are, read off
their shapes, on the tiny SD3 model (CPU, seconds)."""

import torch

import bench
import flow_grpo as fg
from test_sd3 import PROMPTS, make_model, tiny_cfg

RANK = 5  # a LoRA rank no other dimension of the tiny model has (its attention is 4 heads x 8 = 32, its default rank)
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def test_profile_kinds_split_the_lora_branch_from_the_frozen_matmuls_forward_and_backward(tmp_path):
    model = make_model(tiny_cfg(tmp_path, batch_size=2, lora_rank=RANK))
    cond = model.encode(PROMPTS)
    x, t = torch.randn((2, *model.latent_shape)), torch.tensor([0.7, 0.7])  # (2, *D), (2,)
    sigmas = model.schedule(4)
    x_next = torch.randn_like(x)
    with bench.scoped(model), torch.profiler.profile(record_shapes=True) as prof:
        v = model.velocity(x, t, cond)  # (2, *D)
        # the training step's float32 arithmetic on top of it
        log_prob = fg.sde_step(x, v, sigmas[1], sigmas[2], 0.7, x_next)[1]
        log_prob.mean().backward()
    kinds = bench.kinds(prof.events())  # {op: kind}
    events = list(kinds)
    # Independent of the scopes: a matmul of the LoRA branch, and only such a matmul, has the rank as one of its
    # dimensions (x·Aᵀ: (rows, in)·(in, r); (·)·Bᵀ: (rows, r)·(r, out); and each gradient of those)
    matmuls = [e for e in events if e.name in MATMULS]
    lora = [e for e in matmuls if any(RANK in shape for shape in e.input_shapes)]
    backward = [e for e in lora if "Backward" in (e.cpu_parent.name if e.cpu_parent else "")]
    assert lora and backward  # both directions were profiled
    for e in matmuls:
        assert (kinds[e] == "LoRA branch") == (e in lora), (e.name, e.input_shapes, kinds[e])
    # the attention kernel and its backward, and the SDE step's arithmetic and its backward
    sdpa = [e for e in events if "scaled_dot_product" in e.name]
    assert sdpa and all(kinds[e] == "attention" for e in sdpa)
    sde = [e for e in events if kinds[e] == "SDE step + loss (fp32)"]
    assert any("Backward" in (e.cpu_parent.name if e.cpu_parent else "") for e in sde)
    assert {"norms/elementwise", "frozen matmuls + convs"} <= set(kinds.values())
