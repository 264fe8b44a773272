"""Text completions from a causal LM, optionally under an inference-time intervention (`debias generate`)."""

from __future__ import annotations

import contextlib
import math

import torch


@contextlib.contextmanager
def _left_padding(tokenizer):
    """Pad on the left inside the block (batched generation appends after the last column); EOS pads if no pad."""
    side = tokenizer.padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _use_chat(tokenizer, chat: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat_template; pass chat=False for raw text")
    return has_template if chat is None else bool(chat)


def _encode(tokenizer, prompts: list[str], chat: bool, device) -> dict[str, torch.Tensor]:
    """Left-padded input ids [batch, seq]; chat prompts go through the chat template (which holds any BOS)."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    empty = [p for p, n in zip(prompts, enc["attention_mask"].sum(-1).tolist(), strict=False) if n == 0]
    if empty:
        raise ValueError(f"prompt(s) encode to zero tokens: {empty[:3]}")
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def _generation_config(model, tokenizer, max_new_tokens: int, sample: bool, temperature: float, top_p: float):
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                            **sampling)


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> list[str]:
    errors = []
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        errors.append(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        errors.append(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        errors.append(f"top_p must lie in (0, 1], got {top_p!r}")
    return errors


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, chat: bool | None = None,
             intervention=None, batch_size: int = 16) -> list[str]:
    """The new text (special tokens skipped) `model.generate` appends to each prompt.

    Greedy unless `sample` (then seeded by `seed`, reproducible; the global RNG state is restored afterwards).
    `chat`: None applies the tokenizer's chat template (one user turn, generation prompt added) when it has one,
    else raw text; True requires a template; False uses raw text. Batches are left-padded, so a batch gives
    the same greedy text as one prompt at a time. With `intervention`, generation runs inside
    `intervention.applied(model)` (its hook also edits each new token's activations under the KV cache).
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string")
    errors = _check_sampling(max_new_tokens, temperature, top_p)
    if errors:
        raise ValueError("; ".join(errors))
    use_chat = _use_chat(tokenizer, chat)
    device = next(model.parameters()).device
    forks = [device.index or 0] if device.type == "cuda" else []
    out: list[str] = []
    applied = intervention.applied(model) if intervention is not None else contextlib.nullcontext()
    with _left_padding(tokenizer), applied, torch.no_grad(), torch.random.fork_rng(devices=forks):
        config = _generation_config(model, tokenizer, max_new_tokens, sample, temperature, top_p)
        for start in range(0, len(prompts), batch_size):
            enc = _encode(tokenizer, prompts[start:start + batch_size], use_chat, device)
            torch.manual_seed(seed + start)
            ids = model.generate(**enc, generation_config=config)
            new = ids[:, enc["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def report_completions(model, tokenizer, prompts: list[str], before_ctx, after_ctx,
                       max_new_tokens: int = 32) -> list[dict]:
    """[{prompt, before, after}]: greedy raw-text completions (chat=False) inside `before_ctx()` and `after_ctx()`,
    zero-argument callables returning context managers (e.g. `lambda: delta.disabled()`, `contextlib.nullcontext`)."""
    with before_ctx():
        before = complete(model, tokenizer, prompts, max_new_tokens, chat=False)
    with after_ctx():
        after = complete(model, tokenizer, prompts, max_new_tokens, chat=False)
    return [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after, strict=False)]


