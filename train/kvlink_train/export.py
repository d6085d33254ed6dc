"""PEFT-layout adapter export (f16) and loading it back merged into the base weights."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch

from .model import TARGET_MODULES, LlamaConfig

EXTRA_KEY = "kvlink.extra_embeddings"
MAX_BYTES = 16 * 1024 * 1024


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def export_adapter(trainable: dict[str, torch.Tensor], meta: dict, outdir: str) -> str:
    """Write adapter_config.json, adapter_model.safetensors (f16) and kvlink.json into outdir."""
    from safetensors.torch import save_file

    os.makedirs(outdir, exist_ok=True)
    cfg = LlamaConfig(**meta["config"])
    tensors: dict[str, torch.Tensor] = {}
    for name, t in trainable.items():
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            key = f"base_model.model.{name}.weight"
        elif name == "model.extra_embeddings":
            key = EXTRA_KEY
        else:
            raise KeyError(f"unexpected trainable tensor {name}")
        tensors[key] = t.detach().to("cpu", torch.float16).contiguous()
    path = os.path.join(outdir, "adapter_model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise ValueError(f"adapter is {size} bytes > 16 MiB")
    ac = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.name,
        "r": int(meta["lora_r"]), "lora_alpha": _num(meta["lora_alpha"]), "lora_dropout": float(meta.get("lora_dropout", 0.0)),
        "target_modules": list(TARGET_MODULES), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
    }
    with open(os.path.join(outdir, "adapter_config.json"), "w") as f:
        json.dump(ac, f, indent=2)
    kv = json.loads(meta["kvlink_json"]) if meta.get("kvlink_json") else {}
    kv["base_model"] = {"name": cfg.name, "hidden_size": cfg.hidden_size,
                        "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size}
    kv["base_vocab"] = int(meta["base_vocab"])
    kv["extra_tokens"] = int(meta["n_extra"])
    with open(os.path.join(outdir, "kvlink.json"), "w") as f:
        json.dump(kv, f, indent=2)
    return outdir


def read_trainable(adapter_dir: str, expected: dict[str, torch.Tensor], control: bool
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable tensors of an exported adapter, named as `expected` (a model's
    trainable_state) and checked against it: same names, shapes, LoRA scale, and the same
    kind of run (a control adapter has no link tokens). Values are the adapter's (f16, as
    fp32); also returns adapter_config.json."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        ac = json.load(f)
    kv_path = os.path.join(adapter_dir, "kvlink.json")
    kv = json.load(open(kv_path)) if os.path.exists(kv_path) else {}
    if bool(kv.get("control", False)) != control:
        want, got = ("a control", "a link-token") if control else ("a link-token", "a control")
        raise ValueError(f"{adapter_dir}: {got} adapter, but this is {want} run")
    ad = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    prefix = "base_model.model."
    names = {}
    for k in ad:
        if k == EXTRA_KEY:
            names["model.extra_embeddings"] = k
        elif k.startswith(prefix) and k.endswith(".weight"):
            names[k[len(prefix):-len(".weight")]] = k
        else:
            raise ValueError(f"{adapter_dir}: unexpected tensor {k}")
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    if missing or extra:
        raise ValueError(f"{adapter_dir}: tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for n, t in expected.items():
        a = ad[names[n]]
        if tuple(a.shape) != tuple(t.shape):
            raise ValueError(f"{adapter_dir}: {names[n]} has shape {tuple(a.shape)}, the model needs {tuple(t.shape)}")
        if not torch.isfinite(a).all():
            raise ValueError(f"{adapter_dir}: {names[n]} holds non-finite values")
        out[n] = a.float()
    return out, ac


def export_run(run_dir: str, outdir: str) -> str:
    ck = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=False)
    return export_adapter(ck["trainable"], ck["meta"], outdir)


def merge_adapter(base: dict[str, torch.Tensor], adapter_dir: str
                  ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor], dict]:
    """W' = W + (lora_alpha / r) * B @ A for every adapter pair (fp32); returns the merged state,
    the extra rows [n_extra, hidden] (or None) and kvlink.json."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        ac = json.load(f)
    scale = float(ac["lora_alpha"]) / float(ac["r"])
    ad = {k: v.float() for k, v in load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items()}
    kv_path = os.path.join(adapter_dir, "kvlink.json")
    kv = json.load(open(kv_path)) if os.path.exists(kv_path) else {}
    out = dict(base)
    prefix = "base_model.model."
    for k, a in ad.items():
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k[len(prefix):-len(".lora_A.weight")]
        b = ad[k.replace(".lora_A.", ".lora_B.")]
        w = out[mod + ".weight"].float()
        out[mod + ".weight"] = w + scale * (b @ a)
    extra = ad.get(EXTRA_KEY)
    return out, extra, kv


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m kvlink_train.export RUN_DIR OUT_DIR")
    print(export_run(sys.argv[1], sys.argv[2]))
