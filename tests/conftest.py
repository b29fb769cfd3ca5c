import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
GSM8K = os.path.join(SHARED, "data", "gsm8k")
LLAMA2_SP = os.path.join(SHARED, "tokenizers", "llama2")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared is absent")

torch.set_num_threads(1)


def script(name):
    """The namespace of an entry-point script (train.py, fed.py...) run as a module, for tests that call its main()
    in-process: a script is not imported by any file of the project, and a subprocess per test would pay torch's
    import each time. Each call runs the file afresh (its own globals)."""
    import runpy
    import types
    path, run_name = os.path.join(ROOT, name + ".py"), "nanopeft_" + name
    sys.modules[run_name] = types.ModuleType(run_name)  # where inspect finds the source of its classes (--help)
    sys.modules[run_name].__file__ = path
    return types.SimpleNamespace(**runpy.run_path(path, run_name=run_name))


def hf_tiny(arch="llama", tie=False, head_dim=None, rope=None, seed=0, vocab=128, layers=2):
    """A random tiny transformers model (GQA 4/2 heads) with weights large enough that logits are decisive."""
    import transformers
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=256)
    if head_dim:
        kw["head_dim"] = head_dim
    if rope:
        kw["rope_parameters"] = rope
    cls = dict(llama=("LlamaConfig", "LlamaForCausalLM"), qwen2=("Qwen2Config", "Qwen2ForCausalLM"),
               mistral=("MistralConfig", "MistralForCausalLM"))[arch]
    if arch == "mistral":
        kw["sliding_window"] = 128
    model = getattr(transformers, cls[1])(getattr(transformers, cls[0])(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    return model


def tiny_llama(seed=0):
    """Our Llama holding hf_tiny's weights (fp32, CPU)."""
    from model import Llama, ModelConfig
    hf = hf_tiny(seed=seed)
    model = Llama(ModelConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama checkpoint folder (safetensors + config) with a small BPE tokenizer.json trained here."""
    d = str(tmp_path_factory.mktemp("tiny"))
    hf_tiny(vocab=256).save_pretrained(d)
    write_bpe_tokenizer(d, vocab=256)
    return d


def write_bpe_tokenizer(d, vocab=256):
    import json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = ["Natalia sold 48 clips in April and half as many in May. The answer is: 72"] * 5 + [
        "Below is an instruction that describes a task. ### Instruction: ### Response: 0123456789 $,.+-*/="]
    if os.path.isdir(GSM8K):
        import itertools
        texts += [l for l in itertools.islice(open(os.path.join(GSM8K, "train.jsonl")), 300)]
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(d, "tokenizer.json"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "add_bos_token": False},
              open(os.path.join(d, "tokenizer_config.json"), "w"))


def write_gsm8k(path, n=48, seed=0):
    """Synthetic problems in GSM8K's format (question / worked answer with <<calc>> and '#### N')."""
    import json
    import random
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            q = f"Tom has {a} apples and buys {b} more. How many apples does he have now?"
            ans = f"He buys {b} more, so {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"
            f.write(json.dumps({"question": q, "answer": ans, "kind": "add" if a < 30 else "big"}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def gsm_file(tmp_path_factory):
    return write_gsm8k(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(autouse=True)
def short_generation(monkeypatch):
    """At most 16 new tokens per problem wherever a test scores GSM8K (train.py's final score, results.py's DyLoRA
    ranks): the tests' tiny random models never stop by themselves, so the default 256 would be 256 decode steps of
    pure cost (about 1 s a call on 2 cores). Tests of generation itself pass smaller values, which stand. So the CPU
    tests never generate 256 tokens (tests/test_gpu.py's decoding does), and a run's saved summary still says 256."""
    import eval as ev
    real = ev.run_eval
    monkeypatch.setattr(ev, "run_eval", lambda model, tok, rows, template, suffix, batch_size, max_new_tokens, **k:
                        real(model, tok, rows, template, suffix, batch_size, min(max_new_tokens, 16), **k))


# A test whose function has a `background` attribute (an object with start() and stop()) is slow mostly by waiting
# (tests/test_flower.py: live Flower deployments): its work starts as soon as the session's tests are collected and
# the test itself collects the result after the other tests, so their work fills that waiting. Tests of a module
# with `ALONE = True` (tests/test_dist.py: processes that wait on each other in collectives, which crawl when other
# processes take their cores) run after it, when the background work is over.
def background_of(item):
    return getattr(getattr(item, "function", None), "background", None)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: 2 if getattr(item.module, "ALONE", False) else background_of(item) is not None)


def pytest_collection_finish(session):
    for item in session.items:
        if background_of(item) is not None:
            background_of(item).start()


def pytest_sessionfinish(session):
    for item in getattr(session, "items", []):  # an interrupted or failed session leaves no process behind
        if background_of(item) is not None:
            background_of(item).stop()
