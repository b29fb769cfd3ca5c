"""
A 4-bit frozen base: QLoRA's NormalFloat-4 (Dettmers et al., 2023, arXiv 2305.14314), in plain PyTorch.

Every block of 64 consecutive weights (row-major) is stored as 64 four-bit codes and the block's absmax:

    w ~= absmax(block) * NF4[code],        code = the NF4 value nearest to w / absmax(block)

NF4 holds 16 values in [-1, 1] with an exact 0: 8 quantiles of N(0, 1) for the positive half and 7 for the negative,
taken between probability 0.5 and `OFFSET` = 0.9677 (the mean of the two highest quantiles of the 15/16-point
grids) and normalised by the largest; with normally distributed weights each code is about equally likely. So
a weight costs 4 bits plus 32/64 for the fp32 absmax: 4.5 bits (QLoRA's second quantisation of the absmax values
to 8 bits, 4.127 bits in all, is not done here). Llama-2-7B's linear weights: 3.8 GB instead of 13.0 GB in bf16.

`NF4Tensor` is a frozen weight that looks like a (d_out, d_in) tensor of the compute dtype: any operation on it
dequantizes it first, on the fly, so model.adapted_linear, every method's forward and merge, autograd (which saves
the 4-bit tensor itself for the backward, not a dequantized copy) and torch.compile see an ordinary weight, and
the method files do not change. Only the frozen base is 4-bit; adapters stay fp32.

    model = Llama.from_pretrained(path, device="cuda", dtype=torch.bfloat16, base_bits=4)
"""
import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from cli import UserError

BLOCK = 64  # weights per absmax (QLoRA's)
OFFSET = 0.9677083  # the highest quantile's probability (QLoRA / bitsandbytes): (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


def nf4_values():
    """The 16 NF4 values, ascending, in fp32: from the normal quantile function (torch.special.ndtri)."""
    pos = torch.special.ndtri(torch.linspace(OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (v / v.abs().max()).float()  # (16,): -1 ... 0 ... 1


NF4 = nf4_values()
_TABLES = {}


def table(device):
    """NF4 on `device`, copied there once: a copy from the CPU cannot happen inside a CUDA graph's capture (the
    warm-up before it makes the copy)."""
    if device not in _TABLES:
        _TABLES[device] = NF4.to(device)
    return _TABLES[device]


def quantize(w):
    """(packed codes (n/2,) uint8, absmax (n/64,) fp32) of a weight whose size is a multiple of 64."""
    blocks = w.detach().float().reshape(-1, BLOCK)  # (n/64, 64)
    absmax = blocks.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero block stays zero
    values = table(w.device)
    mid = (values[1:] + values[:-1]) / 2  # (15,): the boundaries between neighbouring codes
    codes = torch.bucketize(blocks / absmax[:, None], mid).to(torch.uint8).flatten()  # (n,) in 0..15
    return codes[0::2] << 4 | codes[1::2], absmax


def dequantize(packed, absmax, shape, dtype):
    codes = torch.stack([packed >> 4, packed & 15], -1).flatten().int()  # (n,)
    w = table(packed.device)[codes].view(-1, BLOCK) * absmax[:, None]  # (n/64, 64) fp32
    return w.view(shape).to(dtype)


class NF4Tensor(torch.Tensor):
    """A frozen (d_out, d_in) weight held in NF4; it reports `dtype` (the compute dtype) and dequantizes to it for
    any operation. detach and device moves keep it 4-bit; a dtype change gives the dequantized tensor in that dtype."""

    @staticmethod
    def __new__(cls, packed, absmax, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device)

    def __init__(self, packed, absmax, shape, dtype):
        self.packed, self.absmax = packed, absmax

    def dequantize(self):
        return dequantize(self.packed, self.absmax, self.shape, self.dtype)

    def __repr__(self):
        return f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __tensor_flatten__(self):  # torch.compile traces through it
        return ["packed", "absmax"], (self.shape, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return NF4Tensor(inner["packed"], inner["absmax"], *meta)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        t = args[0] if args else None
        if func in (aten.detach.default, aten.alias.default):
            return NF4Tensor(t.packed, t.absmax, t.shape, t.dtype)
        if func is aten.clone.default:  # copy.deepcopy of a model
            return NF4Tensor(t.packed.clone(), t.absmax.clone(), t.shape, t.dtype)
        if func is aten._to_copy.default and kwargs.get("dtype", t.dtype) == t.dtype:  # a device move
            dev = kwargs.get("device", t.device)
            return NF4Tensor(t.packed.to(dev), t.absmax.to(dev), t.shape, t.dtype)
        unwrap = lambda a: a.dequantize() if isinstance(a, NF4Tensor) else a
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def quantize_weight(w, dtype):
    """An NF4 Parameter (frozen) for the weight w, reporting the compute dtype."""
    if w.numel() % BLOCK:
        raise UserError(f"--base_bits 4: a weight of {tuple(w.shape)} is not a whole number of {BLOCK}-weight NF4 "
                        f"blocks; use --base_bits 16 for this model")
    return nn.Parameter(NF4Tensor(*quantize(w), w.shape, dtype), requires_grad=False)


def is_quantized(name):
    """The weights a 4-bit base stores in NF4: every nn.Linear weight inside the transformer blocks (QLoRA's choice);
    the embeddings, norms and lm_head stay in the base dtype."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")
