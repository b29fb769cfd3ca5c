"""Where the GPU time of bench.py's synthetic step goes, kernel by kernel: the step exactly as `bench.py --compile`
builds it (random weights at a shape of bench.SHAPES, batch x seq random tokens, compiled blocks), without the CUDA
graph (whose replay would hide the kernels; it removes launch gaps, not kernel time), under torch.profiler. Kernels
are grouped as tools/profile_kernels.py groups them; the GEMM group's rate counts the step's matmul FLOPs (bench.py's
4N or 6N per token, attention excluded) over the GEMM kernels' time, against the ~790 TFLOP/s an 8192^3 bf16 GEMM
reaches on the H200.

    python tools/profile_bench.py OUT.json SHAPE METHOD [METHOD ...]     # e.g. llama-3.2-1b lora sb full
"""
import json
import os
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from torch.profiler import ProfilerActivity, profile

import bench
import cli
import step
from profile_kernels import group
from runs import METHODS

BATCH, SEQ, WARMUP, STEPS = 8, 1024, 3, 5


def profile_method(shape, name, device):
    cfg, method = bench.SHAPES[shape], METHODS[name]
    mcfg = method.Config()
    ocfg = step.OptimConfig(lr=method.DEFAULT_LR)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    model = bench.build(cfg, device, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(0, cfg.vocab_size, (SEQ + 1,), generator=g).tolist(), 1)
            for _ in range(mcfg.init_samples if method.GRADIENT_INIT else 0)]
    icfg = SimpleNamespace(seed=0, batch_size=BATCH, micro_batch_size=BATCH, max_len=SEQ + 1)
    step.init_method(model, method, mcfg, seqs, icfg, 0, step.get_lr(0, ocfg, WARMUP + STEPS))
    model.compile()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = step.make_optimizer(params, ocfg, device, False)
    train_step = step.make_step(model, opt, params, ocfg.grad_clip, False)
    data = bench.random_batches(WARMUP + STEPS, BATCH, SEQ, cfg.vocab_size, device, 0)
    n_tgt = BATCH * SEQ
    for b in data[:WARMUP]:
        train_step([b], n_tgt)
    torch.cuda.synchronize()
    t0 = time.time()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for b in data[WARMUP:]:
            train_step([b], n_tgt)
        torch.cuda.synchronize()
    wall_ms = (time.time() - t0) * 1e3 / STEPS  # with the profiler's overhead: the kernels' sum is the number to read
    groups, kernels = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = e.device_time / 1e3 / STEPS  # ms per step
            for d, key in ((groups, group(e.name)), (kernels, e.name[:90])):
                d[key][0] += 1 / STEPS
                d[key][1] += t
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * SEQ
    gemm_flops = (bench.flops_per_token(cfg, SEQ, name == "full") - attn) * n_tgt
    gemm_ms = groups["gemm"][1]
    kernel_ms = sum(v[1] for v in groups.values())
    rec = dict(shape=shape, method=name, batch=BATCH, seq=SEQ, kernel_ms_per_step=round(kernel_ms, 2),
               wall_ms_per_step_profiled=round(wall_ms, 2), kernels_per_step=round(sum(v[0] for v in groups.values())),
               gemm_tflops=round(gemm_flops / gemm_ms / 1e9, 1) if gemm_ms else None,
               gemm_bound_tok_s=round(n_tgt / (gemm_flops / 790e12)),  # every matmul at 790 TFLOP/s, nothing else
               groups={k: dict(n=round(v[0]), ms=round(v[1], 2), pct=round(100 * v[1] / kernel_ms, 1))
                       for k, v in sorted(groups.items(), key=lambda kv: -kv[1][1])},
               top_kernels=[dict(name=k, n=round(v[0]), ms=round(v[1], 2)) for k, v in
                            sorted(kernels.items(), key=lambda kv: -kv[1][1])[:20]])
    del model, opt, train_step, params
    return rec


def main():
    out, shape, *methods = sys.argv[1:]
    device = cli.device("cuda")
    res = dict(device=f"{torch.cuda.get_device_name()}, torch {torch.__version__}", rows=[])
    for name in methods:
        rec = profile_method(shape, name, device)
        res["rows"].append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "top_kernels"}), flush=True)
        json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
