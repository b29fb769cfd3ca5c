import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import GSM8K, LLAMA2_SP, hf_tiny, needs_shared, write_bpe_tokenizer
from cli import UserError
import model as model_mod
from model import ChunkedCrossEntropy, Llama, ModelConfig, Tokenizer, generate

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
VARIANTS = {
    "llama": dict(arch="llama"),
    "llama-tied-llama3-headdim": dict(arch="llama", tie=True, head_dim=24, rope=LLAMA3_ROPE),
    "llama-linear-rope": dict(arch="llama", rope={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "qwen2": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tie=True),
    "mistral": dict(arch="mistral"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_with_transformers(name, tmp_path):
    hf = hf_tiny(**VARIANTS[name])
    hf.save_pretrained(tmp_path, max_shard_size="50KB")  # sharded, with an index
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert model.cfg.tie_embeddings == hf.config.tie_word_embeddings
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, 128, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = hf(x).logits, model(x)[0]
    assert ref.std() > 1.0  # decisive logits, so the comparison can fail
    assert (ref - out).abs().max() < 1e-4
    prompt = x[:1, :7]
    hf.generation_config.eos_token_id = None  # generate exactly 32 tokens on both sides
    ref_ids = hf.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ref_ids.shape[1] == 7 + 32
    assert generate(model, [prompt[0].tolist()], 32)[0] == ref_ids[0, 7:].tolist()


def test_config_spellings_4x_and_5x():
    base = dict(model_type="llama", vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=32, max_position_embeddings=64)
    v4 = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}})
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}})
    assert v4.rope_theta == v5.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3"
    assert v4.rope_scaling == v5.rope_scaling and v4.head_dim == 16 and v4.n_kv_heads == 4
    q = ModelConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 32, "use_sliding_window": False})
    assert q.qkv_bias and not q.o_bias and q.sliding_window == 0
    with pytest.raises(UserError, match="model_type='gpt2'"):
        ModelConfig.from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(UserError, match="rope type 'yarn'"):
        ModelConfig.from_hf({**base, "rope_scaling": {"type": "yarn", "factor": 2.0}})


def test_mistral_refuses_beyond_sliding_window(tmp_path):
    hf_tiny(arch="mistral").save_pretrained(tmp_path)
    model = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    model(torch.zeros(1, 128, dtype=torch.long))
    with pytest.raises(UserError, match="sliding_window=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        Llama.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        Llama.from_pretrained(str(tmp_path))
    hf = hf_tiny()
    good = tmp_path / "good"
    hf.save_pretrained(good)
    cfg = json.load(open(good / "config.json"))

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(good):
            (d / f).write_bytes((good / f).read_bytes())
        json.dump({**cfg, **changes}, open(d / "config.json", "w"))
        return d
    with pytest.raises(UserError, match="model_type='bert'"):
        Llama.from_pretrained(str(variant("bert", model_type="bert")))
    with pytest.raises(UserError, match="shape .* config.json does not match"):
        Llama.from_pretrained(str(variant("shape", intermediate_size=80)))
    with pytest.raises(UserError, match="lacks .* tensors"):
        Llama.from_pretrained(str(variant("missing", num_hidden_layers=3)))
    d = variant("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        Llama.from_pretrained(str(d))
    d = variant("noweights")
    os.remove(d / "model.safetensors")
    with pytest.raises(UserError, match="no model.safetensors"):
        Llama.from_pretrained(str(d))


def tiny_model(seed=0, dtype=torch.float32, tmp=None):
    hf = hf_tiny(seed=seed)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    model = Llama(cfg).to(dtype)
    model.load_state_dict(hf.state_dict(), strict=True)
    model.inv_freq = model.inv_freq.float()
    return model.eval()


def test_batched_generation_equals_one_by_one():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 1, 9, 12)]
    eos = generate(model, prompts[:1], 24)[0][3]  # a token the first prompt's greedy continuation produces
    one = [generate(model, [p], 24, eos_id=eos)[0] for p in prompts]
    assert len(one[0]) <= 3 and max(len(o) for o in one) > len(one[0])  # rows of different lengths, one cut early
    assert generate(model, prompts, 24, eos_id=eos) == one
    assert generate(model, prompts[::-1], 24, eos_id=eos) == one[::-1]


def test_prefill_in_chunks_equals_one_prefill():
    """The KV cache takes a prompt in chunks (the last one a single token) with the logits of one prefill, left
    padding masked out in each chunk."""
    model = tiny_model()
    idx = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False  # the second prompt is left-padded by 4
    pos = (valid[:, :9].long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        one = model(idx, pos=pos, cache=model_mod.KVCache(model.cfg, valid, torch.float32))[0]
        cache = model_mod.KVCache(model.cfg, valid, torch.float32)
        for a, b in ((0, 5), (5, 8), (8, 9)):
            out = model(idx[:, a:b], pos=pos[:, a:b], cache=cache)[0]
    assert torch.allclose(out, one, atol=1e-5)


def test_decoding_reads_the_cache_in_spans(monkeypatch):
    """Decode steps that read the KV cache only up to a growing span (a new one every 4 steps here) give the
    tokens of steps that read every slot."""
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 1, 9)]
    monkeypatch.setattr(model_mod, "SPAN_STEP", 10 ** 6)
    whole = generate(model, prompts, 30)
    monkeypatch.setattr(model_mod, "SPAN_STEP", 4)
    assert generate(model, prompts, 30) == whole


def test_generation_stops_at_eos_and_stop_strings(tiny_dir):
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(tiny_dir)
    prompt = tok.encode("Natalia sold")
    full = generate(model, [prompt], 20)[0]
    eos = full[5]
    cut = generate(model, [prompt], 20, eos_id=eos)[0]
    assert cut == full[:full.index(eos)]
    # a stop string that first completes at token k >= 6: the text token k adds, absent from the text before it
    k = next(k for k in range(6, len(full)) if tok.decode(full[:k + 1])[len(tok.decode(full[:k])):].strip()
             and tok.decode(full[:k + 1])[len(tok.decode(full[:k])):] not in tok.decode(full[:k]))
    stop = tok.decode(full[:k + 1])[len(tok.decode(full[:k])):]
    out = generate(model, [prompt], 20, stop=[stop], tokenizer=tok)[0]
    assert out == full[:k]  # cut right before the token that completes the stop string


def test_sampling_is_seeded_and_top_p_small_is_greedy():
    model = tiny_model()
    p = [[5, 6, 7, 8]]
    a = generate(model, p, 16, temperature=1.0, seed=1)
    assert a == generate(model, p, 16, temperature=1.0, seed=1)
    assert generate(model, p, 16, temperature=1.0, top_p=1e-6, seed=2) == generate(model, p, 16)


def test_packed_rows_equal_separate_examples():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (1, 11), generator=g), torch.randint(0, 128, (1, 7), generator=g)
    row = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(11), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model(row, pos=pos)[0]  # (1, 18, V)
        sep = torch.cat([model(a)[0], model(b)[0]], 1)
    assert (packed - sep).abs().max() < 1e-5


def test_doc_bounds_are_the_examples_offsets():
    """The GPU's packed-row attention takes where each example starts in the flattened rows (FlashAttention's
    cu_seqlens): a fixed number of offsets, the unused ones B*T; more examples than its bound is an error, not a
    silent merge of two examples."""
    from model import EXAMPLE_TOKENS, doc_bounds
    T = 2 * EXAMPLE_TOKENS
    pos = torch.stack([torch.cat([torch.arange(40), torch.arange(T - 40)]), torch.arange(T)])  # (2, T)
    cu = doc_bounds(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 40, T] + [2 * T] * (2 * 2 - 2)
    with pytest.raises(RuntimeError, match="more examples in a packed row"):
        doc_bounds(torch.arange(4).repeat(1, T // 4))  # 16 examples in a row of 2 * EXAMPLE_TOKENS


@pytest.mark.parametrize("W_grad", [False, True])
def test_chunked_cross_entropy_matches_reference(W_grad):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=W_grad)
    t = torch.randint(0, 50, (37,), generator=g)
    t[::3] = -100  # ignored rows: masked in the loss and the gradient
    loss = ChunkedCrossEntropy.apply(h, W, t, 8)
    ref = F.cross_entropy(h @ W.t(), t, ignore_index=-100)
    assert torch.allclose(loss.double(), ref)
    gl = torch.autograd.grad(3 * loss, [h] + ([W] if W_grad else []))
    gr = torch.autograd.grad(3 * ref, [h] + ([W] if W_grad else []))
    for a, b in zip(gl, gr):
        assert torch.allclose(a, b)


def test_loss_masks_prompt_tokens():
    model = tiny_model()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1).clone()
    y[:, :5] = -100
    logits = model(x)[0]  # (2, 12, V)
    ref = F.cross_entropy(logits.reshape(-1, 128), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(model(x, y)[1], ref, atol=1e-6)
    assert abs(model(x, x.roll(-1, 1))[1] - model(x, y)[1]) > 1e-3  # unmasked, the prompt positions would have counted
    y2 = y.clone()
    y2[:, 7] = -100  # one more masked target: the mean is over the remaining ones
    ref2 = F.cross_entropy(logits.reshape(-1, 128), y2.reshape(-1), ignore_index=-100)
    assert torch.allclose(model(x, y2)[1], ref2, atol=1e-6) and abs(ref2 - ref) > 1e-4
    x2 = x.clone()
    x2[:, :2] = (x2[:, :2] + 1) % 128  # a prompt token's input is still context for every later target
    assert abs(model(x2, y)[1] - model(x, y)[1]) > 1e-4


@needs_shared
def test_sentencepiece_llama2_roundtrip():
    tok = Tokenizer.from_pretrained(LLAMA2_SP)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (1, 2, 32000, True)
    qs = [json.loads(l)["question"] for l in open(os.path.join(GSM8K, "test.jsonl"))][:300]
    for q in qs:
        ids = tok.encode(q, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids[1:-1]) == q
    assert tok.encode("Hello world") == [15043, 3186]  # known Llama 2 ids


def test_sentencepiece_trained_here(tmp_path):
    import sentencepiece as spm
    text = ["Natalia sold 48 clips in April and half as many in May.", "How many did she sell? 72",
            "Weng earns $12 an hour for babysitting."] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=60, model_type="bpe", bos_id=1, eos_id=2, unk_id=0)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 2
    for t in text[:3]:
        assert tok.decode(tok.encode(t)) == t


def test_tokenizer_json(tiny_dir, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    qs = [json.loads(l)["question"] for l in open(os.path.join(GSM8K, "test.jsonl"))][:100] if os.path.isdir(
        GSM8K) else ["Natalia sold 48 clips in April, and half as many in May: how many? ½ €"]
    for q in qs:
        assert tok.decode(tok.encode(q)) == q
    # ids come from tokenizer_config first, then generation_config, then config
    write_bpe_tokenizer(str(tmp_path))
    json.dump({"eos_token": "</s>"}, open(tmp_path / "tokenizer_config.json", "w"))
    json.dump({"eos_token_id": [0, 1], "pad_token_id": 0}, open(tmp_path / "generation_config.json", "w"))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.eos_id == 2 and tok.pad_id == 0 and tok.stop_ids == {0, 1, 2}
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path / ".."))
