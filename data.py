"""
The data: the prompt template, GSM8K and MetaMathQA rows, tokenization, packing into rows, the held-out split and
the order in which examples are seen. train.py, fed.py, eval.py and bench.py share it.

An example is a (question, target) pair of strings; tokenized, it is (ids, n_prompt) with ids = [BOS] prompt ' '
target EOS. The loss covers the target tokens only. Several examples share a packed row of at most max_len tokens;
positions restart at 0 for each, and the model never attends across them.
"""
import json
import os
import re

from dataclasses import dataclass

import torch

from cli import UserError
from model import EXAMPLE_TOKENS

# the Alpaca-style prompt of MetaMath, LoRA-XS, LoRA-SB and Fed-SB; {question} is replaced
TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{question}\n\n### Response:")


@dataclass
class DataConfig:
    data: str = "gsm8k"  # GSM8K jsonl (question/answer), MetaMathQA json/jsonl (query/response), or gsm8k (fetched)
    data_limit: int = 0  # > 0: only the first N examples of --data (the papers' "MetaMathQA train[:50000]")
    val_data: str = ""  # a held-out file; empty: hold out --val_size examples of --data (a fixed seeded split)
    val_size: int = -1  # held-out examples; -1 (auto): 256 on CUDA, 32 on CPU
    template: str = TEMPLATE  # the prompt; {question} is replaced by the question
    max_len: int = 512  # tokens per example (prompt + answer + EOS); longer answers are truncated


def gsm8k_target(answer):
    """GSM8K's worked solution without calculator annotations, the final '#### N' as 'The answer is: N'."""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).rstrip()
    return f"{body}\nThe answer is: {final.strip()}"


class Example(tuple):
    """(question, target), and `where` it came from (file:line, or file:[index] in a JSON list) for error lines."""
    where = ""


def load_examples(path):
    """[Example(question, target)] from GSM8K jsonl or MetaMathQA json/jsonl."""
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#x}); save the file as UTF-8") from None
    if text.lstrip().startswith("["):  # one JSON list (MetaMathQA's release format)
        try:
            rows = [(f"[{i}]", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{n}: not a JSON object") from None
    out = []
    for n, r in rows:
        if isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str):
            ex = Example((r["question"], gsm8k_target(r["answer"])))
        elif isinstance(r, dict) and isinstance(r.get("query"), str) and isinstance(r.get("response"), str):
            ex = Example((r["query"], r["response"]))
        else:
            raise UserError(f"{path}:{n}: expected 'question'/'answer' (GSM8K) or 'query'/'response' (MetaMathQA)")
        ex.where = f"{path}:{n}"
        out.append(ex)
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def heldout_split(n, val_size, path):
    """(training indices, held-out indices) of n examples: one seeded split, shared by train.py and fed.py."""
    if n <= val_size:
        raise UserError(f"{path} has {n} examples, not more than --val_size={val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()
    return perm[val_size:], perm[:val_size]


def tokenize(examples, tok, template, max_len):
    """[(ids, n_prompt)]: ids = [BOS] prompt ' ' target EOS, tokenized jointly as the model will read it, cut to
    max_len tokens, and how many were cut. An example whose prompt alone fills max_len has no target token left to
    learn from: it is skipped, and the count and the first one's file and line are printed (all skipped: an error)."""
    out, cut, skipped = [], 0, []
    for ex in examples:
        q, target = ex
        prompt = template.format(question=q)
        p = tok.encode(prompt, bos=tok.add_bos)
        if len(p) >= max_len:
            skipped.append((getattr(ex, "where", ""), len(p)))
            continue
        ids = tok.encode(prompt + " " + target, bos=tok.add_bos) + [tok.eos_id]
        if ids[:len(p)] != p:  # the joint tokenization merged across the boundary: keep the prompt's own
            ids = p + tok.encode(" " + target) + [tok.eos_id]
        cut += len(ids) > max_len
        out.append((ids[:max_len], len(p)))
    if skipped:
        where, n = skipped[0]
        msg = (f"{len(skipped)} of {len(examples)} examples have a prompt of >= --max_len={max_len} tokens "
               f"(the first: {where or 'example'}, {n} tokens)")
        if not out:
            raise UserError(msg + ": raise --max_len")
        print(f"skipped {msg}; raise --max_len to keep them")
    return out, cut


def check(cfg):
    """One clear line for a data setting that cannot work (before any file is read)."""
    if cfg.max_len < 8:
        raise UserError(f"--max_len must be >= 8 tokens, got {cfg.max_len}")
    if cfg.data_limit < 0 or cfg.val_size < -1:
        raise UserError(f"--data_limit must be >= 0 (0: all) and --val_size >= 0 (-1: auto), got {cfg.data_limit}, "
                        f"{cfg.val_size}")
    try:
        cfg.template.format(question="q")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"--template: only {{question}} may be a placeholder (write {{{{ }}}} for a literal brace), "
                        f"got {type(e).__name__} {e}") from None
    if "{question}" not in cfg.template:
        raise UserError("--template has no {question}: the model would never see the question")


def pack(seqs, max_len, pad_id, static=False):
    """First-fit-decreasing packing of examples into rows of at most max_len tokens. Returns x, y, pos (R, T):
    y is -100 on prompt and padding; pos restarts at 0 for each example (the model keeps attention within each
    example by it), and padding continues the row's last example (an empty row: one example of padding), which
    nothing reads. A row holds at most one example per model.EXAMPLE_TOKENS of its tokens (the bound the GPU's
    variable-length attention takes). static: T = max_len and R rounded up to a multiple of 4, so a CUDA graph
    captured for one shape serves (nearly) every step."""
    rows = []  # [used, [example indices]]
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        n = len(seqs[i][0]) - 1  # inputs are ids[:-1]
        row = next((r for r in rows if r[0] + n <= max_len and len(r[1]) < (r[0] + n) // EXAMPLE_TOKENS), None)
        if row is None:
            row = [0, []]
            rows.append(row)
        row[0] += n
        row[1].append(i)
    R, T = (-(-len(rows) // 4) * 4, max_len) if static else (len(rows), max(r[0] for r in rows))
    x = torch.full((R, T), pad_id, dtype=torch.long)
    y = torch.full((R, T), -100, dtype=torch.long)
    pos = torch.arange(T).repeat(R, 1)  # (R, T)
    for r, (_, items) in enumerate(rows):
        t = 0
        for i in items:
            ids, n_prompt = seqs[i]
            n = len(ids) - 1
            x[r, t:t + n] = torch.tensor(ids[:-1])
            y[r, t + n_prompt - 1:t + n] = torch.tensor(ids[n_prompt:])  # predict the target tokens only
            pos[r, t:t + n] = torch.arange(n)
            t += n
        pos[r, t:] = torch.arange(n, n + T - t)  # padding: the last example's positions go on
    return x, y, pos


def example_order(n, seed, start, count):
    """Examples start..start+count of the training stream: epoch e is a permutation seeded by (seed, e)."""
    perms = {}
    for e in range(start // n, (start + count - 1) // n + 1):
        perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + e)).tolist()
    return [perms[k // n][k % n] for k in range(start, start + count)]


def micro_batches(data, idxs, micro, max_len, pad_id, static=False, rank=0, world=1):
    """Pack each group of `micro` examples of process `rank`'s contiguous share of idxs (all of them in one
    process): [(x, y, pos)], and the target and real (non-pad) tokens of all of idxs, every process's share: the
    loss is a mean over the whole step, which every process can count without asking the others."""
    mine = idxs[rank * len(idxs) // world:(rank + 1) * len(idxs) // world]
    batches = [pack([data[i] for i in mine[j:j + micro]], max_len, pad_id, static) for j in range(0, len(mine), micro)]
    n_tgt = sum(len(data[i][0]) - data[i][1] for i in idxs)  # pack's y holds ids[n_prompt:] of each example
    return batches, n_tgt, sum(len(data[i][0]) - 1 for i in idxs)


def splits(cfg, path):
    """(training examples, held-out examples, the training examples' indices in the file) for a run's config: the
    first data_limit examples of `path`, minus a seeded held-out split of val_size, unless val_data is a file."""
    examples = load_examples(path)[:cfg.data_limit or None]
    if cfg.val_data:
        return examples, load_examples(cfg.val_data), list(range(len(examples)))
    train_idx, val_idx = heldout_split(len(examples), cfg.val_size, path)
    return [examples[i] for i in train_idx], [examples[i] for i in val_idx], train_idx


EVAL_EXAMPLES = 64  # held-out examples per forward: no activations are kept for a backward, so more fit than in a step


def eval_batches(seqs, micro, max_len, pad_id):
    """The held-out examples packed max(micro, EVAL_EXAMPLES) at a time, in file order: [(x, y, pos)]. Fewer, larger
    forwards: a small model's held-out loss is bound by per-forward overhead, not by its tokens."""
    n = max(micro, EVAL_EXAMPLES)
    return [pack(seqs[j:j + n], max_len, pad_id) for j in range(0, len(seqs), n)]
