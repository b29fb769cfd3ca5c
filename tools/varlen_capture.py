"""Can packed rows' per-example attention be one CUDA graph with FlashAttention's varlen kernels? On random tensors
of SmolLM2-135M's attention shapes (8 rows of 512, 16 examples of 100-300 tokens, 9 query / 3 key-value heads of 64):
the aten varlen forward and backward captured in a CUDA graph (three capture modes), the same in an autograd.Function
with the example boundaries from torch.nonzero_static (fixed shapes) and its time per layer, and SDPA with the dense
per-example mask (cuDNN and memory-efficient backends) for comparison. Prints JSON.

    python tools/varlen_capture.py
"""
import json
import time
import traceback

import torch
import torch.nn.functional as F
torch.manual_seed(0)
R, T, nh, nkv, hd = 8, 512, 9, 3, 64
g = torch.Generator().manual_seed(0)
L = torch.randint(100, 300, (16,), generator=g).tolist()
rows = [[] for _ in range(R)]
for l in L:
    for r in rows:
        if sum(r) + l <= T: r.append(l); break
docs = []
for r in rows:
    docs += r
    if sum(r) < T: docs.append(T - sum(r))
starts = torch.tensor([0] + docs).cumsum(0)[:-1]
K = 16 + R
cu = torch.full((K + 1,), R * T, dtype=torch.int32); cu[:len(starts)] = starts.int(); cu = cu.cuda()
q = torch.randn(R * T, nh, hd, device="cuda", dtype=torch.bfloat16)
k = torch.randn(R * T, nkv, hd, device="cuda", dtype=torch.bfloat16)
v = torch.randn(R * T, nkv, hd, device="cuda", dtype=torch.bfloat16)
go = torch.randn(R * T, nh, hd, device="cuda", dtype=torch.bfloat16)
out = {}
def fwd():
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, T, T, 0.0, True, False)
def bwd(o, lse, rng, unused):
    return torch.ops.aten._flash_attention_backward(go, q, k, v, o, lse, cu, cu, T, T, 0.0, True, rng, unused)
try:
    o, lse, rng, unused, _ = fwd()
    out["rng types"] = [str(rng.device), str(rng.dtype), list(rng.shape), str(unused.device), list(unused.shape)]
    dq, dk, dv = bwd(o, lse, rng, unused)
    out["eager bwd"] = "ok"
except Exception:
    out["eager"] = traceback.format_exc()[-600:]
for mode in ("global", "thread_local", "relaxed"):
    for what in ("fwd", "bwd", "bwd zeros rng"):
        try:
            s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                o, lse, rng, unused, _ = fwd(); bwd(o, lse, rng, unused)
            torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr, capture_error_mode=mode):
                o, lse, rng, unused, _ = fwd()
                if what == "bwd":
                    bwd(o, lse, rng, unused)
                if what == "bwd zeros rng":
                    bwd(o, lse, torch.zeros(2, dtype=torch.uint64, device="cuda"), torch.empty(0, device="cuda"))
            gr.replay(); torch.cuda.synchronize()
            out[f"{mode} {what}"] = "ok"
        except Exception as e:
            out[f"{mode} {what}"] = f"{type(e).__name__}: {str(e)[:200]}"
            try: torch.cuda.synchronize()
            except Exception: pass
# cuDNN SDPA with boolean doc mask
try:
    from torch.nn.attention import sdpa_kernel, SDPBackend
    pos = torch.cat([torch.arange(d) for d in docs]).view(R, T).cuda()
    doc = (pos == 0).cumsum(1)
    mask = (doc[:, :, None] == doc[:, None, :]).tril()[:, None]
    qb, kb, vb = (t.view(R, T, -1, hd).transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    kk, vv = (t.repeat_interleave(3, 1) for t in (kb, vb))
    gb = go.view(R, T, nh, hd).transpose(1, 2)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(be):
                f = lambda: F.scaled_dot_product_attention(qb, kk, vv, attn_mask=mask).backward(gb, retain_graph=True)
                for _ in range(3): f()
                torch.cuda.synchronize(); t = time.perf_counter()
                for _ in range(50): f()
                torch.cuda.synchronize(); out[f"sdpa mask {name} us"] = (time.perf_counter() - t) / 50 * 1e6
        except Exception as e:
            out[f"sdpa mask {name}"] = f"{type(e).__name__}: {str(e)[:200]}"
except Exception:
    out["sdpa"] = traceback.format_exc()[-400:]
print(json.dumps(out, indent=1))
# our own autograd.Function over the aten ops, captured fwd+bwd with nonzero_static and _assert_async inside
out2 = {}
class Varlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, T):
        o, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, T, T, 0.0, True, False)
        ctx.save_for_backward(q, k, v, o, lse, cu, rng, unused)
        ctx.T = T
        return o
    @staticmethod
    def backward(ctx, g):
        q, k, v, o, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(g.contiguous(), q, k, v, o, lse, cu, cu, ctx.T, ctx.T, 0.0, True, rng, unused)
        return dq, dk, dv, None, None
pos = torch.cat([torch.arange(d) for d in docs]).view(R, T).cuda()
qp, kp, vp = (t.clone().requires_grad_() for t in (q, k, v))
def step():
    starts = torch.nonzero_static(pos.flatten() == 0, size=K, fill_value=R * T).flatten().int()
    torch._assert_async((pos == 0).sum() <= K, "too many examples")
    c = torch.cat([starts, starts.new_full((1,), R * T)])
    o = Varlen.apply(qp, kp, vp, c, T)
    o.backward(go)
    return o
for mode in ("global", "relaxed"):
    try:
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2): step()
        torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr, capture_error_mode=mode):
            o = step()
        gr.replay(); torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(100): gr.replay()
        torch.cuda.synchronize()
        out2[f"own Function {mode}"] = f"ok, {(time.perf_counter() - t) * 1e4:.1f} us fwd+bwd"
    except Exception as e:
        out2[f"own Function {mode}"] = f"{type(e).__name__}: {str(e)[:200]}"
        try: torch.cuda.synchronize()
        except Exception: pass
# PyTorch's own wrapper, torch.nn.attention.varlen.varlen_attn: forward, then forward + backward, captured
from torch.nn.attention.varlen import varlen_attn
qv, kv, vv = (t.clone().requires_grad_() for t in (q, k, v))
for fb in (False, True):
    try:
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                o = varlen_attn(qv, kv, vv, cu, cu, T, T, window_size=(-1, 0))
                o.backward(go) if fb else None
        torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            o = varlen_attn(qv, kv, vv, cu, cu, T, T, window_size=(-1, 0))
            o.backward(go) if fb else None
        out2["varlen_attn capture " + ("fwd+bwd" if fb else "fwd")] = "ok"
    except Exception as e:
        out2["varlen_attn capture " + ("fwd+bwd" if fb else "fwd")] = f"{type(e).__name__}: {str(e)[:120]}"
        try: torch.cuda.synchronize()
        except Exception: pass
print(json.dumps(out2, indent=1))
