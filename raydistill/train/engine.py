"""One DeepSpeed engine per trainable module, built from the job's `deepspeed:` section.

Everything DeepSpeed-specific but checkpoint files lives here: the generated config, the CPU
start-up patch, the optimizer that skips non-finite gradients where DeepSpeed does not, reading
and setting full weights (from ZeRO-3 partitions and the optimizers' fp32 master copies), and the
student's EMA of those master copies (`checkpointer.py` saves and loads each engine's checkpoint).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from raydistill.config import OptimConfig, TrainJob
from raydistill.schedules import ema_decay, lr_factor


def deepspeed_config(job: TrainJob, world_size: int,
                     optim: OptimConfig | None = None) -> dict[str, Any]:
    """The DeepSpeed config for an engine whose module trains with `optim` (default: the job's);
    `deepspeed.extra` is merged in last, key by key."""
    ds, optim = job.deepspeed, optim or job.optim
    micro = job.micro_batch(world_size)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro * world_size * ds.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage, **offload(job)},
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)


def offload(job: TrainJob) -> dict[str, Any]:
    """ZeRO-Offload's keys (memory.offload_optimizer): the optimizer state in host memory, pinned
    where the workers have GPUs (faster copies to and from them)."""
    if not job.memory.offload_optimizer:
        return {}
    return {"offload_optimizer": {"device": "cpu", "pin_memory": job.workers.gpus > 0}}


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


def build_engine(module: nn.Module, job: TrainJob, optim: OptimConfig, world_size: int,
                 round_updates: int, on_cuda: bool,
                 lr_scales: dict[str, float] | None = None):
    """A DeepSpeed engine for `module` trained with `optim` (AdamW from torch, or DeepSpeed's CPU
    AdamW under memory.offload_optimizer; warm-up + cosine LR over `round_updates` of its own
    updates, restarting every round). `lr_scales`: the learning
    rate of the parameters under a submodule, as a multiple of optim.lr, by submodule name (e.g.
    DMD2's GAN head)."""
    import deepspeed

    if not on_cuda:
        _skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
    ds = job.deepspeed
    config = deepspeed_config(job, world_size, optim)
    adamw = {"lr": optim.lr, "betas": tuple(optim.betas), "weight_decay": optim.weight_decay}
    groups = param_groups(module, optim.lr, lr_scales or {})
    if job.memory.offload_optimizer:          # steps on the host, where ZeRO-Offload keeps it
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, **adamw, adamw_mode=True)
    elif ds.zero_stage > 0 or ds.precision != "fp32":
        optimizer = torch.optim.AdamW(groups, **adamw)
    else:       # FiniteAdamW clips with the norm it checks; DeepSpeed would compute it again
        optimizer = FiniteAdamW(groups, **adamw, max_norm=config["gradient_clipping"])
        config = {**config, "gradient_clipping": 0.0}
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step % round_updates, optim.warmup_steps, round_updates))
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                      config=config)
    if world_size == 1 and ds.zero_stage == 0:
        # One rank has nothing to all-reduce; DeepSpeed would still copy every gradient into a
        # flat buffer, "reduce" it and copy it back after each backward.
        engine.enable_backward_allreduce = False
    _link_unfused_masters(engine.optimizer)
    return engine


def param_groups(module: nn.Module, lr: float, scales: dict[str, float]) -> list[dict]:
    """The optimizer's parameter groups: the parameters under each submodule named in `scales`
    at lr x its scale, and the rest at lr (one group when there are no scales)."""
    named = dict(module.named_parameters())
    groups, rest = [], dict(named)
    for prefix, scale in scales.items():
        params = [p for name, p in named.items() if name.startswith(prefix + ".")]
        if not params:
            raise ValueError(f"no parameters under {prefix!r} to scale the learning rate of")
        groups.append({"params": params, "lr": lr * scale})
        rest = {name: p for name, p in rest.items() if not name.startswith(prefix + ".")}
    return [{"params": list(rest.values())}, *groups]


def evaluated_in_fp32(module: nn.Module) -> Callable[..., Tensor]:
    """`module` as a function computed in fp32: its floating weights and buffers upcast (fresh
    copies at each call, as every update changes them) and handed to torch.func.functional_call,
    so a bf16 module's arithmetic runs in fp32 while the module keeps its own tensors. The weights
    are the bf16 ones the module trains with (ZeRO 0-2 hold them whole on every rank)."""
    def call(*args: Any, **kwargs: Any) -> Tensor:
        tensors = {name: value.float() if value.is_floating_point() else value
                   for name, value in itertools.chain(module.named_parameters(),
                                                      module.named_buffers())}
        return torch.func.functional_call(module, tensors, args, kwargs)

    return call


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that clips gradients to `max_norm` (torch's clip_grad_norm_: the 2-norm of all of
    them, 0 for no clipping) and skips a step whose gradients are not all finite, saying so in
    `overflow`, which DeepSpeed reads: it counts the step in `skipped_steps` and holds the LR
    schedule. DeepSpeed's own optimizers (ZeRO 1-3, and any in bf16) check this themselves; at
    ZeRO-0 in fp32 it hands the step to the torch optimizer unchecked. Every rank sees the same
    all-reduced gradients, so all skip together. One host sync per update (to decide the skip),
    the norm computed once for the check and the clipping."""

    overflow = False

    def __init__(self, params, *, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            self.overflow = False
            return super().step(closure)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.overflow = not bool(torch.isfinite(norm))
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch._foreach_mul_(grads, (self.max_norm / (norm + 1e-6)).clamp(max=1.0))
        return super().step(closure)


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
    an fp32 master copy of (ZeRO 1-3, and bf16 at any ZeRO stage: see `fp32_master`) come from that
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



def master_fragments(module: nn.Module) -> dict[str, tuple[Tensor, int]]:
    """This rank's part of every parameter's fp32 master copy: name -> (a flat fp32 view into the
    optimizer's own storage, its offset in the flattened parameter). A ZeRO 1-2 partition, ZeRO-0
    bf16's linked copy, or at ZeRO-0 in fp32 the parameter itself; absent where this rank holds
    no part of the parameter. No copy, no collective."""
    fragments = {}
    for name, param in module.named_parameters():
        linked = getattr(param, UNFUSED_MASTER, None)
        if linked is not None:
            fragments[name] = (linked.view(-1), 0)
        elif hasattr(param, "ds_id"):
            raise ValueError("the fp32 master fragments of ZeRO-3 parameters are not supported")
        elif hasattr(param, "_hp_mapping"):
            if param._hp_mapping is not None:
                fragments[name] = (param._hp_mapping.hp_fragment,
                                   param._hp_mapping.lp_fragment_address.start)
        else:
            fragments[name] = (param.detach().view(-1), 0)
    return fragments


class StudentEMA:
    """An fp32 exponential moving average of the student's fp32 master weights (what the saved
    student is made of), kept as this rank's fragments of them: no copy of what other ranks hold,
    no collective per step. Gathered in full only to be saved (ZeRO 0-2)."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.reset()

    def reset(self) -> None:
        self.shadow = {name: fragment.detach().clone()
                       for name, (fragment, _) in master_fragments(self.module).items()}
        self._follow()

    def _follow(self) -> None:
        """Pair each average with the fragment it follows, once: views into storage the optimizer
        keeps for the whole run, so that `update` is one foreach call."""
        fragments = master_fragments(self.module)
        self._pairs = ([self.shadow[name] for name in fragments],
                       [fragment for fragment, _ in fragments.values()])

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Update number `step` since the average was reset, warmed up (see ema_decay): the
        student starts as its teacher, and the average must not stay there."""
        if self._pairs[0]:              # a ZeRO rank may hold no part of any parameter
            torch._foreach_lerp_(*self._pairs, 1.0 - ema_decay(self.decay, step))

    def state_dict(self) -> dict[str, Tensor]:
        """The module's state dict, fp32 on the CPU, with the averages in place of its parameters.
        A collective under ZeRO 1-2: every rank must call it."""
        import deepspeed.comm as ds_comm

        state = {n: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
                 .clone() for n, v in self.module.state_dict().items()}
        offsets = {name: offset for name, (_, offset) in master_fragments(self.module).items()}
        for name, param in self.module.named_parameters():
            full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            if name in self.shadow:
                part = self.shadow[name]
                full.narrow(0, offsets[name], part.numel()).copy_(part)
            if hasattr(param, "_hp_mapping"):       # partitioned: the other ranks hold the rest
                ds_comm.all_reduce(full, group=param._dp_group)
            state[name] = full.reshape(param.shape).cpu()
        return state

    @torch.no_grad()
    def load(self, full: dict[str, Tensor]) -> None:
        """Take this rank's fragments of full averages (as `state_dict` gives), in place."""
        for name, (fragment, offset) in master_fragments(self.module).items():
            self.shadow[name].copy_(full[name].reshape(-1)[offset:offset + fragment.numel()])
        self._follow()


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (a frozen network on this rank)."""
    return _storage_bytes([*module.parameters(), *module.buffers()])


def state_bytes(engine, device_type: str | None = None) -> int:
    """Model + optimizer state this rank holds for an engine: its parameters (its ZeRO-3
    partition), the fp32 master partition ZeRO keeps, and the optimizer's moments (distinct
    storages counted once; the moments exist from the first update); with `device_type`, only
    what lies on that kind of device (e.g. "cpu": what ZeRO-Offload keeps in host memory)."""
    tensors = [getattr(p, "ds_tensor", p.data) for p in engine.module.parameters()]
    optimizer = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",   # ZeRO 1-3
                 "fp32_groups"):                          # DeepSpeed's own bf16 optimizer, ZeRO-0
        for group in getattr(optimizer, name, []) or []:
            tensors += group if isinstance(group, list) else [group]
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    if device_type is not None:
        tensors = [t for t in tensors if t.device.type == device_type]
    return _storage_bytes(tensors)
