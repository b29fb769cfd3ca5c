"""Where the GPU time of one GSM8K training step goes, kernel by kernel: torch.profiler over 10 steps of a method on
real packed batches (train.py's default batch of 16, max_len 512), eager and compiled, without the CUDA graph (whose
replay hides the kernels; the graph removes launch gaps, not kernel time). Kernels are grouped by what they do, with
their count and total time per step, next to the graphed step's GPU time for the same batches.

    python tools/profile_kernels.py OUT.json MODEL_DIR GSM8K_TRAIN.jsonl [method ...]
"""
import json
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from torch.profiler import ProfilerActivity, profile

import cli
import data
import runs
import step
from model import Llama, Tokenizer

GROUPS = (("attention", ("flash", "fmha", "attention", "cudnn", "efficient")),  # before gemm: fmha_cutlass...
          ("gemm", ("gemm", "sm90_xmma", "cutlass", "ampere", "sm80_", "nvjet", "splitk", "cublas")),
          ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "clip")),
          ("reduce", ("reduce", "norm", "softmax", "logsumexp")),
          ("copy/cast", ("copy", "cast", "convert", "cat", "index", "scatter", "gather", "fill", "memset", "memcpy")),
          ("elementwise", ("elementwise", "vectorized", "unrolled", "triton", "pointwise")))


def group(name):
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def main():
    out, path, train = sys.argv[1:4]
    methods = sys.argv[4:] or ["sb"]
    cli.device("cuda")
    tok = Tokenizer.from_pretrained(path)
    seqs, _ = data.tokenize(data.load_examples(train)[:2000], tok, data.TEMPLATE, 512)
    batch = lambda i: data.micro_batches(seqs, data.example_order(len(seqs), 0, i * 16, 16), 16, 512, tok.pad_id,
                                         True)
    res = {"device": f"{torch.cuda.get_device_name()}, torch {torch.__version__}"}
    for name in methods:
        for compiled in (False, True):
            torch._dynamo.reset()
            model = Llama.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
            m = runs.METHODS[name]
            cfg = m.Config()
            grads = step.gradient_init(model, m, cfg, seqs, SimpleNamespace(seed=0, batch_size=16, micro_batch_size=0, max_len=512), tok.pad_id) if m.GRADIENT_INIT else None
            m.apply(model, cfg, grads, first_lr=1e-4)
            if compiled:
                model.compile()
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            rec = {}
            for graphed in (True, False):
                opt = step.make_optimizer(params, step.OptimConfig(lr=1e-5), torch.device("cuda"), graphed)
                f = step.make_step(model, opt, params, 1.0, graphed)
                bs = [batch(i) for i in range(20)]
                for b, n, _ in bs[:5]:
                    f(b, n)
                torch.cuda.synchronize()
                if graphed:
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for b, n, _ in bs[5:]:
                        f(b, n)
                    e1.record()
                    torch.cuda.synchronize()
                    rec["graphed_ms_per_step"] = round(e0.elapsed_time(e1) / 15, 2)
                    continue
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for b, n, _ in bs[5:15]:
                        f(b, n)
                    torch.cuda.synchronize()
                groups = defaultdict(lambda: [0, 0.0])
                kernels = defaultdict(lambda: [0, 0.0])
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        t = e.device_time / 1e3 / 10  # ms per step
                        g = groups[group(e.name)]
                        g[0] += 1 / 10
                        g[1] += t
                        k = kernels[e.name[:90]]
                        k[0] += 1 / 10
                        k[1] += t
                rec["kernel_ms_per_step"] = round(sum(v[1] for v in groups.values()), 2)
                rec["kernels_per_step"] = round(sum(v[0] for v in groups.values()))
                rec["groups"] = {g: dict(n=round(v[0]), ms=round(v[1], 2)) for g, v in
                                 sorted(groups.items(), key=lambda kv: -kv[1][1])}
                rec["top_kernels"] = [dict(name=k, n=round(v[0]), ms=round(v[1], 2), us_each=round(1e3 * v[1] / v[0], 1))
                                      for k, v in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]]
            res[f"{name}, {'compiled' if compiled else 'eager'}"] = rec
            print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "top_kernels"} if isinstance(v, dict) else v
                              for k, v in res.items()}), flush=True)
            del model, opt, f, params
            torch.cuda.empty_cache()
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
