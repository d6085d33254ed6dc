"""CUDA check with a random SmolLM2-135M-shaped base (no GGUF needed): throughput, peak memory,
grad checkpointing, control, resume. PYTHONPATH=train python train/scripts/gpu_check.py OUTDIR"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvlink_train.model import KVLinkLlama, LlamaConfig  # noqa: E402
from kvlink_train.train import main as train_main  # noqa: E402
from smoke_real import synthetic  # noqa: E402


def random_base(path: str) -> None:
    from safetensors.torch import save_file

    c = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    rms_norm_eps=1e-5, name="random-smollm2-135m")
    m = KVLinkLlama(c, 0, lora_r=0)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n, p in m.state_dict().items():
        sd[n] = torch.ones_like(p) if n.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
    save_file(sd, path, metadata={"kvlink_train_config": json.dumps(c.to_dict())})


def run(out: str, name: str, samples: str, base: str, *extra: str) -> None:
    t = time.time()
    status = train_main(["--model", base, "--samples", samples, "--run", os.path.join(out, name), "--quiet",
                         "--warmup", "2", "--save-every", "0", *extra])
    rows = [json.loads(l) for l in open(os.path.join(out, name, "log.jsonl"))]
    steps = [r for r in rows if "loss" in r]
    print(json.dumps({"run": name, "status": status, "wall_s": round(time.time() - t, 1),
                      "losses": [r["loss"] for r in steps], "tok_s_last": steps[-1]["tok_s"] if steps else None,
                      "step_s_last": steps[-1]["step_s"] if steps else None,
                      "mem_gib": steps[-1].get("mem_gib") if steps else None,
                      "labelled_last": steps[-1]["labelled"] if steps else None}), flush=True)
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    base = os.path.join(out, "base.safetensors")
    random_base(base)
    kv = os.path.join(out, "kv.safetensors")
    synthetic(kv, n=256, length=1024)
    txt = os.path.join(out, "txt.safetensors")
    synthetic(txt, n=64, length=2048, all_loss=True)
    long = os.path.join(out, "long.safetensors")
    synthetic(long, n=32, length=4096)
    run(out, "kv", kv, base, "--steps", "6")
    run(out, "long4096", long, base, "--steps", "4")
    run(out, "kv_ckpt", kv, base, "--steps", "6", "--grad-ckpt")
    run(out, "ctl", kv, base, "--steps", "6", "--control")
    run(out, "txt_all_loss", txt, base, "--steps", "4")
    run(out, "res", kv, base, "--steps", "6", "--stop-at-step", "3")
    run(out, "res", kv, base, "--steps", "6", "--resume")


if __name__ == "__main__":
    main()
