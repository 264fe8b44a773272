"""Tiny random models, tokenizer and SAEs, built offline.

They serve the unit tests and `configs/tiny.yaml`: the same code paths as the hub models (Llama / SmolLM2,
Qwen2, Mistral, Gemma-2, GPT-2 families) at a size that runs in seconds on a CPU.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

# A little English with the words the bias metric and prompts use, so that " she", " he" and the
# professions become single BPE tokens of the tiny tokenizer.
_CORPUS = """
The nurse said that she would come back. The engineer said that he would come back.
My sister, a carpenter, said that she was tired. My brother, a nurse, said that he was tired.
The secretary told us that she was late. The mechanic told us that he was late.
The doctor thinks she is right. The teacher thinks he is right. They said that they would help.
A woman and a man walked into the room. The receptionist, the pilot, the librarian and the plumber met.
Once upon a time there was a small town by the sea where people worked and talked every day.
The weather was warm and the children played in the park while their parents read the news.
"""

FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gpt2")


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 400) with a BOS token and a pad token distinct from it."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(_tokenizer_json())
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


def tiny_config(family: str = "llama", n_layers: int = 3, d_model: int = 32, d_mlp: int = 64):
    """A transformers config of the given family, small enough for unit tests."""
    import transformers as tf

    vocab = len(tiny_tokenizer())
    # Annotated as Any-valued: these are keyword arguments for configs whose parameters have many types.
    common: dict[str, Any] = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_inner=d_mlp, n_positions=128, **common)
    attn: dict[str, Any] = dict(
        hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    if family == "llama":
        return tf.LlamaConfig(**attn, **common)
    if family == "qwen2":
        return tf.Qwen2Config(**attn, **common)
    if family == "mistral":
        return tf.MistralConfig(**attn, sliding_window=None, **common)
    if family == "gemma2":
        return tf.Gemma2Config(**attn, head_dim=d_model // 4, **common)
    raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")


def tiny_model(family: str = "llama", seed: int = 0, **sizes):
    """A randomly initialised causal LM of `family` in eval mode (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **sizes)).eval()


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, **sizes) -> Path:
    """Save a tiny model and its tokenizer as an ordinary HF directory; returns the path."""
    path = Path(path)
    tiny_model(family, seed, **sizes).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_sae(d_in: int, hook_name: str, d_sae: int = 64, architecture: str = "standard", seed: int = 0,
             **cfg_overrides):
    """A random sae_lens SAE (`standard`, `topk` or `jumprelu`) reading `hook_name`.

    Encoder biases are positive so that most latents fire on random activations, as a trained SAE's chosen
    feature would on its prompts.
    """
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    classes = {
        "standard": (StandardSAE, StandardSAEConfig, {}),
        "topk": (TopKSAE, TopKSAEConfig, {"k": max(1, d_sae // 4)}),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    }
    if architecture not in classes:
        raise ValueError(f"unknown SAE architecture {architecture!r}; expected one of {sorted(classes)}")
    cls, cfg_cls, extra = classes[architecture]
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", **{**extra, **cfg_overrides})
    cfg.metadata.hook_name = hook_name
    sae = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "b_enc":
                param.copy_(0.05 + 0.05 * torch.rand(param.shape, generator=gen))
            elif name == "threshold":
                param.fill_(0.01)
            elif param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[0] ** 0.5)
            else:
                param.zero_()
    return sae.eval()


def tiny_sae_from_spec(spec: str, model, d_sae: int = 64):
    """`tiny:HOOK_NAME[:ARCHITECTURE]` → a random SAE reading that hook of `model` (d_in = the model's width)."""
    _, hook_name, *arch = spec.split(":")
    if not hook_name:
        raise ValueError(f"expected tiny:HOOK_NAME[:ARCHITECTURE], got {spec!r}")
    cfg = model.config
    d_in = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return tiny_sae(d_in, hook_name, d_sae=d_sae, architecture=arch[0] if arch else "standard")
