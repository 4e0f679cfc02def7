"""The supported torch range (compat.py) and what every run prints.

The lowest supported torch, 2.11, cannot be installed next to the one CI runs; its API surface is recorded here
instead, read from the torch 2.11.0 wheel's sources (torch/__init__.py: torch.compile's keywords;
torch/nn/parallel/distributed.py: DistributedDataParallel's), and the code runs with torch restricted to it. That
restriction is a faithful stand-in as long as 2.11's surface is a part of the installed one: the first test checks
that, so it stays true, or fails loudly, as the installed torch moves."""

import inspect
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import compat
import flow_grpo as fg
import rewards
from test_sd3 import PROMPTS, make_model, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent
REAL_COMPILE = torch.compile
# torch.compile's keywords in torch 2.11.0 (torch/__init__.py of its wheel, whose torch/version.py names git
# 70d99e998b49): the lowest supported
TORCH_2_11_COMPILE_KEYWORDS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")
# DistributedDataParallel.__init__'s parameters in torch 2.11.0 (torch/nn/parallel/distributed.py of its wheel): no
# forward_sync_buffers, and broadcast_buffers is not deprecated there
TORCH_2_11_DDP_KEYWORDS = (
    "module", "device_ids", "output_device", "dim", "broadcast_buffers", "init_sync", "process_group", "bucket_cap_mb",
    "find_unused_parameters", "check_reduction", "gradient_as_bucket_view", "static_graph",
    "delay_all_reduce_named_params", "param_to_hook_all_reduce", "mixed_precision", "device_mesh",
    "skip_all_reduce_unused_params", "bucket_cap_mb_list",
)  # fmt: skip


def torch_2_11_compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None, disable=False):
    """torch.compile with torch 2.11's signature (TORCH_2_11_COMPILE_KEYWORDS). It compiles with the eager
    backend: dynamo captures and guards each graph, as inductor's would be, without generating code (seconds)."""
    return REAL_COMPILE(model, fullgraph=fullgraph, dynamic=dynamic, backend="eager", mode=mode, options=options, disable=disable)


def test_torch_2_11s_recorded_surface_is_part_of_the_installed_ones():
    assert tuple(inspect.signature(torch_2_11_compile).parameters)[1:] == TORCH_2_11_COMPILE_KEYWORDS
    assert set(TORCH_2_11_COMPILE_KEYWORDS) <= set(inspect.signature(torch.compile).parameters)
    assert set(TORCH_2_11_DDP_KEYWORDS) <= set(inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters)
    # the other names compat.py relies on in every supported version
    assert hasattr(torch._dynamo.config, "recompile_limit")
    assert torch.backends.cuda.matmul.fp32_precision in ("none", "ieee", "tf32")
    assert "device" in inspect.signature(torch.amp.GradScaler).parameters


@pytest.fixture
def fresh_dynamo(monkeypatch, tmp_path_factory):
    """No compiled graphs, zeroed counters, dynamo's limit restored afterwards (it is process-wide)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
    limit = torch._dynamo.config.recompile_limit  # (monkeypatch's undo would delete a config entry)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = limit


def test_the_compiled_path_trains_under_torch_2_11s_compile(tmp_path, monkeypatch, fresh_dynamo):
    """The crash of issue 16 (`compile() got an unexpected keyword argument 'recompile_limit'` on torch 2.11, before
    the first image): the model is built and trained with torch.compile restricted to 2.11's keywords."""
    monkeypatch.setattr(torch, "compile", torch_2_11_compile)  # what nn.Module.compile calls
    with pytest.raises(TypeError, match="recompile_limit"):  # the stand-in refuses what 2.11 refuses
        torch.nn.Linear(1, 1).compile(dynamic=False, recompile_limit=2)
    cfg = tiny_cfg(tmp_path, compile="on", lr=0.0, weight_decay=0.0, group_size=2, groups_per_epoch=2, batch_size=2,
                   optimizer_steps_per_epoch=1, num_steps=2, epochs=1)  # fmt: skip
    model = make_model(cfg)
    assert model.compiled
    assert torch._dynamo.config.recompile_limit == model.graphs  # 2.11's spelling of the limit
    history = fg.train(cfg, model, rewards.build_reward(cfg.reward), [fg.Prompt(p) for p in PROMPTS], log=lambda s: None)
    assert counters["stats"]["unique_graphs"] > 0  # it really ran compiled
    assert (history[0]["policy/ratio"], history[0]["policy/approx_kl"]) == (1.0, 0.0)  # lr 0: on-policy


def test_without_a_cxx_compiler_the_compiled_path_is_off_with_one_line(tmp_path, monkeypatch, capsys, fresh_dynamo):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compat.shutil, "which", lambda name: None)
    model = make_model(tiny_cfg(tmp_path, compile="on"))
    assert not model.compiled
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["--compile: the compiled path is off, the transformer runs eagerly: no C++ compiler with "
                       "Python's headers (inductor builds C++ on a CPU: apt-get install g++ python3-dev)"]  # fmt: skip
    assert counters["stats"]["unique_graphs"] == 0


def test_ddp_is_built_with_2_11s_keyword_where_the_new_one_is_absent(monkeypatch):
    used = {}

    def torch_2_11_ddp(module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True):  # its first five
        used.update(device_ids=device_ids, broadcast_buffers=broadcast_buffers)
        return module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", torch_2_11_ddp)
    compat.ddp_without_buffer_sync(torch.nn.Linear(2, 2), None)
    assert used == {"device_ids": None, "broadcast_buffers": False}


def test_ddp_with_the_installed_torch_syncs_no_buffers_on_forward_and_does_not_warn(tmp_path):
    """One gloo process: torch 2.13 deprecates broadcast_buffers with a FutureWarning (printed by every process of a
    torchrun); its forward_sync_buffers=False must be what is used."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = compat.ddp_without_buffer_sync(torch.nn.Linear(2, 2), None)
    finally:
        dist.destroy_process_group()
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    assert ddp.broadcast_buffers is False  # no broadcast before each forward


def test_quiet_libraries_drops_exactly_the_listed_messages():
    """The filters are narrow: the empty-list float32 message of a dtype cast goes, the same message naming a module
    stays (it would be true), and every other message of the same logger stays."""
    compat.quiet_libraries()
    compat.quiet_libraries()  # idempotent: one filter per logger
    logger = logging.getLogger("diffusers.models.modeling_utils")
    assert sum(isinstance(f, compat._DropMessages) for f in logger.filters) == 1
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        from diffusers import AutoencoderKL

        AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=2, sample_size=8).to(torch.float64)
        logger.warning("There are modules in X that should be kept in float32: ['norm']. Casting directly ...")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["There are modules in X that should be kept in float32: ['norm']. Casting directly ...", "something else"]


# what runs printed besides our own lines before issue 16 (libraries: compat.QUIET; DDP; inductor's TF32 advice)
KNOWN_NOISE = [
    "requires torchvision (not installed)", "part of your input was truncated", "Token indices sequence length",
    "should be kept in float32", "broadcast_buffers", "TensorFloat32",
]  # fmt: skip


def test_a_tiny_random_run_prints_only_its_own_lines(tmp_path):
    """The command line on the tiny model, with a prompt longer than CLIP's 77 tokens: stderr stays empty (a library
    that starts printing again fails this test), and one line of ours says which prompts are cut."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube on a table\n" + "a very long prompt about a garden " * 20 + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "flow_grpo.py"), "--cpu", "--model", "tiny-random", "--reward", "jpeg_compressibility",
         "--prompts", str(prompts), "--eval_every", "0", "--epochs", "1", "--group_size", "2", "--groups_per_epoch", "2",
         "--batch_size", "2", "--optimizer_steps_per_epoch", "1", "--num_steps", "2", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [n for n in KNOWN_NOISE if n in result.stdout + result.stderr] == []
    assert result.stderr == ""
    note = [line for line in result.stdout.splitlines() if line.startswith("prompts: ")]
    assert len(note) == 1 and "1 of 2 longer than CLIP's 77 tokens" in note[0]


def test_the_readmes_lora_snippet_loads_the_checkpoint_silently(tmp_path, capfd):
    """README "Using the trained LoRA": load_lora_adapter on the transformer gives the trained model (the same
    velocities as ours) and prints nothing (pipe.load_lora_weights prints "No LoRA keys associated to
    CLIPTextModelWithProjection" twice)."""
    from tiny_sd3 import tiny_sd3_pipeline

    from test_sd3 import perturb_lora

    model = make_model(tiny_cfg(tmp_path))
    perturb_lora(model)
    model.save_weights(str(tmp_path / "lora"))
    pipe = tiny_sd3_pipeline()
    capfd.readouterr()
    pipe.transformer.load_lora_adapter(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    assert capfd.readouterr() == ("", "")
    g = torch.Generator().manual_seed(0)
    config = pipe.transformer.config
    inputs = dict(
        hidden_states=torch.randn((1, config.in_channels, 16, 16), generator=g), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn((1, 5, config.joint_attention_dim), generator=g),
        pooled_projections=torch.randn((1, config.pooled_projection_dim), generator=g), return_dict=False,
    )  # fmt: skip
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**inputs)[0], model.transformer(**inputs)[0])
