"""Tiny random models, tokenizers and SAEs for tests: no downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from steer_core.model import LoadedModel

VOCAB = 96
D_MODEL = 32


def byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, with BOS/EOS/PAD and optionally a chat template."""
    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in chars:
        if len(vocab) < VOCAB:
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<pad>"
    )
    if chat:
        fast.chat_template = (
            "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
        )
    return fast


def tiny_model(family: str, *, layers: int = 3, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=D_MODEL,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            **overrides,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=D_MODEL,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            sliding_window=16,
            **overrides,
        )
        model = Gemma3ForCausalLM(cfg)
        # Random norm weights, so g = 1 + w is far from 1 as in real Gemma checkpoints.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" in name or name.endswith("norm.weight"):
                    p.copy_(torch.randn_like(p) * 0.5)
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=D_MODEL,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **overrides,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_lm(family: str, *, chat: bool = True, **kwargs: Any) -> LoadedModel:
    model = tiny_model(family, **kwargs)
    return LoadedModel(model, byte_tokenizer(chat), f"tiny-{family}", f"tiny-{family}")


def build_sae(
    path: Path,
    *,
    d_in: int = D_MODEL,
    d_sae: int = 16,
    hook_name: str = "blocks.1.hook_resid_post",
    model_name: str = "tiny",
    seed: int = 0,
) -> Path:
    """A random StandardSAE saved in SAE Lens format."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name, model_name=model_name))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in))
    sae.save_model(path)
    return path


def run_llama_cpp_script(src: Path, script: str, *args: str) -> None:
    """One of llama.cpp's Python converters from its source tree, with the gguf-py it ships (not ours)."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, str(src / script), *args],
        check=True,
        capture_output=True,
        env={"PYTHONPATH": str(src / "gguf-py"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


def hook_count(model: torch.nn.Module) -> int:
    """Forward and pre-forward hooks on every module: 0 once every steering context has exited."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
