"""Load the frozen base model: a llama GGUF, or a safetensors file written by `convert`
(for machines without the `gguf` package)."""
from __future__ import annotations

import json
import sys

import torch

from .model import LlamaConfig


def load_base(path: str) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            cfg = LlamaConfig(**json.loads(meta["kvlink_train_config"]))
            return cfg, {k: f.get_tensor(k).float() for k in f.keys()}
    from .gguf_load import load_gguf

    return load_gguf(path)


def convert(src: str, dst: str) -> None:
    """GGUF -> fp32 HF-layout safetensors with the config in the metadata."""
    from safetensors.torch import save_file

    cfg, sd = load_base(src)
    save_file({k: v.contiguous() for k, v in sd.items()}, dst,
              metadata={"kvlink_train_config": json.dumps(cfg.to_dict())})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m kvlink_train.base MODEL.gguf OUT.safetensors")
    convert(sys.argv[1], sys.argv[2])
