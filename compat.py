"""The library versions this project supports, and the library messages it replaces with its own.

Supported: torch >= 2.11, < 2.15 (requirements.txt). flow_grpo.py calls only what torch 2.11 has, or looks a newer
API up here and falls back to 2.11's spelling. Each was checked against the sources of torch 2.11.0 (the wheel's
torch/__init__.py, torch/_dynamo/config.py, torch/nn/parallel/distributed.py, torch/backends/cuda/__init__.py,
torch/amp/grad_scaler.py), 2.13.0 (the one CI installs) and 2.14.1:

  API                                             in torch     where absent (2.11)
  torch.compile(recompile_limit=)                 2.13, 2.14   torch._dynamo.config.recompile_limit (process-wide)
  DistributedDataParallel(forward_sync_buffers=)  2.13, 2.14   broadcast_buffers=False (deprecated in 2.13, with a
                                                               FutureWarning on every process)
  torch.backends.cuda.matmul.fp32_precision       2.11-2.14    (2.13 raises on reading allow_tf32 once this is set)
  torch._dynamo.config.recompile_limit            2.11-2.14    (cache_size_limit is its alias)
  torch.amp.GradScaler("cuda", enabled=)          2.11-2.14
The compiled path needs what inductor needs: Python that dynamo supports, triton on a GPU, a C++ compiler with
Python's headers on a CPU. Where one is missing, can_compile says which in one line, and SD3Model runs eagerly.
tests/test_versions.py runs the compiled path under torch 2.11's keywords and checks this list against the
installed torch.

The messages (quiet_libraries): each expected library warning that tells a user nothing true and useful is dropped
by its logger and its text, never a whole logger or category; prompt_length_note replaces the text encoders'
truncation warnings with one line.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sysconfig
from typing import Optional

import torch


def compile_blocks(blocks, graphs: int) -> None:
    """torch.compile each block (static shapes), allowing each compiled code object `graphs` graphs: recompile
    number graphs + 1 runs eagerly (and dynamo warns) instead of compiling without end."""
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch 2.13, 2.14: a limit of its own
        for block in blocks:
            block.compile(dynamic=False, recompile_limit=graphs)
        return
    # torch 2.11: the same limit as dynamo's process-wide setting (per code object too; the blocks are this
    # process's only compiled code)
    torch._dynamo.config.recompile_limit = graphs
    for block in blocks:
        block.compile(dynamic=False)


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile can run here; if not, one printed line (rank 0) says why and that the transformer runs
    eagerly. Checked before compiling: inductor fails only at the first forward, with a long traceback."""
    cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    why = None
    if not getattr(torch._dynamo, "is_dynamo_supported", lambda: True)():
        why = f"torch {torch.__version__} does not support torch.compile on this Python"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        why = None if has_triton() else "triton is not installed (inductor generates triton kernels on a GPU)"
    elif cxx is None or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        why = "no C++ compiler with Python's headers (inductor builds C++ on a CPU: apt-get install g++ python3-dev)"
    dist = torch.distributed
    if why and (not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0):
        print(f"--compile: the compiled path is off, the transformer runs eagerly: {why}")
    return why is None


def ddp_without_buffer_sync(module: torch.nn.Module, device_ids) -> torch.nn.Module:
    """DistributedDataParallel that does not broadcast buffers on every forward (SD3's transformer has one, the
    positional embedding, identical on every process: same config). The switch is renamed after torch 2.11."""
    DDP = torch.nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:  # torch 2.13, 2.14 (syncs once, at wrapping)
        return DDP(module, device_ids=device_ids, forward_sync_buffers=False)
    return DDP(module, device_ids=device_ids, broadcast_buffers=False)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message contains one of the given texts."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


# logger name -> the texts of its expected messages that are not shown, and why
QUIET = {
    # transformers >= 5 without torchvision: the image processors fall back to their PIL versions, which are the ones
    # the reference's transformers had (PickScore's CLIP processor); "install torchvision" would risk pulling a torch
    # that does not match the installed one
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    # StableDiffusion3Pipeline: CLIP reads 77 tokens, T5 --max_sequence_length; the pipeline truncates, as the
    # reference's does, and echoes the cut text on every batch: prompt_length_note says it once
    "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3": ("part of your input was truncated",),
    # diffusers 0.42 warns on every dtype cast even when no module needs float32 (the list it prints is empty); a
    # non-empty list stays visible
    "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
}


def quiet_libraries() -> None:
    """Install the filters of QUIET (once per logger; loggers exist before their library is imported)."""
    for name, texts in QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*texts))


def quiet_tokenizers(pipe) -> None:
    """The pipeline's tokenizers run each prompt once untruncated to see whether it was cut; transformers then warns
    "Token indices sequence length is longer than ... (303 > 77)", once per tokenizer. The truncation is expected
    (prompt_length_note reports it), so mark that warning as given for these three tokenizers only."""
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3):
        warned = getattr(tokenizer, "deprecation_warnings", None)
        if isinstance(warned, dict):
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True


def prompt_length_note(pipe, prompts: list[str], max_sequence_length: int) -> Optional[str]:
    """One line on the prompts longer than what SD3's text encoders read (CLIP: 77 tokens, T5: max_sequence_length),
    or None if every prompt fits."""
    prompts, over = sorted(set(prompts)), []
    for name, tokenizer, limit in (("CLIP", pipe.tokenizer, pipe.tokenizer_max_length),
                                   ("T5", pipe.tokenizer_3, max_sequence_length)):  # fmt: skip
        if tokenizer is not None and prompts:
            lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
            longest = max(range(len(prompts)), key=lengths.__getitem__)
            n = sum(length > limit for length in lengths)
            if n:
                over.append(f"{n} of {len(prompts)} longer than {name}'s {limit} tokens (longest {lengths[longest]}: "
                            f"{prompts[longest][:40]!r}{'...' if len(prompts[longest]) > 40 else ''})")  # fmt: skip
    if not over:
        return None
    return f"prompts: {'; '.join(over)}. The text encoders read the first tokens only, as in the reference"
