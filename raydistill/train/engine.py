"""One DeepSpeed engine per trainable module, built from the job's `deepspeed:` section.

Everything DeepSpeed-specific but checkpoint files lives here: the generated config, the CPU
start-up patch, and reading and setting full weights, from ZeRO-3 partitions and the optimizers'
fp32 master copies (`loop.py` saves and loads each engine's checkpoint).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch import Tensor, nn

from raydistill.config import TrainJob
from raydistill.pretrain.teacher import lr_factor


def deepspeed_config(job: TrainJob, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one engine; `deepspeed.extra` is merged in last, key by key."""
    ds = job.deepspeed
    micro = job.optim.batch_size // (world_size * ds.grad_accum)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro * world_size * ds.grad_accum,
        "gradient_clipping": job.optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def _skip_cpu_shm_build() -> None:
    """On CPU, every deepspeed.initialize JIT-compiles the `deepspeed_shm_comm` op with g++ (about
    25 s, and a hard failure without a compiler). It only serves inference all-reduce, which training
    never uses, so its build is disabled before initialize. Only ever called on CPU workers."""
    import deepspeed.comm.torch  # noqa: F401  (the attribute path below binds the module itself)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def build_engine(module: nn.Module, job: TrainJob, world_size: int, round_steps: int,
                 on_cuda: bool):
    """A DeepSpeed engine (AdamW from torch, warm-up + cosine LR restarting every round)."""
    import deepspeed

    if not on_cuda:
        _skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
    optim = job.optim
    optimizer = torch.optim.AdamW(module.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step % round_steps, optim.warmup_steps, round_steps))
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                      config=deepspeed_config(job, world_size))
    _link_unfused_masters(engine.optimizer)
    return engine


# Attribute linking a parameter to its fp32 copy in DeepSpeed's ZeRO-0 bf16 optimizer.
UNFUSED_MASTER = "raydistill_fp32_master"


def _link_unfused_masters(optimizer) -> None:
    """At ZeRO-0 in bf16 DeepSpeed wraps the optimizer in FP16_UnfusedOptimizer, which keeps an
    fp32 copy of every parameter but not the `_hp_mapping` its ZeRO optimizers give parameters;
    link each copy to its parameter so that `fp32_master` finds it."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for low, full in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for param, master in zip(low, full):
                setattr(param, UNFUSED_MASTER, master)


def _set_fp32_master(param: nn.Parameter, value: Tensor) -> None:
    """Overwrite the optimizer's fp32 copy of a parameter, where it keeps one (no collective)."""
    from deepspeed.utils import safe_set_full_fp32_param

    linked = getattr(param, UNFUSED_MASTER, None)
    if linked is not None:
        linked.copy_(value)
    else:
        safe_set_full_fp32_param(param, value)


def fp32_master(param: nn.Parameter) -> Tensor | None:
    """The optimizer's full fp32 copy of a parameter, None if it keeps none (fp32 at ZeRO-0, or
    not an engine's). A collective under ZeRO 1-3: every rank must ask for the same parameters."""
    from deepspeed.utils import safe_get_full_fp32_param

    linked = getattr(param, UNFUSED_MASTER, None)
    return linked if linked is not None else safe_get_full_fp32_param(param)


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Full parameters inside the block (a collective on ZeRO-3: every rank must enter it)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The module's whole state dict as fp32 CPU tensors. Parameters an engine's optimizer keeps
    an fp32 master copy of (ZeRO 1-3, and bf16 at any stage: see `fp32_master`) come from that
    copy, not from the module's own, possibly bf16, weights. A collective under ZeRO: every rank
    must call it."""
    with gathered(module):
        state = {name: value.detach().to("cpu", torch.float32 if value.is_floating_point()
                                         else value.dtype).clone()
                 for name, value in module.state_dict().items()}
    for name, param in module.named_parameters():
        master = fp32_master(param)
        if master is not None:
            state[name] = master.detach().to("cpu", torch.float32).clone()
    return state


@torch.no_grad()
def load_full_weights(module: nn.Module, weights: dict[str, Tensor]) -> None:
    """Set an engine's parameters, and the optimizer's fp32 master copy of them, to full weights
    (ZeRO 0-2, where every rank holds whole parameters; no collective)."""
    for name, param in module.named_parameters():
        value = weights[name].to(param.device)
        param.copy_(value.to(param.dtype))
        _set_fp32_master(param, value.float())

