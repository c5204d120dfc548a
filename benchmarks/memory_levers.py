"""What activation checkpointing (memory.activation_checkpointing) and LoRA adapters
(memory.lora) save and cost, per rank.

For each network, one training step of a student's regression loss (forward, backward, AdamW;
batch 32) is measured as it is, with the network recomputing its activations, and with rank-8
adapters on the family's default layers (its own weights frozen):
  held      bytes autograd holds from the forward for the backward, parameters left out
            (raydistill.models.memory.held_activation_bytes, the same on every device);
  state     bytes of the weights, gradients and AdamW moments the step leaves (each storage
            once): what adapters cut;
  peak      on CUDA, the allocator's peak over the step (weights and gradients included);
  step      seconds per step (median of `--steps` after one warm-up), and its ratio to the
            plain step.
Networks (random weights):
  smoke     the smoke teacher's UNet (16 channels, [1, 2]) at 16x16;
  digits    the digits teacher's UNet (32 channels, [1, 2]) at 16x16;
  sd-block  a diffusers UNet2DConditionModel with SD-1.5's block types and attention layout at
            small width (32, 64, 64 channels, 8 heads, 77 text tokens of width 128), 32x32 latents.
Rounds repeat the whole measurement; the summary is the median and range over rounds. Prints one
line per network and round and writes JSON (default benchmarks/results/memory_levers.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _record import spread, write_record

from raydistill.config import DiffusersConfig, LoraConfig, ModelConfig, ScheduleConfig, UNetConfig
from raydistill.models.checkpoint import build_network
from raydistill.models.lora import add_adapters
from raydistill.models.memory import checkpoint_activations, held_activation_bytes

BATCH = 32
LORA_RANK = 8
TEXT_TOKENS, TEXT_WIDTH = 77, 128


def unet(channels: int) -> ModelConfig:
    return ModelConfig(kind="unet", unet=UNetConfig(
        in_channels=1, resolution=16, base_channels=channels, channel_mult=[1, 2],
        num_res_blocks=1, attention_resolutions=[], num_classes=10))


def sd_block() -> ModelConfig:
    blocks = (32, 64, 64)
    return ModelConfig(kind="diffusers", prediction="eps",
                       schedule=ScheduleConfig(kind="scaled_linear"),
                       diffusers=DiffusersConfig(
                           model_class="UNet2DConditionModel", text_length=TEXT_TOKENS,
                           unet={"sample_size": 32, "in_channels": 4, "out_channels": 4,
                                 "block_out_channels": list(blocks), "layers_per_block": 2,
                                 "cross_attention_dim": TEXT_WIDTH, "attention_head_dim": 8,
                                 "norm_num_groups": 32,
                                 "down_block_types": ["CrossAttnDownBlock2D",
                                                      "CrossAttnDownBlock2D", "DownBlock2D"],
                                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D",
                                                    "CrossAttnUpBlock2D"]}))


NETWORKS = {"smoke": lambda: unet(16), "digits": lambda: unet(32), "sd-block": sd_block}


def inputs(config: ModelConfig, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(0)
    shape = (4, 32, 32) if config.kind == "diffusers" else (1, 16, 16)
    z = torch.randn(BATCH, *shape, generator=g)
    cond = {"c": torch.arange(BATCH) % 10}
    if config.kind == "diffusers":
        cond = {"c": torch.zeros(BATCH, dtype=torch.long),
                "encoder_hidden_states": torch.randn(BATCH, TEXT_TOKENS, TEXT_WIDTH, generator=g)}
    cond = {key: value.to(device) for key, value in cond.items()}
    return z.to(device), torch.rand(BATCH, generator=g).to(device), cond, \
        torch.randn(BATCH, *shape, generator=g).to(device)


def state_bytes(network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [p for p in network.parameters()] + [p.grad for p in network.parameters()
                                                   if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values()
                if torch.is_tensor(v) and v.dim() > 0]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors}.values())


def measure(name: str, lever: str, steps: int, device: torch.device) -> dict:
    config = NETWORKS[name]()
    network = build_network(config)
    if lever == "recomputed":
        checkpoint_activations(network, name)
    if lever == "lora":
        add_adapters(network, name, LoraConfig(rank=LORA_RANK), config.kind)
    network.to(device).train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-6)
    z, t, cond, target = inputs(config, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        (network(z, t, cond).float() - target).square().mean().backward()
        optimizer.step()

    held = held_activation_bytes(lambda: network(z, t, cond), network)
    step()                                                      # warm-up; gradients allocated
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"held_bytes": held, "state_bytes": state_bytes(network, optimizer),
              "step_s": statistics.median(times)}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "memory_levers.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rounds: dict[str, list] = {name: [] for name in args.networks}
    for index in range(args.rounds):
        for name in args.networks:
            held, recomputed, lora = (measure(name, lever, args.steps, device)
                                      for lever in ("held", "recomputed", "lora"))
            row = {"held": held, "recomputed": recomputed, "lora": lora,
                   "held_ratio": recomputed["held_bytes"] / held["held_bytes"],
                   "time_ratio": recomputed["step_s"] / held["step_s"],
                   "lora_state_ratio": lora["state_bytes"] / held["state_bytes"],
                   "lora_time_ratio": lora["step_s"] / held["step_s"]}
            rounds[name].append(row)
            peak = (f"; peak {held['peak_bytes'] / 2**20:.1f} -> "
                    f"{recomputed['peak_bytes'] / 2**20:.1f} MiB" if "peak_bytes" in held else "")
            print(f"round {index} {name}: held for backward {held['held_bytes'] / 2**20:.2f} -> "
                  f"{recomputed['held_bytes'] / 2**20:.2f} MiB ({row['held_ratio']:.2f}x){peak}; "
                  f"step {held['step_s'] * 1e3:.1f} -> {recomputed['step_s'] * 1e3:.1f} ms "
                  f"({row['time_ratio']:.2f}x); with LoRA state {held['state_bytes'] / 2**20:.2f} "
                  f"-> {lora['state_bytes'] / 2**20:.2f} MiB ({row['lora_state_ratio']:.2f}x), "
                  f"step {lora['step_s'] * 1e3:.1f} ms ({row['lora_time_ratio']:.2f}x)")
    summary = {name: {key: spread(row[key] for row in rows)
                      for key in ("held_ratio", "time_ratio", "lora_state_ratio",
                                  "lora_time_ratio")}
               for name, rows in rounds.items()}
    for name, figures in summary.items():
        held, time_ = figures["held_ratio"], figures["time_ratio"]
        state, lora_time = figures["lora_state_ratio"], figures["lora_time_ratio"]
        print(f"{name}, median (range) of {args.rounds} rounds on {device.type}: activation "
              f"checkpointing holds {held['median']:.2f}x ({held['min']:.2f}..{held['max']:.2f}) "
              f"the bytes for backward, at {time_['median']:.2f}x ({time_['min']:.2f}.."
              f"{time_['max']:.2f}) the step time; rank-{LORA_RANK} LoRA keeps "
              f"{state['median']:.2f}x ({state['min']:.2f}..{state['max']:.2f}) the state, at "
              f"{lora_time['median']:.2f}x ({lora_time['min']:.2f}..{lora_time['max']:.2f}) the "
              f"step time")
    write_record(args.out, {"benchmark": "memory_levers", "batch": BATCH, "device": device.type,
                            "rounds": rounds, "summary": summary})


if __name__ == "__main__":
    main()
