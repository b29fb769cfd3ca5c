"""Bad input, as a new user types it: each case exits with one `error:` line naming the problem and the fix (no
traceback), before any expensive work where it can be known then; and an existing run is never changed by a
command that does not say --resume or --overwrite. Each case runs the entry point as its script does (cli.run),
in-process."""
import hashlib
import json
import os
import sys

import pytest
import torch

import cli
import eval as ev
import fed
import fetch
from conftest import script, write_gsm8k
from model import Llama

train = script("train")
MAINS = {"train": train.main, "fed": fed.main, "eval": ev.main}


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model's weights fails the test: the error must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(Llama, "from_pretrained", refuse)


def remedies(entry):
    """The GPU remedies (cli.run's smaller, resume) that `entry.py` passes to cli.run, read from its source."""
    import ast
    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), entry + ".py")).read()
    call = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and ast.unparse(n.func) == "cli.run")
    names = ["smaller", "resume"]
    given = {**dict(zip(names, (ast.literal_eval(a) for a in call.args[1:]))),
             **{k.arg: ast.literal_eval(k.value) for k in call.keywords}}
    return [given.get(n, "") for n in names]


def fails(entry, argv, *words, monkeypatch):
    """Run `entry.py argv` as the script does; it must exit with one error line containing every word."""
    monkeypatch.setattr(sys, "argv", [entry + ".py", *argv])
    with pytest.raises(SystemExit) as e:
        cli.run(MAINS[entry], *remedies(entry))
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert "weights_only=False" not in msg  # never suggest the unsafe load
    for w in words:
        assert w in msg, (w, msg)
    return msg


def base(tiny_dir, gsm_file, tmp_path, *extra, method="lora", name="r"):
    return ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4", "--max_len", "384",
            "--out_dir", str(tmp_path), "--run_name", name, "--device", "cpu", "--method", method, "--max_steps", "2",
            "--test_data", "", *extra]


# train.py: settings that cannot work, refused before the model loads
BAD_TRAIN = [
    (["--lr", "-1"], ["--lr must be > 0"]),
    (["--lr", "0"], ["--lr must be > 0", "method's default"]),
    (["--batch_size", "0"], ["--batch_size must be >= 1"]),
    (["--batch_size", "-4"], ["--batch_size must be >= 1"]),
    (["--micro_batch_size", "-1"], ["--micro_batch_size >= 0"]),
    (["--epochs", "0", "--max_steps", "0"], ["--epochs must be > 0"]),
    (["--max_steps", "-5"], ["--max_steps >= 0"]),
    (["--log_every", "0"], ["--log_every"]),
    (["--dtype", "int8"], ["--dtype must be"]),
    (["--warmup_steps", "-3"], ["--warmup_steps >= 0"]),
    (["--grad_clip", "0"], ["--grad_clip must be > 0"]),
    (["--beta2", "1.5"], ["--beta1 and --beta2"]),
    (["--max_len", "2"], ["--max_len must be >= 8"]),
    (["--template", "Q: {x} {question}"], ["--template", "only {question}"]),
    (["--template", "Answer this."], ["--template has no {question}"]),
    (["--export", "gguf"], ["--export must be peft or merged"]),
    (["--export_dtype", "int4"], ["--export_dtype must be"]),
    (["--rnak=4"], ["unknown option --rnak", "valid:"]),
    (["--rank=abc"], ["--rank expects int"]),
    (["--method", "qlora"], ["unknown method 'qlora'"]),
    (["--targets", "q_prj,v_proj"], ["--targets q_prj", "no such layer", "choose from"]),
    (["--targets", ""], ["--targets (none)"]),
    (["--rank", "1000"], ["--rank=1000 exceeds 64"]),
    (["--method", "sb", "--rank", "1000"], ["--rank=1000 must be between 1 and 64"]),
    (["--method", "sb", "--init_samples", "0"], ["--init_samples must be >= 1"]),
    (["--method", "sb", "--sb_update", "adam"], ["--sb_update sign or grad"]),
    (["--method", "xs", "--svd", "fast"], ["--svd must be exact or lowrank"]),
    (["--method", "ga", "--rank", "40"], ["LoRA-GA needs 2 * rank <= 64"]),
    (["--method", "ga", "--direction", "BrA"], ["--direction must be one of"]),
    (["--method", "bone", "--block_size", "7"], ["not divisible by --block_size=7"]),
    (["--method", "dylora", "--eval_rank", "20"], ["--eval_rank between 1 and rank"]),
    (["--method", "full", "--export", "peft"], ["no PEFT LoRA form", "--export merged"]),
    (["--method", "bone", "--block_size", "16", "--export", "peft"], ["no LoRA form", "--export merged"]),
    (["--test_data", "missing.jsonl"], ["--test_data missing.jsonl: file not found"]),
    (["--val_data", "missing.jsonl"], ["data file not found: missing.jsonl"]),
    (["--data_limit", "-1"], ["--data_limit must be >= 0"]),
    (["--resume", "--overwrite"], ["choose one"]),
    (["--resume"], ["no checkpoint at", "without --resume"]),
]


@pytest.mark.parametrize("extra,words", BAD_TRAIN, ids=[" ".join(a)[:40] for a, _ in BAD_TRAIN])
def test_train_refuses_before_loading(tmp_path, tiny_dir, gsm_file, monkeypatch, no_load, extra, words):
    fails("train", base(tiny_dir, gsm_file, tmp_path, *extra), *words, monkeypatch=monkeypatch)
    assert not os.path.exists(tmp_path / "r")  # a failed start leaves no half-made run folder


def test_device_without_gpu(tmp_path, tiny_dir, gsm_file, monkeypatch, no_load):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    fails("train", base(tiny_dir, gsm_file, tmp_path, "--device", "cuda"), "no CUDA GPU", "--device cpu",
          monkeypatch=monkeypatch)
    fails("train", base(tiny_dir, gsm_file, tmp_path, "--device", "tpu"), "--device must be", monkeypatch=monkeypatch)


def test_bad_files(tmp_path, tiny_dir, gsm_file, monkeypatch, no_load):
    """Data files: bytes that are not UTF-8, a prompt too long for --max_len (file and line named), a file path
    where a folder is needed."""
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(open(gsm_file, "rb").read()[:400].rsplit(b"\n", 1)[0] + b"\n" +
                    '{"question": "caf\xe9?", "answer": "#### 1"}\n'.encode("latin-1"))
    fails("train", base(tiny_dir, str(bad), tmp_path), "latin1.jsonl:", "not UTF-8", "save the file as UTF-8",
          monkeypatch=monkeypatch)
    fails("train", base(tiny_dir, gsm_file, tmp_path, "--max_len", "16"), "have a prompt of >= --max_len=16",
          f"{gsm_file}:", "raise --max_len", monkeypatch=monkeypatch)
    (tmp_path / "afile").write_text("x")
    fails("train", base(tiny_dir, gsm_file, tmp_path / "afile"), "is a file, not a folder", monkeypatch=monkeypatch)
    fails("train", base(str(tmp_path / "nomodel"), gsm_file, tmp_path), "model folder not found",
          monkeypatch=monkeypatch)


def test_long_prompts_are_skipped_with_a_count(tmp_path, tiny_dir, capsys):
    """An example whose prompt alone fills --max_len has nothing to learn from: skipped, counted, located."""
    path = write_gsm8k(tmp_path / "d.jsonl", n=30)
    lines = open(path).read().splitlines()
    lines[4] = json.dumps({"question": "why? " * 300, "answer": "#### 1"})
    open(path, "w").write("\n".join(lines) + "\n")
    out = train.main(base(tiny_dir, path, tmp_path, "--max_steps", "1"))
    text = capsys.readouterr().out
    assert "skipped 1 of " in text and f"(the first: {path}:5, " in text and out["steps"] == 1


def test_existing_runs_are_never_touched(tmp_path, tiny_dir, gsm_file, monkeypatch, capsys):
    """A finished run: re-running its name, resuming it as another method, or a damaged checkpoint leave every one
    of its files byte-identical; --overwrite replaces it whole."""
    train.main(base(tiny_dir, gsm_file, tmp_path))
    run = tmp_path / "r"

    def digest():
        return {f: hashlib.sha256(open(run / f, "rb").read()).hexdigest() for f in sorted(os.listdir(run))}
    before = digest()
    fails("train", base(tiny_dir, gsm_file, tmp_path), "already holds a run", "--resume", "--overwrite",
          monkeypatch=monkeypatch)
    fails("train", base(tiny_dir, gsm_file, tmp_path, "--resume", method="sb"), "--method sb",
          "trained with lora", monkeypatch=monkeypatch)
    assert digest() == before
    train.main(base(tiny_dir, gsm_file, tmp_path, "--overwrite", "--max_steps", "1", method="full"))
    assert json.load(open(run / "config.json"))["train"]["method"] == "full"
    assert json.load(open(run / "summary.json"))["steps"] == 1 and not (run / "gsm8k.jsonl").exists()
    for content in (b"", b"PK\x03\x04 not a checkpoint", open(run / "ckpt.pt", "rb").read()[:100]):
        (run / "ckpt.pt").write_bytes(content)  # empty, random, truncated
        fails("train", ["--resume", "--out_dir", str(tmp_path), "--run_name", "r"], "ckpt.pt cannot be read",
              "--overwrite", monkeypatch=monkeypatch)


def test_damaged_model_weights(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """NaN inside a model file is found at load, not blamed on the learning rate later."""
    from safetensors.torch import load_file, save_file
    d = tmp_path / "nanmodel"
    d.mkdir()
    for f in os.listdir(tiny_dir):
        (d / f).write_bytes(open(os.path.join(tiny_dir, f), "rb").read())
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, d / "model.safetensors")
    fails("train", base(str(d), gsm_file, tmp_path), "model.layers.1.mlp.up_proj.weight holds NaN", "damaged",
          monkeypatch=monkeypatch)


BUSY = getattr(torch, "AcceleratorError", RuntimeError)  # (torch < 2.8 raises a RuntimeError)


@pytest.mark.parametrize("err,words,not_words", [
    (BUSY("CUDA error: CUDA-capable device(s) is/are busy or unavailable"),
     ["the GPU is unusable", "busy or unavailable", "nvidia-smi", "--resume goes on"], ["corrupt", "download"]),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 768.00 MiB."),
     ["out of GPU memory", "768.00 MiB", "smaller --micro_batch_size", "fewer runs", "--resume goes on"],
     ["corrupt", "download"]),
    (OSError("Error while deserializing header: incomplete metadata"), ["truncated or corrupt"], ["GPU"]),
], ids=["busy", "oom", "file"])
def test_a_gpu_error_is_one_line_that_blames_the_gpu(tmp_path, tiny_dir, gsm_file, monkeypatch, err, words,
                                                     not_words):
    """A GPU that is out of memory, busy or lost (seen under MPS after another run was killed) is named as the GPU's
    failure in one line, whether it strikes while the weights load or later; it is not blamed on the file, whose
    damage (the last case) still is."""
    import safetensors

    def broken(*a, **k):
        raise err
    monkeypatch.setattr(safetensors, "safe_open", broken)
    msg = fails("train", base(tiny_dir, gsm_file, tmp_path), *words, monkeypatch=monkeypatch)
    assert not any(w in msg for w in not_words), msg
    if isinstance(err, OSError):
        return
    monkeypatch.undo()  # and the same error during training, from fed.py's own code, goes through cli.run alike
    monkeypatch.setattr(fed.step, "evaluate", broken)
    fails("fed", ["--model", tiny_dir, "--data", gsm_file, "--clients", "2", "--rounds", "1", "--local_steps", "1",
                  "--batch_size", "2", "--val_size", "4", "--max_len", "384", "--out_dir", str(tmp_path / "f"),
                  "--device", "cpu", "--method", "fedit", "--rank", "2"], *words, monkeypatch=monkeypatch)


@pytest.mark.parametrize("err", [RuntimeError("shape mismatch in my new method"),
                                 BUSY("CUDA error: an illegal memory access was encountered"),
                                 BUSY("CUDA error: device-side assert triggered")])
def test_a_bug_keeps_its_traceback(monkeypatch, err):
    """Only the GPU's own failures become a line: any other RuntimeError, a device-side assert or an illegal memory
    access too (a bug, or a token id beyond the vocabulary), keeps its traceback."""
    def main():
        raise err
    with pytest.raises(type(err), match=str(err)[:20]):
        cli.run(main, "--micro_batch_size", "--resume")


def test_each_entry_points_gpu_remedy_is_its_own_option(monkeypatch, capsys):
    """The option an out-of-memory line tells the user to lower, and --resume where it says so, are options of the
    script that prints it (eval.py and bench.py have no --micro_batch_size or --resume)."""
    import re
    for entry in ("train", "fed", "eval", "bench", "fed_flower", "results"):
        named = set(re.findall(r"(--\w+)", " ".join(remedies(entry))))
        assert named or entry == "results", entry
        help_of = {"fed_flower": "fed"}.get(entry, entry)  # fed_flower passes fed.py's options on
        monkeypatch.setattr(sys, "argv", [help_of + ".py", "--help"])
        try:
            (train if help_of == "train" else __import__(help_of)).main()
        except SystemExit:
            pass
        shown = capsys.readouterr().out
        for flag in named:
            assert f"  {flag}=" in shown, (entry, flag)


def test_a_dead_run_stops_and_what_is_saved_is_good(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """lr 1e9 saturates every softmax: the gradient becomes exactly zero and the loss sits at ln(vocab). The run
    stops with a line, not a success; every checkpoint it left gives a finite loss."""
    msg = fails("train", base(tiny_dir, gsm_file, tmp_path, "--lr", "1e9", "--max_steps", "12", "--warmup_steps", "0",
                              "--log_every", "1", "--save_every", "1"),
                "the gradient is zero", "lower --lr", monkeypatch=monkeypatch)
    assert "training stopped" in msg
    ckpt = tmp_path / "r" / "ckpt.pt"
    if ckpt.exists():  # the weights it saved are not the dead ones
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["adapter"].values())


def test_first_run_tells_the_truth(tmp_path, tiny_dir, gsm_file, monkeypatch, capsys):
    """The console: no config dump (it is in config.json), the held-out loss before and after the init, no warning
    from the default settings (a bounded CPU run of LoRA-SB), and a synthetic test set named as such at the end."""
    monkeypatch.setattr(fetch, "CACHE", str(tmp_path / "cache"))  # where fetch.py writes its synthetic stand-in
    os.makedirs(tmp_path / "cache" / "synthetic")
    synthetic = write_gsm8k(tmp_path / "cache" / "synthetic" / "test.jsonl", n=4)
    argv = ["--model", tiny_dir, "--data", gsm_file, "--max_len", "384", "--out_dir", str(tmp_path), "--device", "cpu",
            "--method", "sb", "--rank", "4", "--init_samples", "8", "--test_data", synthetic, "--eval_limit", "2",
            "--batch_size", "4"]
    out = train.main(argv)
    text = capsys.readouterr().out
    assert '"method_config"' not in text and "config.json" in text
    assert "(base model)" in text and "after the init" in text
    assert "usually hurts" not in text and "3 of them warm-up" in text
    assert text.strip().splitlines()[-1].startswith("accuracy on SYNTHETIC arithmetic problems, NOT GSM8K")
    assert out["gsm8k"]["synthetic"]
    log = open(tmp_path / "sb" / "log.jsonl").read()
    json.loads("[" + ",".join(log.splitlines()) + "]", parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
    for f in ("config.json", "adapter.safetensors", "ckpt.pt", "log.jsonl"):
        assert os.stat(tmp_path / "sb" / f).st_mode & 0o044 == 0o044, f  # readable by others, as any file here


def test_resumed_summary_counts_the_whole_run(tmp_path, tiny_dir, gsm_file):
    """Steps, init and training time and tokens of a resumed run are the whole run's (results.py's records of runs
    cut at a device call's end and resumed report them), not only the part after the checkpoint."""
    whole = train.main(base(tiny_dir, gsm_file, tmp_path, "--max_steps", "3", method="ga", name="u"))
    first = train.main(base(tiny_dir, gsm_file, tmp_path, "--max_steps", "2", method="ga"))  # a gradient init
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["train_s"] > 0 and ckpt["tokens"] > 0 and ckpt["init_s"] == first["init_s"]
    out = train.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "r", "--max_steps", "3"])
    assert out["steps"] == 3 and out["steps_this_run"] == 1 and out["train_s"] > ckpt["train_s"]
    assert out["init_s"] == first["init_s"]  # the init ran once, in the first process (none ran on resume)
    tokens = lambda o: o["tok_s"] * o["train_s"]  # noqa: E731
    assert tokens(out) == pytest.approx(tokens(whole), rel=1e-9) and tokens(out) > ckpt["tokens"]


def test_resuming_a_run_started_with_overwrite_keeps_it(tmp_path, tiny_dir, gsm_file):
    """results.py starts a run again with --overwrite; resumed later, the saved --overwrite must not come back and
    clear the run's own checkpoint, log and adapter."""
    train.main(base(tiny_dir, gsm_file, tmp_path, "--overwrite"))
    train.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "r", "--max_steps", "3"])
    log = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    assert log[0].get("base_model") and [e["step"] for e in log if "loss" in e] == [2, 3]  # (logged at the end)
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 3


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, tiny_dir, gsm_file):
    """A machine lost mid-append leaves a last log line cut short (appends are not atomic): --resume drops it (it
    came after the checkpoint) instead of failing on it at every later call."""
    import runs
    train.main(base(tiny_dir, gsm_file, tmp_path))
    with open(tmp_path / "r" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert [e["step"] for e in runs.read_log(str(tmp_path / "r" / "log.jsonl"), 2)][-1] == 2
    assert train.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "r", "--max_steps", "3"])["steps"] == 3


# eval.py
def test_eval_errors(tmp_path, tiny_dir, gsm_file, monkeypatch):
    train.main(base(tiny_dir, gsm_file, tmp_path, name="a"))
    common = ["--model", tiny_dir, "--data", gsm_file, "--device", "cpu", "--limit", "2", "--max_new_tokens", "4"]
    adapter = ["--adapter", str(tmp_path / "a")]
    fails("eval", common + ["--limit", "-3"], "--limit must be >= 0", monkeypatch=monkeypatch)
    fails("eval", common + ["--batch_size", "-1"], "--batch_size must be >= 0 (0: auto)",
          monkeypatch=monkeypatch)
    fails("eval", common + ["--merged_dtype", "int8"], "--merged_dtype must be", monkeypatch=monkeypatch)
    fails("eval", common + adapter + ["--ranks", "a,b"], "--ranks takes whole numbers", monkeypatch=monkeypatch)
    fails("eval", common + adapter + ["--ranks", "1,2"], "--ranks needs an adapter", monkeypatch=monkeypatch)
    fails("eval", common + ["--adapter", str(tmp_path)], "no adapter.json", monkeypatch=monkeypatch)
    fails("eval", common + ["--data", str(tmp_path / "none.jsonl")], "GSM8K file not found", monkeypatch=monkeypatch)
    # another base model of the same shapes: strict loading cannot tell, the fingerprint can
    from conftest import hf_tiny, write_bpe_tokenizer
    other = tmp_path / "other"
    hf_tiny(vocab=256, seed=3).save_pretrained(other)
    write_bpe_tokenizer(str(other), vocab=256)
    fails("eval", ["--model", str(other)] + common[2:] + adapter, "weights differ", f"--model {tiny_dir}",
          monkeypatch=monkeypatch)
    weights = tmp_path / "a" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    fails("eval", common + adapter, "adapter.safetensors", "truncated or damaged", monkeypatch=monkeypatch)
    weights.unlink()
    fails("eval", common + adapter, "no adapter.safetensors", monkeypatch=monkeypatch)


# fed.py
def fed_args(tiny_dir, gsm_file, tmp_path, *extra):
    return ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--max_len", "384", "--batch_size", "4",
            "--out_dir", str(tmp_path), "--run_name", "f", "--device", "cpu", "--rank", "4", "--local_steps", "1",
            "--rounds", "1", "--clients", "2", *extra]


BAD_FED = [
    (["--clients", "100"], ["40 training examples cannot make 100 client shards"]),
    (["--client_frac", "0"], ["--client_frac must be in (0, 1]"]),
    (["--client_frac", "2"], ["--client_frac must be in (0, 1]"]),
    (["--client_frac", "-1"], ["--client_frac must be in (0, 1]"]),
    (["--clients", "0"], ["--clients and --rounds must be >= 1"]),
    (["--rounds", "0"], ["--clients and --rounds must be >= 1"]),
    (["--drop_prob", "1.5"], ["--drop_prob must be in [0, 1]"]),
    (["--dp_epsilon", "0"], ["--dp_epsilon must be > 0"]),
    (["--dp_clip", "0"], ["--dp_clip must be > 0"]),
    (["--dp_delta", "2"], ["--dp_delta must be in (0, 1/n)"]),
    (["--epochs", "2"], ["unknown option --epochs", "valid:"]),
    (["--method", "fedavg"], ["unknown method 'fedavg'"]),
    (["--method", "fedit", "--targets", "q_prj"], ["--targets q_prj", "no such layer"]),
    (["--lr", "-1"], ["--lr must be > 0"]),
    (["--split", "random"], ["--split must be iid, contiguous or dirichlet"]),
    (["--eval_gsm8k", "2", "--test_data", "missing.jsonl"], ["--test_data missing.jsonl: file not found"]),
    (["--template", "{q}"], ["--template"]),
]


@pytest.mark.parametrize("extra,words", BAD_FED, ids=[" ".join(a)[:40] for a, _ in BAD_FED])
def test_fed_refuses_before_loading(tmp_path, tiny_dir, gsm_file, monkeypatch, no_load, extra, words):
    fails("fed", fed_args(tiny_dir, gsm_file, tmp_path, *extra), *words, monkeypatch=monkeypatch)
    assert not os.path.exists(tmp_path / "f")


def test_fed_existing_run_is_never_touched(tmp_path, tiny_dir, gsm_file, monkeypatch):
    fed.main(fed_args(tiny_dir, gsm_file, tmp_path, "--method", "fedit"))
    run = tmp_path / "f"
    before = {f: open(run / f, "rb").read() for f in os.listdir(run)}
    fails("fed", fed_args(tiny_dir, gsm_file, tmp_path, "--method", "fedit"), "already holds a run",
          monkeypatch=monkeypatch)
    fails("fed", ["--resume", "--out_dir", str(tmp_path), "--run_name", "f", "--method", "sb"], "--method sb",
          "trained with fedit", monkeypatch=monkeypatch)
    assert {f: open(run / f, "rb").read() for f in os.listdir(run)} == before
    (run / "fed_state.pt").write_bytes(before["fed_state.pt"][:50])
    fails("fed", ["--resume", "--out_dir", str(tmp_path), "--run_name", "f", "--rounds", "2"],
          "fed_state.pt cannot be read", monkeypatch=monkeypatch)


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_same_run(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """SIGTERM during training (a cluster's preemption, or `timeout` at a device call's end, which signals the whole
    process group) makes train.py save a checkpoint after the step and stop with one line; --resume then ends where
    an uninterrupted run ends, bit for bit: no step lost, none done twice. The handlers are the caller's again after."""
    import re
    import signal
    import step
    from safetensors.torch import load_file
    from cli import UserError
    args = ["--max_steps", "12", "--log_every", "5", "--eval_every", "100", "--save_every", "100"]
    whole = train.main(base(tiny_dir, gsm_file, tmp_path, *args, name="u"))
    before, real = signal.getsignal(signal.SIGTERM), step.get_lr

    def get_lr(it, *a):  # the signal arrives during step 4 (it = 3), between two log steps
        if it == 3:
            assert signal.getsignal(signal.SIGTERM) is not before  # (else the signal would end pytest itself)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(it, *a)
    monkeypatch.setattr(step, "get_lr", get_lr)
    with pytest.raises(UserError, match=r"^stopped by SIGTERM at step 4 of 12: the checkpoint is in " +
                       re.escape(str(tmp_path / "r")) + "; continue with --resume$"):
        train.main(base(tiny_dir, gsm_file, tmp_path, *args))
    assert signal.getsignal(signal.SIGTERM) is before
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(step, "get_lr", real)
    resumed = train.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "r"])
    assert resumed["steps"] == whole["steps"] == 12 and resumed["steps_this_run"] == 8
    a, b = load_file(tmp_path / "r" / "adapter.safetensors"), load_file(tmp_path / "u" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
