"""GPU (CUDA) check of the precision policy, run by hand on a GPU machine: python tests/gpu_precision_check.py OUT.json
(1) an adapter output added by model.adapted_linear is rounded once with the product (regression coefficient of the
kept part on the exact one: 1 when kept, 0 when rounded away), eager and compiled, and its gradients are a plain
linear's; (2) the cost of that and of Bone's separate Delta W GEMM, forward + backward over 8192 tokens."""
import json, sys, time, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
from model import adapted_linear
import bone, lora
dev = "cuda"; out = {}
torch.manual_seed(0)
x = torch.randn(8192, 2048, device=dev).bfloat16()
W = (0.02 * torch.randn(2048, 2048, device=dev)).bfloat16()
d = 1e-5 * torch.randn(8192, 2048, device=dev)
acc = x.float() @ W.float().t()
def coef(y): e = y.float() - acc; return round(float((e * d).sum() / (d * d).sum()), 4)
with torch.autocast("cuda", dtype=torch.bfloat16):
    out["coef_add_after"] = coef(F.linear(x, W) + d.bfloat16())
    out["coef_adapted_linear_eager"] = coef(adapted_linear(x, W, None, d.bfloat16()))
    print(out, flush=True)
    try:
        out["coef_adapted_linear_compiled"] = coef(torch.compile(adapted_linear)(x, W, None, d.bfloat16()))
    except Exception as e:
        out["compiled_error"] = str(e)[:300]
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
out["coef_addmm_no_reduced_precision"] = coef(torch.addmm(d.bfloat16(), x, W.t()))
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
# gradients equal a plain linear's
xg = x[:256].clone().requires_grad_(True); dg = d[:256].clone().bfloat16().requires_grad_(True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    y = adapted_linear(xg, W, None, dg)
g = torch.randn_like(y); y.backward(g)
out["grad_x_err"] = float((xg.grad.float() - (g @ W).float()).abs().max()); out["grad_d_err"] = float((dg.grad - g).abs().max())
print(out, flush=True)
def timeit(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.time()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return round((time.time() - t) / n * 1e3, 3)
for d_in, d_out in [(2048, 8192), (576, 1536)]:
    base = nn.Linear(d_in, d_out, bias=False, device=dev).bfloat16().requires_grad_(False)
    b = bone.Linear(base, bone.Config(block_size=64), "x"); 
    with torch.no_grad(): b.bone_R.normal_(0, 1e-4)
    l = lora.Linear(base, lora.Config(rank=16), torch.Generator().manual_seed(0))
    xx = torch.randn(8192, d_in, device=dev).bfloat16().requires_grad_(True)
    def old_bone():
        Wb = bone.blocks(b.weight, 64); R = b.bone_R.to(torch.bfloat16)[:, None]
        return F.linear(xx, bone.unblocks(Wb + Wb @ R + R))
    def old_lora(): return F.linear(xx, l.weight) + l.scale * F.linear(F.linear(xx, l.lora_A), l.lora_B)
    def step(f):
        def g():
            with torch.autocast("cuda", dtype=torch.bfloat16): y = f()
            y.float().square().mean().backward()
        return g
    r = dict(bone_new=timeit(step(lambda: b(xx))), bone_old=timeit(step(old_bone)), lora_new=timeit(step(lambda: l(xx))),
             lora_old=timeit(step(old_lora)), plain=timeit(step(lambda: F.linear(xx, b.weight))))
    out[f"ms_fwd_bwd_{d_out}x{d_in}_8192tok"] = r; print(d_out, d_in, r, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(out)
