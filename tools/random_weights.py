"""A copy of a Hugging Face checkpoint folder with random weights of the same names, shapes and dtype (bf16): for
timing runs on a machine the real weights cannot reach (the GPU machine takes 64 MiB a call; config and tokenizer
are a few MiB). Norm weights are ones, every other tensor N(0, 0.02^2), drawn in the checkpoint's tensor order from
seed 0. Losses and scores on it mean nothing; its speed is the real model's.

    python tools/random_weights.py SRC DST      # SRC: a folder with config.json, the tokenizer and model.safetensors
    python tools/random_weights.py SRC DST --shapes-only   # instead writes DST/shapes.json and copies the rest
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main(src, dst, shapes_only=False):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "model.safetensors" and os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)
    if os.path.isfile(os.path.join(src, "model.safetensors")):
        with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    else:  # a folder made with --shapes-only
        shapes = json.load(open(os.path.join(src, "shapes.json")))
    if shapes_only:
        json.dump(shapes, open(os.path.join(dst, "shapes.json"), "w"))
        return
    g = torch.Generator().manual_seed(0)
    weights = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
               for k, s in shapes.items()}
    save_file(weights, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    print(f"random weights ({sum(w.numel() for w in weights.values()):,} parameters) in {dst}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["--shapes-only"]):
        sys.exit("usage: python tools/random_weights.py SRC DST [--shapes-only]")
    main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["--shapes-only"])
