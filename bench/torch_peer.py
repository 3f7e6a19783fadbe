"""The PyTorch peer of DESIGN.md: diffusers UNet3DConditionModel, SD 1.5-sized (1.40 B params), 9 input channels,
bf16 autocast + SDPA, fused AdamW, full fine-tune; and its sampling loop (UNet calls + DDIM scheduler).

  python bench/torch_peer.py train --batch=4 --latent=32 [--frames=16] [--trainable=all|paper]
                               [--compile=full|regional] --out=r.jsonl
  python bench/torch_peer.py sample --latent=64 --steps=25 [--compile=regional] --out=r.jsonl

--trainable=paper trains what AtomoVideo trains (the temporal layers and conv_in: diffusers' `temp_convs`,
`temp_attentions`, `transformer_in`, `conv_in`); the rest is frozen (no gradients, no optimizer state).

FLOPs are counted with torch's FlopCounterMode (matmul + conv + SDPA, forward + backward) on one step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import gate  # noqa: E402

CONTEXT = 93
# The paper's trainable set in diffusers' UNet3DConditionModel names (ours: temp_convs, motion_modules, conv_in).
PAPER_TRAINABLE = ("temp_convs", "temp_attentions", "transformer_in", "conv_in")


def build_unet() -> torch.nn.Module:
    from diffusers import UNet3DConditionModel
    return UNet3DConditionModel(in_channels=9, out_channels=4, cross_attention_dim=768, attention_head_dim=8)


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def pipelined(fn, n: int) -> list[float]:
    """Per-step times as training runs them: CUDA events between consecutive steps, nothing waited for between them
    (the measure bench/jax_bench.py's `pipelined` takes on its side)."""
    events = []
    for _ in range(n + 1):
        fn()
        events.append(torch.cuda.Event(enable_timing=True))
        events[-1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


def compile_regionally(unet: torch.nn.Module) -> None:
    """diffusers' regional compilation: each repeated block compiled once and reused, minutes less to compile than
    the whole model (whole-model compiles outran 10-minute device calls, bench/NOTES.md)."""
    unet._repeated_blocks = ["BasicTransformerBlock", "ResnetBlock2D", "TemporalConvLayer"]
    # Blocks recur at several channel counts and sizes: one compile each (the default limit, 8, left the rest of
    # the blocks eager, bench/NOTES.md).
    torch._dynamo.config.recompile_limit = 64
    unet.compile_repeated_blocks()


def run_train(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    unet = build_unet().cuda().train()
    if args.trainable == "paper":
        for name, p in unet.named_parameters():
            p.requires_grad_(any(part in PAPER_TRAINABLE for part in name.split(".")))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    if args.compile == "regional":
        compile_regionally(unet)
    model = torch.compile(unet) if args.compile == "full" else unet
    b, lat, frames = args.batch, args.latent, args.frames
    g = torch.Generator(device="cuda").manual_seed(0)
    sample = torch.randn(b, 9, frames, lat, lat, device="cuda", generator=g)
    target = torch.randn(b, 4, frames, lat, lat, device="cuda", generator=g)
    context = torch.randn(b, CONTEXT, 768, device="cuda", generator=g)
    t = torch.randint(0, 1000, (b,), device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(sample, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    timed(step, args.warmup)  # compiles (whole model or each repeated block) on the first call
    warmup_s = time.perf_counter() - t0
    flops = None
    if args.count_flops:
        # After the warm-up and with compilation stood down: in call 7 (bench/NOTES.md) the blocks were first
        # called, and compiled, under FlopCounterMode and then ran at exactly the eager speed.
        from torch.utils.flop_counter import FlopCounterMode
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = unet(sample, t, encoder_hidden_states=context).sample
            F.mse_loss(pred.float(), target).backward()
        unet.zero_grad(set_to_none=True)
        flops = float(counter.get_total_flops())
    gate.compiled()
    gate.wait_turn()  # time only once no other benchmark process compiles or runs
    torch.cuda.reset_peak_memory_stats()  # the peak of the timed steps, not of compiling or counting
    times_sync = timed(step, args.iters)  # each step waited for
    times = pipelined(step, args.iters)
    med = statistics.median(times)
    impl = "torch_eager" if args.compile == "none" else f"torch_{args.compile}"
    return {"kind": "train", "impl": impl, "batch": b, "frames": frames, "latent": lat, "trainable": args.trainable,
            "s_per_step": med, "times": times,
            "s_per_step_sync": statistics.median(times_sync), "times_sync": times_sync, "warmup_s": warmup_s,
            "model_flops": flops,
            "tflops": flops / med / 1e12 if flops else None,
            "params": sum(p.numel() for p in unet.parameters()), "trainable_params": sum(p.numel() for p in trainable),
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "device": torch.cuda.get_device_name()}


@torch.no_grad()
def run_sample(args: argparse.Namespace) -> dict:
    from diffusers import DDIMScheduler
    torch.manual_seed(0)
    unet = build_unet().cuda().eval().to(torch.bfloat16)
    if args.compile == "regional":
        compile_regionally(unet)
    elif args.compile == "full":
        unet = torch.compile(unet)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                          clip_sample=False)
    lat, frames = args.latent, args.frames
    g = torch.Generator(device="cuda").manual_seed(0)
    cond = torch.randn(1, 5, frames, lat, lat, device="cuda", generator=g, dtype=torch.bfloat16)
    context = torch.randn(3, CONTEXT, 768, device="cuda", generator=g, dtype=torch.bfloat16)

    def video():
        sched.set_timesteps(args.steps)
        x = torch.randn(1, 4, frames, lat, lat, device="cuda", generator=g, dtype=torch.bfloat16)
        for t in sched.timesteps:
            inp = torch.cat([x, cond], dim=1).repeat(3, 1, 1, 1, 1)  # uncond / image / image+text
            out = unet(inp, t, encoder_hidden_states=context).sample
            u, i, it = out.chunk(3)
            guided = u + 2.0 * (i - u) + 7.5 * (it - i)
            x = sched.step(guided, t, x).prev_sample
        return x

    t0 = time.perf_counter()
    video()  # compiles each block on its first call when compiled
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    gate.compiled()
    gate.wait_turn()
    times = timed(video, args.iters)
    impl = "torch_eager" if args.compile == "none" else f"torch_{args.compile}"
    return {"kind": "sample", "impl": impl, "frames": frames, "latent": lat, "steps": args.steps, "guidance_batch": 3,
            "s_per_video": statistics.median(times), "times": times, "warmup_s": warmup_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "device": torch.cuda.get_device_name()}


def run_matmul(args: argparse.Namespace) -> dict:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a @ b
    times = timed(lambda: a @ b, 30)
    return {"kind": "matmul", "impl": "torch", "tflops": 2 * n ** 3 / statistics.median(times) / 1e12,
            "device": torch.cuda.get_device_name()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "sample", "matmul"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--trainable", choices=["all", "paper"], default="all")
    p.add_argument("--compile", choices=["none", "full", "regional"], default="none")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--count_flops", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    result = {"train": run_train, "sample": run_sample, "matmul": run_matmul}[args.what](args)
    result["args"] = vars(args)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("times", "args")}), flush=True)


if __name__ == "__main__":
    main()
