import csv
import json

import pytest
import torch
from torch import nn

from debias.commands.features import features_command
from debias.features import attribution as F
from debias.features import rank
from debias.features.select import select_features
from debias.models import hooks
from debias.models.scoring import next_token_logprobs, pronoun_ids
from debias.models.tiny import tiny_model, tiny_sae, tiny_tokenizer
from debias.prompts import default_prompt_dir, load_gap_prompts

PLANTED = 5
N_PROFESSIONS, N_TEMPLATES = 6, 3
BS = 64  # one batch per pass: tiny models are bound by per-forward overhead


class Planted(nn.Module):
    """The MLP's output plus `write` × relu(x · read - bias): a gender detector that writes a she-direction."""

    def __init__(self, mlp, read, bias, write):
        super().__init__()
        self.mlp, self.read, self.bias, self.write = mlp, read, bias, write

    def forward(self, x):
        return self.mlp(x) + torch.relu(x @ self.read - self.bias)[..., None] * self.write


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory):
    """A smaller train split (6 professions per gender x 3 templates) of the shipped files."""
    src, dest = default_prompt_dir(), tmp_path_factory.mktemp("prompts")
    for name, keep in (("templates_train.txt", N_TEMPLATES), ("professions_female_train.txt", N_PROFESSIONS),
                       ("professions_male_train.txt", N_PROFESSIONS), ("neutral_train.txt", 8)):
        lines = [ln for ln in (src / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        (dest / name).write_text("\n".join(lines[:keep]) + "\n")
    return dest


def _mlp_input_mean(model, tok, texts):
    got = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, args, out: got.append(args[0]))
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**enc)
    handle.remove()
    real = enc["attention_mask"].bool() & (enc["input_ids"] != tok.bos_token_id)
    return got[0][real].mean(0)


@pytest.fixture(scope="module")
def planted(prompt_dir):
    """Tiny llama whose layer-1 MLP gains a female-profession detector writing the direction that raises she over
    he; an SAE at blocks.1.hook_mlp_out whose latent PLANTED reads and writes exactly that direction."""
    model, tok = tiny_model(), tiny_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.mul_(10)  # margins of order 0.1 instead of 0.01
    site = hooks.resolve_hook(model, "blocks.1.hook_mlp_out", tok)
    prompts = load_gap_prompts("train", prompt_dir)
    she, he = pronoun_ids(tok)
    shift = torch.zeros(model.config.hidden_size, requires_grad=True)
    with hooks.replace(model, site, lambda x: x + shift):
        lp = next_token_logprobs(model, tok, prompts.prompts, BS)
    (lp[:, she] - lp[:, he]).mean().backward()
    write = shift.grad / shift.grad.norm()
    female, male = _mlp_input_mean(model, tok, prompts.female), _mlp_input_mean(model, tok, prompts.male)
    read = (female - male) / (female - male).norm()
    before = F._gap(model, tok, prompts, batch_size=BS)
    model.model.layers[1].mlp = Planted(model.model.layers[1].mlp, 10 * read, 5 * float((female + male) @ read),
                                        0.01 * write)
    sae = tiny_sae(model.config.hidden_size, site.hook_name)
    with torch.no_grad():
        sae.W_dec.mul_(0.1)  # reconstructions on the scale of the activations
        sae.W_enc[:, PLANTED], sae.b_enc[PLANTED], sae.W_dec[PLANTED] = write, 0.0, write
    return model, tok, sae, site, prompts, before


def test_planted_feature_is_found_confirmed_and_selected(planted, prompt_dir):
    model, tok, sae, site, prompts, before = planted
    att = F.attribute(model, tok, sae, site, prompts, BS)
    assert att.gap > before + 0.2  # the planted mechanism carries the gap
    ranked = att.latents.argsort(descending=True)
    assert ranked[0] == PLANTED and att.latents[PLANTED] > 5 * att.latents[ranked[1]]
    change = F.ablation_effect(model, tok, sae, site, prompts, [PLANTED], batch_size=BS)
    after = att.gap * (1 + change)
    assert change < -0.3 and abs(after) < abs(att.gap)
    assert abs(after - before) < 0.1 * abs(att.gap - before)  # ablation removes what was planted, not more
    assert rank.contrastive(model, tok, sae, site, prompts.female, prompts.male, BS)[PLANTED] > 0
    record = {}
    chosen = select_features(model, tok, sae, site, n=2, min_fire_rate=0.0, prompt_dir=prompt_dir, record=record,
                                batch_size=BS)
    assert chosen[0] == PLANTED and len(chosen) <= 2
    assert abs(record["ablated_gap"]) < abs(record["train_gap"]) and record["features"] == chosen
    assert chosen[:1] == select_features(model, tok, sae, site, n=1, min_fire_rate=0.0, prompt_dir=prompt_dir,
                                           precomputed=att, batch_size=BS)
    rows = rank.rank_features(model, tok, sae, site, n=3, gap_prompts=prompts, corpus_texts=prompts.prompts,
                           precomputed=att, batch_size=BS)
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["index"] == PLANTED
    assert rows[0]["ablation_change"] == pytest.approx(change, abs=1e-5)
    assert rows[0]["top_contexts"] and "[[" in rows[0]["top_contexts"][0] and len(rows[0]["top_tokens"]) == 5


def _gap_with(model, tok, site, prompts, fn):
    return F._gap(model, tok, prompts, site, fn, BS)


def test_attributions_and_error_sum_to_the_gap_derivative(planted):
    """Latents + error term = d gap / d alpha for x -> b_dec + alpha (x - b_dec) at alpha = 1; each latent's
    attribution = d gap / d(scale of that latent's decoded contribution)."""
    model, tok, sae, site, prompts, _ = planted
    att = F.attribute(model, tok, sae, site, prompts, BS)
    eps = 1e-2
    scaled = lambda a: lambda x: sae.b_dec + a * (x - sae.b_dec)  # noqa: E731
    fd = (_gap_with(model, tok, site, prompts, scaled(1 + eps)) - _gap_with(model, tok, site, prompts, scaled(1 - eps)))
    total = float(att.latents.sum()) + att.error
    assert total == pytest.approx(fd / (2 * eps), rel=2e-2, abs=1e-4)
    assert att.error != 0  # the error term is part of the decomposition
    for f in (PLANTED, int(att.latents.abs().argsort()[-2]), 0):
        def bump(a, f=f):
            return lambda x: x + a * sae.encode(x)[..., f:f + 1] * sae.W_dec[f]
        fd = _gap_with(model, tok, site, prompts, bump(eps)) - _gap_with(model, tok, site, prompts, bump(-eps))
        assert float(att.latents[f]) == pytest.approx(fd / (2 * eps), rel=2e-2, abs=1e-4)


def test_layer_attribution_is_grad_times_mlp_output(planted):
    model, tok, _, _, prompts, _ = planted
    rows = F.layer_attribution(model, tok, prompts, BS)
    assert [r["layer"] for r in rows] == list(range(model.config.num_hidden_layers))
    assert max(rows, key=lambda r: r["attribution"])["layer"] == 1  # where the detector was planted
    eps = 1e-2
    for row in rows:
        site = hooks.resolve_hook(model, row["hook_name"], tok)
        fd = (_gap_with(model, tok, site, prompts, lambda x: (1 + eps) * x)
              - _gap_with(model, tok, site, prompts, lambda x: (1 - eps) * x))
        assert row["attribution"] == pytest.approx(fd / (2 * eps), rel=2e-2, abs=1e-4)
        assert row["share"] == pytest.approx(row["attribution"] / row["gap"])


def test_selection_refuses_heldout_and_bad_arguments(planted):
    model, tok, sae, site, _, _ = planted
    with pytest.raises(ValueError, match="train split only"):
        select_features(model, tok, sae, site, split="heldout")
    with pytest.raises(ValueError, match="min_fire_rate"):
        select_features(model, tok, sae, site, min_fire_rate=2.0)


def test_features_command_writes_table_and_layer_view(prompt_dir, tmp_path, capsys):
    out = tmp_path / "features"
    features_command("tiny-llama", sae="tiny:blocks.1.hook_mlp_out", n=4, n_select=1, out=str(out), layers=True,
                       prompt_dir=str(prompt_dir), corpus_passages=0, batch_size=BS, dashboards=False)
    rows = list(csv.DictReader((out / "features.csv").open()))
    assert len(rows) == 4 and {"index", "attribution", "ablation_change", "fire_rate", "top_tokens"} <= set(rows[0])
    assert "<table" in (out / "features.html").read_text()
    selection = json.loads((out / "selection.json").read_text())
    assert len(selection["features"]) == 1 and selection["hook_name"] == "blocks.1.hook_mlp_out"
    assert len(list(csv.DictReader((out / "layer_attribution.csv").open()))) == 3
    assert (out / "layer_attribution.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*"))  # no temp files left behind
    assert "selected" in capsys.readouterr().out
