"""KVLink LoRA trainer: fine-tunes a llama GGUF with the KVLink attention mask and link tokens."""
