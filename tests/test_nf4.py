"""The 4-bit base (nf4.py): the NF4 table from its closed form, the round trip, every adapter method on a 4-bit base
equal to the same adapter on the dequantized base (forward, gradients, merge), and a 4-bit run that resumes exactly
and exports."""
import json
import os

import pytest
import torch

import nf4
import runs
from cli import UserError
from conftest import script
from model import Llama

train = script("train")

# QLoRA's NF4 values as bitsandbytes ships them (functional.py's NF4 table): independent of our closed form
PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_table_is_the_closed_form():
    v = nf4.nf4_values()
    assert torch.allclose(v, torch.tensor(PUBLISHED), atol=3e-7, rtol=0)
    assert v[7] == 0 and v[0] == -1 and v[-1] == 1 and (v[1:] > v[:-1]).all()  # exact 0 and ends, ascending
    # each positive value is the normal quantile at its grid point over the top one: Phi^-1(p_i) / Phi^-1(OFFSET)
    p = torch.linspace(nf4.OFFSET, 0.5, 9, dtype=torch.float64)[:-1]
    normal = torch.distributions.Normal(0.0, 1.0)
    ref = normal.icdf(p) / normal.icdf(torch.tensor(nf4.OFFSET, dtype=torch.float64))
    assert torch.allclose(v[8:].double().flip(0), ref, atol=1e-6)


def test_nf4_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.02
    w[3, 5] = 0.4  # an outlier: its block's scale follows it
    w[10, :64] = 0  # an all-zero block stays zero
    packed, absmax = nf4.quantize(w)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2 and absmax.numel() == w.numel() // 64
    got = nf4.dequantize(packed, absmax, w.shape, torch.float32)
    # the reference: per 64-weight block, the NF4 value nearest to w / absmax (brute force in fp64), times absmax
    blocks = w.double().view(-1, 64)
    amax = blocks.abs().amax(1, keepdim=True)
    norm = blocks / amax.clamp(min=1e-300)
    nearest = torch.tensor(PUBLISHED, dtype=torch.float64)[(norm[..., None] - torch.tensor(
        PUBLISHED, dtype=torch.float64)).abs().argmin(-1)]
    ref = (nearest * amax).view(w.shape)
    assert torch.allclose(got.double(), ref, atol=1e-7, rtol=0)
    assert torch.all(got[10, :64] == 0) and got[3, 5] == pytest.approx(0.4)  # the absmax itself is exact
    half_gap = max(b - a for a, b in zip(PUBLISHED, PUBLISHED[1:])) / 2
    assert ((got - w).abs().view(-1, 64) <= half_gap * amax.float() + 1e-7).all()
    on_grid = nf4.NF4.repeat(4).view(1, 64) * 0.3  # values on the grid come back exactly
    assert torch.equal(nf4.dequantize(*nf4.quantize(on_grid), on_grid.shape, torch.float32), on_grid)


def dequantized_copy(model4):
    """The same model with every NF4 weight replaced by its dequantized fp32 tensor."""
    import copy
    m = copy.deepcopy(model4)
    for mod in m.modules():
        if isinstance(getattr(mod, "weight", None), nf4.NF4Tensor):
            mod.weight = torch.nn.Parameter(mod.weight.dequantize(), requires_grad=False)
    return m


CASES = {"lora": {"rank": 4}, "xs": {"rank": 4}, "sb": {"rank": 4}, "ga": {"rank": 4},
         "bone": {"block_size": 16}, "bone-shared": {"block_size": 16, "bone_variant": "shared"},
         "dylora": {"rank": 8}}


@pytest.mark.parametrize("name", list(CASES))
def test_4bit_base_equals_adapter_on_dequantized_base(tiny_dir, name):
    method = runs.METHODS[name.split("-")[0]]
    cfg = method.Config(**CASES[name])
    model4 = Llama.from_pretrained(tiny_dir, dtype=torch.float32, base_bits=4)
    assert all(isinstance(model4.get_parameter(n), nf4.NF4Tensor) == nf4.is_quantized(n)
               for n, _ in model4.named_parameters())
    dense = dequantized_copy(model4)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, 1)
    grads = None
    if method.GRADIENT_INIT:  # the init gradient itself, through the 4-bit weights (dense gradients)
        import step
        batches = [(x, y, torch.arange(24).expand(2, 24))]
        g4 = step.init_grads(model4, batches, cfg.targets)
        gd = step.init_grads(dense, batches, cfg.targets)
        assert all(torch.allclose(g4[k], gd[k], atol=1e-6) for k in g4)
        grads = g4
    for m in (model4, dense):
        method.apply(m, cfg, dict(grads) if grads else None, first_lr=1e-3)  # apply may consume the dict
    sd = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) * 0.05
          for k, v in method.adapter_state_dict(model4).items()}  # a trained-looking adapter (B != 0)
    for m in (model4, dense):
        method.load_adapter_state_dict(m, sd)
        m.train()
    loss4, lossd = model4(x, y)[1], dense(x, y)[1]
    assert torch.allclose(loss4, lossd, atol=1e-6)
    loss4.backward()
    lossd.backward()
    p4 = dict((n, p) for n, p in model4.named_parameters() if p.requires_grad)
    pd = dict((n, p) for n, p in dense.named_parameters() if p.requires_grad)
    assert p4.keys() == pd.keys() and p4
    assert all(torch.allclose(p4[n].grad, pd[n].grad, atol=1e-6) for n in p4)
    with torch.no_grad():
        method.merge(model4)
        method.merge(dense)
        assert torch.allclose(model4(x)[0], dense(x)[0], atol=1e-5)


def run(tmp_path, tiny_dir, gsm_file, *extra, name="run"):
    return train.main(["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4", "--max_len",
                       "384", "--out_dir", str(tmp_path), "--run_name", name, "--log_every", "1", "--device", "cpu",
                       "--base_bits", "4", *extra])


def test_4bit_run_resumes_exactly_and_exports(tmp_path, tiny_dir, gsm_file):
    from safetensors.torch import load_file
    common = ["--method", "sb", "--rank", "4", "--init_samples", "8", "--lr", "1e-2", "--save_every", "2"]
    run(tmp_path, tiny_dir, gsm_file, *common, "--max_steps", "4", name="straight")
    run(tmp_path, tiny_dir, gsm_file, *common, "--max_steps", "2", name="cut")
    cfg = json.load(open(tmp_path / "cut" / "config.json"))
    cfg["train"]["max_steps"] = 4  # as if the run had been meant to go on
    json.dump(cfg, open(tmp_path / "cut" / "config.json", "w"))
    train.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "cut", "--max_steps", "4", "--export", "merged"])
    a, b = (load_file(os.path.join(tmp_path, n, "adapter.safetensors")) for n in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "cut" / "adapter.json"))["base_bits"] == 4
    # the merged export is the model as trained: the 4-bit base dequantized, the update added
    trained = runs.load_trained(str(tmp_path / "cut"), tiny_dir, "cpu", torch.float32)
    merged = Llama.from_pretrained(str(tmp_path / "cut" / "merged"), dtype=torch.float32)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(trained(x)[0], merged(x)[0], atol=1e-4)


def test_4bit_refusals(tmp_path, tiny_dir, gsm_file):
    with pytest.raises(UserError, match="cannot be 4-bit"):
        run(tmp_path, tiny_dir, gsm_file, "--method", "full", "--max_steps", "1")
    with pytest.raises(UserError, match="--base_bits must be 4"):
        run(tmp_path, tiny_dir, gsm_file, "--method", "lora", "--max_steps", "1", "--base_bits", "8")
