"""Feature dashboards (`debias.dashboards`): the four parts for every latent, the latents chosen, logit effects through
the final norm, escaping and self-containment; `fit` and `debias features` write the page; a slow test renders it in
headless Chromium."""

import dataclasses
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from debias import dashboards
from debias.dashboards.build import moved_most, neuronpedia_base
from debias.dashboards.contexts import Context, corpus_view
from debias.dashboards.logits import logit_effects
from debias.features.rank import decoder_logits, top_promoted_tokens
from debias.models import hooks
from debias.models.tiny import tiny_model, tiny_sae, tiny_tokenizer
from debias.prompts import default_prompt_dir, load_gap_prompts

HOOK = "blocks.1.hook_mlp_out"
CHOSEN = [3, 4]
PARTS = ("heldout", "histogram", "logits", "contexts")
EVIL = "<script>window.__pwned=1</script>"


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sae = tiny_sae(model.config.hidden_size, HOOK)
    return model, tok, sae, hooks.resolve_hook(model, HOOK, tok)


def _shift(before: torch.Tensor) -> torch.Tensor:
    """`before` with the chosen latents and latents 10..21 moved, by amounts that order them (21 most)."""
    after = before.clone()
    after[CHOSEN] += 5.0
    for j in range(12):
        after[10 + j] += (-1) ** j * 0.01 * (j + 1)
    return after


@pytest.fixture(scope="module")
def built(tiny):
    model, tok, sae, site = tiny
    texts = load_gap_prompts("heldout").prompts[:24]
    before = dashboards.heldout_means(model, tok, sae, site, texts)
    after = _shift(before)
    page = dashboards.build_page(model, tok, sae, site, CHOSEN, texts, before, after, "tiny <b>title</b>",
                                 n_tokens=1024)
    return page, before, after


class Sections(HTMLParser):
    """{latent: {part: {"#text": ..., tag or .class: count}}} of a dashboards page."""

    def __init__(self, text: str):
        super().__init__()
        self.boards: dict[int, dict[str, dict]] = {}
        self.stack: list[str] = []
        self.latent, self.part, self.part_depth = None, None, 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "dash" in classes:
            self.latent = int(attrs["data-latent"])
            self.boards[self.latent] = {}
        for c in classes:
            if c.startswith("part-") and self.latent is not None:
                self.part, self.part_depth = c.removeprefix("part-"), len(self.stack)
                self.boards[self.latent][self.part] = {"#text": ""}
        if self.part is not None:
            counts = self.boards[self.latent][self.part]
            for key in [tag, *(f".{c}" for c in classes)]:
                counts[key] = counts.get(key, 0) + 1
        if tag not in ("meta", "br", "rect"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in ("meta", "br", "rect"):
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag == "rect":
            return
        self.stack.pop()
        if self.part is not None and len(self.stack) == self.part_depth:
            self.part = None
        if tag == "section":
            self.latent = None

    def handle_data(self, data):
        if self.part is not None:
            self.boards[self.latent][self.part]["#text"] += data


def test_page_holds_the_four_parts_for_each_latent(built):
    page, before, after = built
    text = dashboards.render(page)
    boards = Sections(text).boards
    moved = [21, 20, 19, 18, 17, 16, 15, 14, 13, 12]  # the ten largest moves outside the chosen latents
    assert list(boards) == CHOSEN + moved
    assert [b.role for b in page.dashboards] == ["chosen"] * 2 + ["moved"] * 10
    for latent, parts in boards.items():
        assert set(parts) == set(PARTS), latent
        held = parts["heldout"]["#text"]
        assert f"{float(before[latent]):.4g}" in held and f"{float(after[latent]):.4g}" in held
        assert parts["histogram"]["svg"] == 1 and parts["histogram"]["rect"] == 24  # a bar per bin
        assert parts["logits"]["tr"] == 2 * (10 + 1) and "raised" in parts["logits"]["#text"]
        assert parts["contexts"][".ctx"] == 8 and parts["contexts"][".peak"] == 8  # one highlighted token each
    board = page.dashboards[0]
    assert board.corpus.n_tokens > 900 and 0 < board.corpus.fire_rate <= 1
    assert sum(board.corpus.counts) == round(board.corpus.fire_rate * board.corpus.n_tokens)


def test_corpus_view_picks_each_sequences_peak():
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("The nurse said that she would come back.")["input_ids"][:8]] * 3)
    real = torch.ones_like(ids, dtype=torch.bool)
    real[:, 0] = False  # BOS
    acts = torch.zeros(3, 8)
    acts[0, 0] = 9.0  # at BOS: never counted
    acts[0, 2], acts[0, 5] = 1.0, 2.0
    acts[2, 4] = 3.0
    view = corpus_view(tok, ids, real, acts, n_contexts=5, bins=4, before=2, after=1)
    assert [c.acts[c.peak] for c in view.contexts] == [3.0, 2.0]  # sequence 1 never fires; one context per sequence
    assert view.contexts[0].tokens == [tok.decode([int(i)]) for i in ids[2, 2:6]] and view.contexts[0].peak == 2
    assert sum(view.counts) == 3 and view.fire_rate == pytest.approx(3 / 21) and view.edges[-1] == 3.0


def test_moved_most_excludes_the_chosen_and_the_unmoved():
    before = torch.zeros(6)
    after = torch.tensor([5.0, -0.3, 0.2, 0.0, 0.3, 0.0])
    assert moved_most(before, after, exclude=[0], n=3) == [1, 4, 2]
    assert moved_most(before, after, exclude=[0], n=10) == [1, 4, 2]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_logit_effects_read_the_direction_through_the_final_norm(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    with torch.no_grad():  # a gain far from 1 (and a LayerNorm bias) that a missing fold would show
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(1)) * 4)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    sae = tiny_sae(norm.weight.shape[0], "blocks.1.hook_mlp_out")
    d = sae.W_dec[[2, 5]]
    if family == "gpt2":  # LayerNorm centres, scales by the std and adds a bias that no direction owns
        d = d - d.mean(-1, keepdim=True)
        folded = d / (d.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight
    elif family == "gemma2":  # Gemma's RMSNorm scales by (1 + w)
        folded = d / (d.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * (1 + norm.weight)
    else:
        folded = d / (d.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt() * norm.weight
    expected = folded @ model.get_output_embeddings().weight.T
    got = decoder_logits(model, sae, [2, 5])
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-5)
    raw = sae.W_dec[[2, 5]] @ model.get_output_embeddings().weight.T
    assert not torch.equal(got[0].topk(10).indices, raw[0].topk(10).indices)  # the fold changes the ranking
    assert top_promoted_tokens(model, tok, sae, [2, 5], k=3)[5] == [tok.decode([int(i)]) for i in got[1].topk(3).indices]
    effects = logit_effects(model, tok, sae, [2, 5], k=3)[2]
    assert [v for _, v in effects.top] == pytest.approx(got[0].topk(3).values.tolist())
    assert [v for _, v in effects.bottom] == pytest.approx(got[0].topk(3, largest=False).values.tolist())


def test_an_sae_off_the_residual_stream_gets_a_note_not_logits(tiny):
    model, tok, _, _ = tiny
    wide = tiny_sae(model.config.intermediate_size, "blocks.1.mlp.hook_post")
    effects = logit_effects(model, tok, wide, [0])[0]
    assert effects.top == effects.bottom == [] and "64-wide space" in effects.note


def test_text_is_escaped_not_run(built):
    page, _, _ = built
    board = page.dashboards[0]
    evil = Context(["a", EVIL, '"><img src=x onerror=alert(1)>'], [0.1, 1.0, 0.2], 1)
    corpus = dataclasses.replace(board.corpus, contexts=[evil])
    logits = dataclasses.replace(board.logits, top=[("</td><script>alert(2)</script>", 1.0)])
    page = dataclasses.replace(page, dashboards=[dataclasses.replace(board, corpus=corpus, logits=logits)])
    text = dashboards.render(page)
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in text and "&lt;/td&gt;&lt;script&gt;" in text
    assert "<script" not in text.lower() and "<img" not in text.lower() and "<b>" not in text
    assert "tiny &lt;b&gt;title&lt;/b&gt;" in text


def test_page_is_self_contained(built):
    text = dashboards.render(built[0])
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    for needle in ("<script", "<link", "<iframe", "<img", "src=", "url(", "@import", "http://"):
        assert needle not in text.lower(), needle
    hrefs = re.findall(r'href="([^"]*)"', text)
    assert hrefs and all(h.startswith("#latent-") for h in hrefs)  # a project SAE: no Neuronpedia link


def test_public_release_latents_link_to_neuronpedia():
    model, tok = tiny_model("gemma2"), tiny_tokenizer()  # Gemma Scope's path: hook_mlp_out after the post-MLP norm
    site = hooks.resolve_hook(model, HOOK, tok)
    assert site.module_name.endswith("post_feedforward_layernorm")
    release, sae_id = "gemma-scope-2b-pt-mlp-canonical", "layer_12/width_16k/canonical"
    assert neuronpedia_base(tiny_sae(32, HOOK), release, sae_id) == "https://neuronpedia.org/gemma-2-2b/12-gemmascope-mlp-16k"
    assert neuronpedia_base(tiny_sae(32, HOOK), "/some/dir", None) is None
    sae = tiny_sae(32, HOOK)
    sae.cfg.metadata.neuronpedia_id = "gemma-2-2b/12-gemmascope-mlp-16k"  # as SAE.from_pretrained sets it
    texts = ["The nurse said that"]
    before = dashboards.heldout_means(model, tok, sae, site, texts)
    page = dashboards.build_page(model, tok, sae, site, [7], texts, before, None, "t", n_tokens=256)
    text = dashboards.render(page)
    assert 'href="https://neuronpedia.org/gemma-2-2b/12-gemmascope-mlp-16k/7"' in text
    assert "after: no edited model given" in text and page.dashboards[0].after is None


def test_bad_input_gets_a_one_line_error(tiny, tmp_path):
    from debias.callbacks import ReportAndExport
    from debias.commands.features import features_command

    with pytest.raises(FileNotFoundError, match=r"templates_heldout.txt \(the dashboards' held-out prompts; --dashboards"):
        features_command("tiny-llama", sae=f"tiny:{HOOK}", prompt_dir=str(tmp_path), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="--edited 'x' is shown on the dashboards page; it needs --dashboards true"):
        features_command("tiny-llama", sae=f"tiny:{HOOK}", dashboards=False, edited="x", out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--dashboard_tokens must be >= 128 \(one corpus window\), got 3"):
        features_command("tiny-llama", sae=f"tiny:{HOOK}", dashboard_tokens=3, out=str(tmp_path / "out"))

    model, tok, sae, site = tiny
    before = torch.zeros(sae.cfg.d_sae)
    with pytest.raises(ValueError, match="need an SAE"):
        dashboards.build_page(model, tok, None, site, [1], ["x"], before, None, "t")
    with pytest.raises(ValueError, match="at least one chosen latent"):
        dashboards.build_page(model, tok, sae, site, [], ["x"], before, None, "t")
    with pytest.raises(ValueError, match=r"SAE feature index 64 out of range: the SAE has d_sae=64"):
        dashboards.build_page(model, tok, sae, site, [1, 64], ["x"], before, None, "t")
    with pytest.raises(ValueError, match="dashboard_tokens must be at least seq_len=128"):
        dashboards.build_page(model, tok, sae, site, [1], ["x"], before, None, "t", n_tokens=10)
    with pytest.raises(ValueError, match=r"export.dashboard_tokens must be >= 128 .*got 5"):
        ReportAndExport(dashboard_tokens=5)
    def run(method: str, feature: float = 0.0, ablation: float = 0.0):
        return SimpleNamespace(edit_args=SimpleNamespace(method=method),
                               objective=SimpleNamespace(feature=feature, ablation=ablation))

    for method in ("bias_gradient", "dense"):
        with pytest.raises(ValueError, match=f"this run uses no SAE \\(method '{method}', no feature or ablation"):
            ReportAndExport(export_dir=None, dashboards=True).setup(None, run(method), "fit")
        quiet = ReportAndExport(export_dir=None)  # the default: off for such a run, no error
        quiet.setup(None, run(method), "fit")
        assert quiet.dashboards is False
        for weights in ({"feature": 1.0}, {"ablation": 0.5}):  # the default config: bias_gradient + feature term
            shown = ReportAndExport(export_dir=None)
            shown.setup(None, run(method, **weights), "fit")
            assert shown.dashboards is True
    on = ReportAndExport(export_dir=None, plots=False)
    on.setup(None, run("instability", feature=1.0), "fit")
    assert on.dashboards is False  # the page goes beside report.png: no plots, no page


def test_the_title_names_every_matrix_the_edit_spans():
    one = dashboards.edit_title("m", "instability", ["model.layers.1.mlp.down_proj.weight"], [1])
    several = dashboards.edit_title("m", "bias_gradient", [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 2)],
                                    [0, 2])
    assert one == "m: instability edit of model.layers.1.mlp.down_proj.weight"
    assert several == "m: bias_gradient edit of W_out of layers 0, 2"


def test_fit_and_features_write_the_page(tmp_path, capsys):
    from conftest import make_data, make_module, make_trainer

    from debias.callbacks import ReportAndExport
    from debias.commands.features import features_command

    module = make_module()
    callback = ReportAndExport(export_dir=str(tmp_path / "run" / "export"), completions=0, dashboard_tokens=512)
    make_trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(module, datamodule=make_data())
    page = tmp_path / "run" / dashboards.FILENAME
    assert (tmp_path / "run" / "report.png").is_file() and page.is_file()
    boards = Sections(page.read_text()).boards
    assert list(boards)[0] == 3 and len(boards) == 11  # the chosen feature and the ten the edit moved most
    assert all(set(parts) == set(PARTS) for parts in boards.values())
    assert "dashboards in" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "export" / "debias" / "report.json").read_text())
    held = boards[3]["heldout"]["#text"]  # the report's feature_act, read the same way (real tokens, same cut)
    assert f"{report['before']['feature_act']:.4g}" in held and f"{report['after']['feature_act']:.4g}" in held

    out, prompts = tmp_path / "features", tmp_path / "prompts"
    prompts.mkdir()
    for path in default_prompt_dir().glob("*.txt"):  # four lines of each file: a quick selection
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        (prompts / path.name).write_text("\n".join(lines[:4]) + "\n")
    features_command("tiny-llama", sae=f"tiny:{HOOK}", n=2, n_select=1, out=str(out), corpus_passages=0,
                     dashboard_tokens=512, edited=str(tmp_path / "run" / "export"), prompt_dir=str(prompts))
    again = Sections((out / dashboards.FILENAME).read_text()).boards
    assert list(again)[0] == report["features"][0] and len(again) == 11
    assert "after" in again[3]["heldout"]["#text"]
    for part in ("contexts", "histogram", "logits"):  # both describe the original model: fit reads it edit disabled
        assert again[3][part] == boards[3][part], part
    with pytest.raises(FileNotFoundError, match="not an export of `debias fit`"):
        features_command("tiny-llama", sae=f"tiny:{HOOK}", out=str(out), edited=str(tmp_path))


# ----- the page in a real browser -----

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=5000"]

# Console errors are caught inside the page rather than by parsing Chromium's stderr: `--enable-logging=stderr`
# mixes the page's console with the browser's own noise (dbus, GPU, crash handler) in a format that changes between
# releases, and says nothing when a message is dropped. A hook that runs first instead records every script error,
# failed resource, CSP violation and console.error/warn call, measures each rendered part after `load`, and writes
# the result into the DOM, which `--dump-dom` prints. The page's CSP allows no script, so the test lets in only this
# hook, by nonce: a script that escaped the escaping still cannot run, and its blocked attempt is recorded.
PROBE = """<script nonce="debias-probe">(() => {
const errors = [], note = (kind, text) => errors.push(kind + ": " + text);
addEventListener("error", e => note("error", e.message || (e.target && (e.target.src || e.target.href)) || "?"), true);
addEventListener("unhandledrejection", e => note("rejection", String(e.reason)));
document.addEventListener("securitypolicyviolation", e => note("csp", e.violatedDirective + " " + e.blockedURI));
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { note("console." + level, args.join(" ")); original.apply(console, args); };
}
addEventListener("load", () => setTimeout(() => {
  const size = el => el ? Math.round(el.getBoundingClientRect().width * el.getBoundingClientRect().height) : 0;
  const boards = [...document.querySelectorAll("section.dash")].map(s => ({latent: Number(s.dataset.latent),
    bars: [...s.querySelectorAll(".part-histogram rect")].filter(r => size(r) > 0).length,
    ...Object.fromEntries(["heldout", "histogram", "logits", "contexts"].map(p => [p, size(s.querySelector(".part-" + p))]))}));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({errors, boards, pwned: window.__pwned === 1});
  document.body.appendChild(out);
}, 0));
})();</script>"""


def _probe(html_text: str, tmp_path: Path, name: str) -> tuple[dict, str]:
    """Open `html_text` in headless Chromium with the probe; returns (the probe's record, the dumped DOM)."""
    csp = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    assert csp in html_text
    instrumented = html_text.replace(csp, csp + "; script-src 'nonce-debias-probe'").replace("<title>",
                                                                                                PROBE + "<title>", 1)
    path = tmp_path / f"{name}.html"
    path.write_text(instrumented)
    result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / (name + '-profile')}", "--dump-dom",
                             path.as_uri()], capture_output=True, text=True, timeout=120)
    dom = result.stdout
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, f"the probe never reported (chromium rc {result.returncode}): {result.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(match.group(1))), dom


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_page_renders_in_headless_chromium_without_console_errors(built, tmp_path):
    page = built[0]
    board = page.dashboards[0]
    evil = dataclasses.replace(board.corpus, contexts=[Context(["a", EVIL], [0.5, 1.0], 1), *board.corpus.contexts])
    page = dataclasses.replace(page, dashboards=[dataclasses.replace(board, corpus=evil), *page.dashboards[1:]])
    record, dom = _probe(dashboards.render(page), tmp_path, "page")
    assert record["errors"] == [] and record["pwned"] is False
    assert [b["latent"] for b in record["boards"]] == [b.latent for b in page.dashboards]
    for parts in record["boards"]:
        assert all(parts[p] > 1000 for p in PARTS), parts  # each part laid out with a real size (pixels²)
        assert parts["bars"] > 0, parts
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in dom  # shown as text

    # The probe itself must catch what it is there for: a script error, a blocked script and a network fetch.
    broken = dashboards.render(page).replace(
        "</body>", '<script nonce="debias-probe">undefined_function()</script><script>window.__pwned=1</script>'
                   '<img src="https://example.invalid/x.png"></body>')
    record, _ = _probe(broken, tmp_path, "broken")
    kinds = " ".join(record["errors"])
    assert "undefined_function" in kinds and "script-src" in kinds and "example.invalid" in kinds
    assert record["pwned"] is False
