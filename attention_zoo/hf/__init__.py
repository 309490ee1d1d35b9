"""Interop with Hugging Face transformers: import Llama / Mistral / Qwen2 / GPT-2 checkpoints as zoo models
(optionally with another attention variant or fewer kv heads), export vanilla / GQA zoo models back, and run
zoo attention inside stock transformers models.

transformers is an optional dependency (`pip install 'attention-zoo[hf]'`); nothing else in the zoo imports
this package, and nothing here downloads anything: sources are local folders or in-memory models.

    from attention_zoo.hf import from_hf, to_hf, register
    zoo = from_hf("path/to/llama", variant="selective", kv_heads=2)   # CausalLM
    hf = to_hf(from_hf("path/to/llama"))                               # LlamaForCausalLM
    register()  # then AutoModelForCausalLM.from_pretrained(..., attn_implementation="zoo_selective")
"""
from __future__ import annotations

from .convert import from_hf
from .errors import ConversionError
from .export import to_hf
from .interface import register
from .weights import pool_kv_heads

__all__ = ["from_hf", "to_hf", "register", "pool_kv_heads", "ConversionError"]
