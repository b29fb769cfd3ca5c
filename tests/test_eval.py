import json
import os

import pytest

import eval as ev
from conftest import script, GSM8K, needs_shared
from cli import UserError

train = script("train")  # train.py is a script: its main() is run, never imported


@pytest.mark.parametrize("text,expected", [
    ("So she has 18 left.\nThe answer is: 18", 18),
    ("The answer is: 1,450,000.", 1450000),
    ("The answer is: $18.00", 18),
    ("The answer is: \u22125", -5),
    ("The answer is: -$7.", -7),
    ("The answer is 42 dollars", 42),
    ("The answer is: 3\nWait. The answer is: 4", 4),  # the LAST occurrence
    ("The answer is: 0.5", 0.5),
    ("He pays 5 + 6 = 11.\n#### 11\nThe end 99", 11),  # no 'The answer is': '#### N'
    ("First 3 then 12 apples", 12),  # else the last number
    ("The answer is: unknown", None),  # no number anywhere: invalid, never 0
    ("the answer is: 7", 7),  # the trigger in any case (MetaMath would count this as no answer)
    ("So THE ANSWER IS 12 apples. Then 99", 12),
    ("The answer is: 1,2,3", 1),  # a list, not 123 (lm-eval) or 12 (MetaMath)
    ("The answer is: .5", 0.5),  # not 5, not 0 (MetaMath rounds)
    ("The answer is: 12,34", 12),  # not a thousands group
    ("The answer is: 1234,567", 1234),
    ("The answer is: 10,000.50 dollars", 10000.5),
    ("The total is 1,450,000", 1450000),  # the last-number fallback parses groups too
    ("I cannot say.", None),
])
def test_extract(text, expected):
    assert ev.extract(text) == expected


def test_lm_eval_scores():
    assert ev.lm_eval_scores("blah #### 1,000 then 5", "1000") == (True, False)
    assert ev.lm_eval_scores("so $18.", "18") == (False, True)
    assert ev.lm_eval_scores("so 18.00", "18") == (False, False)  # lm-eval compares strings, not numbers


@needs_shared
def test_real_gsm8k_golds_parse():
    rows = ev.load_gsm8k(os.path.join(GSM8K, "test.jsonl"))
    assert len(rows) == 1319
    golds = [ev.parse_number(g) for _, g in rows]
    assert all(g is not None and g == int(g) for g in golds)
    assert sum("," in g for _, g in rows) == 14 and sum(g < 0 for g in golds) == 2 and 1450000 in golds


def test_bad_data(tmp_path):
    with pytest.raises(UserError, match="GSM8K file not found"):
        ev.load_gsm8k(str(tmp_path / "none.jsonl"))
    p = tmp_path / "t.jsonl"
    p.write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(UserError, match="t.jsonl:1: expected"):
        ev.load_gsm8k(str(p))


def test_eval_with_adapter_batched_equals_one_by_one(tmp_path, tiny_dir, gsm_file):
    train.main(["--method", "lora", "--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4",
                "--max_len", "384", "--out_dir", str(tmp_path), "--max_steps", "4", "--lr", "1e-2", "--rank", "4",
                "--device", "cpu"])
    common = ["--model", tiny_dir, "--adapter", str(tmp_path / "lora"), "--data", gsm_file, "--limit", "6",
              "--max_new_tokens", "12", "--device", "cpu"]
    s1, = ev.main(common + ["--batch_size", "6", "--out", str(tmp_path / "a.jsonl")])
    s2, = ev.main(common + ["--batch_size", "1", "--out", str(tmp_path / "b.jsonl")])
    a = [json.loads(l) for l in open(tmp_path / "a.jsonl")]
    b = [json.loads(l) for l in open(tmp_path / "b.jsonl")]
    assert [r["completion"] for r in a] == [r["completion"] for r in b] and len(a) == 6
    assert all(r["n_new_tokens"] > 0 for r in a) and s1["method"] == "lora" and s1["n"] == 6
    summary = json.load(open(tmp_path / "a.summary.json"))
    assert summary["accuracy"] == s1["accuracy"] and summary["suffix"] == ev.SUFFIX and summary["template"]
    base, = ev.main(["--model", tiny_dir, "--data", gsm_file, "--limit", "6", "--max_new_tokens", "12", "--device", "cpu",
                     "--out", str(tmp_path / "base.jsonl")])
    assert [json.loads(l)["completion"] for l in open(tmp_path / "base.jsonl")] != [r["completion"] for r in a]
    with pytest.raises(UserError, match="--ranks needs"):
        ev.main(common + ["--ranks", "1,2"])


def test_auto_batch_halves_when_the_gpu_runs_out(tiny_dir, gsm_file, monkeypatch):
    """The auto batch is sized on the memory free when scoring starts; runs sharing the GPU (results.py --jobs) can
    take it meanwhile. A batch that runs out of memory is decoded again, half as many prompts at a time, giving what
    that smaller batch gives from the start; an explicit --batch_size that runs out is one line naming the fix."""
    import torch
    from model import Llama, Tokenizer
    model, tok = Llama.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32), Tokenizer.from_pretrained(tiny_dir)
    rows, real, sizes = ev.load_gsm8k(gsm_file, 5), ev.generate, []

    def scarce(model, prompts, *a, **k):  # as a GPU with room for 2 prompts at a time
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(model, prompts, *a, **k)
    want, _ = ev.run_eval(model, tok, rows, ev.TEMPLATE, ev.SUFFIX, 2, 8)
    monkeypatch.setattr(ev, "generate", scarce)
    got, summary = ev.run_eval(model, tok, rows, ev.TEMPLATE, ev.SUFFIX, 0, 8)  # 0: auto (256 on a CPU)
    assert sizes == [5, 3, 2, 2, 1] and summary["batch_size"] == 2
    assert [r["completion"] for r in got] == [r["completion"] for r in want]
    with pytest.raises(UserError, match=r"^out of GPU memory decoding 4 prompts at once: pass a smaller --batch_size"):
        ev.run_eval(model, tok, rows, ev.TEMPLATE, ev.SUFFIX, 4, 8)
