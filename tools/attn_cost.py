"""GPU time (forward + backward) of the attention of one training step on real packed GSM8K rows (16 examples, max_len
512, SmolLM2-135M's 9 query / 3 key-value heads of 64), per layer, by how the per-example (document) mask is done:
SDPA with a dense boolean mask (train.py's path on a CPU, and on the GPU before model.FlashVarlen), model.py's
FlashVarlen (train.py's GPU path: aten's varlen FlashAttention with doc_bounds's fixed number K of boundaries; also
at other K, to show what the unused empty examples cost), torch's varlen_attn wrapper, FlexAttention with a block
mask, and plain causal SDPA over the whole row (bench.py's synthetic rows: a lower bound that ignores example
boundaries).

    python tools/attn_cost.py OUT.json MODEL_DIR GSM8K_TRAIN.jsonl
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import torch.nn.functional as F

import data
from model import Tokenizer


def timed(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return round(e0.elapsed_time(e1) / n * 1e3, 1)  # us


def main():
    out, path, train = sys.argv[1:4]
    tok = Tokenizer.from_pretrained(path)
    seqs, _ = data.tokenize(data.load_examples(train)[:2000], tok, data.TEMPLATE, 512)
    batches, _, _ = data.micro_batches(seqs, data.example_order(len(seqs), 0, 0, 16), 16, 512, tok.pad_id, True)
    x, y, pos = batches[0]
    pos = pos.cuda()
    B, T = pos.shape
    nh, nkv, hd = 9, 3, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h, n: torch.randn(n, h, hd, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    res = {"device": f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "rows": B, "T": T}
    res["real_tokens"] = sum(len(seqs[i][0]) for i in data.example_order(len(seqs), 0, 0, 16))

    q, k, v = mk(nh, B * T), mk(nkv, B * T), mk(nkv, B * T)
    qb, kb, vb = (t.detach().view(B, T, -1, hd).transpose(1, 2).requires_grad_() for t in (q, k, v))
    doc = (pos == 0).cumsum(1)
    mask = (doc[:, :, None] == doc[:, None, :]).tril()[:, None]  # (B, 1, T, T)
    go = torch.randn(B, nh, T, hd, device="cuda", dtype=torch.bfloat16)

    def dense():
        kk, vv = (t.repeat_interleave(nh // nkv, dim=1) for t in (kb, vb))
        F.scaled_dot_product_attention(qb, kk, vv, attn_mask=mask).backward(go)
    res["sdpa dense mask"] = timed(dense)

    def causal():
        F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True).backward(go)
    res["sdpa causal over the row (lower bound)"] = timed(causal)

    # varlen: every example's tokens end to end; padding slots form one more "example" (masked from the loss anyway)
    starts = (pos.flatten() == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([B * T], device="cuda")]).int()
    max_len = int((cu[1:] - cu[:-1]).max())
    try:
        from torch.nn.attention.varlen import varlen_attn
        gv = go.transpose(1, 2).reshape(B * T, nh, hd)

        import inspect
        params = inspect.signature(varlen_attn).parameters  # causal is window (-1, 0); 2.11 takes GQA as it is
        kw = dict(window_size=(-1, 0), **({"enable_gqa": True} if "enable_gqa" in params else {}))
        res["varlen signature"] = str(inspect.signature(varlen_attn))

        def varlen():
            varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw).backward(gv)
        res["varlen flash (examples end to end)"] = timed(varlen)
        # the same result as the dense mask?
        o1 = varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)
        kk, vv = (t.repeat_interleave(nh // nkv, dim=1) for t in (kb, vb))
        o2 = F.scaled_dot_product_attention(qb, kk, vv, attn_mask=mask).transpose(1, 2).reshape(B * T, nh, hd)
        res["varlen max abs diff vs dense"] = float((o1 - o2).abs().max())
    except Exception as e:
        res["varlen flash (examples end to end)"] = f"{type(e).__name__}: {str(e)[:200]}"

    from model import FlashVarlen, doc_bounds
    qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
    gf = go.transpose(1, 2).reshape(B * T, nh, hd).contiguous()
    docs = int((pos == 0).sum())
    res["examples (incl. empty rows)"] = docs
    res["ours: FlashVarlen, K from doc_bounds"] = [doc_bounds(pos).numel() - 1,
                                                   timed(lambda: FlashVarlen.apply(qf, kf, vf, doc_bounds(pos), T).backward(gf))]
    for K in (docs, B * T // 8, B * T):
        cu_k = torch.nonzero_static(pos.flatten() == 0, size=K + 1, fill_value=B * T).flatten().int()
        res[f"ours: FlashVarlen, K = {K}"] = timed(lambda: FlashVarlen.apply(qf, kf, vf, cu_k, T).backward(gf))
    kk, vv = (t.repeat_interleave(nh // nkv, dim=1) for t in (kb, vb))
    o1 = FlashVarlen.apply(q, k, v, doc_bounds(pos), T)  # (B*T, nh, hd)
    o2 = F.scaled_dot_product_attention(qb, kk, vv, attn_mask=mask).transpose(1, 2).reshape(B * T, nh, hd)
    real = (y.flatten() != -100).cuda()  # the tokens the loss reads (padding's outputs differ and are never read)
    res["ours max abs diff vs dense mask, target tokens"] = float((o1 - o2)[real].abs().max())
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        docf = doc

        def mod(b, h, qi, ki):
            return (docf[b, qi] == docf[b, ki]) & (ki <= qi)
        bm = create_block_mask(mod, B, None, T, T, device="cuda")
        flex = torch.compile(flex_attention)

        def fx():
            flex(qb, kb, vb, block_mask=bm, enable_gqa=True).backward(go)
        res["flex attention (block mask)"] = timed(fx)
    except Exception as e:
        res["flex attention (block mask)"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(json.dumps(res, indent=1))
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
