"""Feature dashboards: for each chosen latent and each latent the edit moved most, its top-activating corpus
contexts, activation histogram, decoder logit effects and held-out activation before and after the edit, as one
self-contained HTML page (`dashboards.html`, beside `report.png`).

Why not `sae-dashboard` (PyPI 0.8.0, read 2026-12-05): it cannot run in this environment or on our models.
- Its pins exclude ours: `transformers<4.57`, `transformer-lens<3`, `datasets<4`, `safetensors<0.5` (we run
  transformers 5, transformer-lens 3.9, datasets 5, safetensors 0.8), plus `decode-clt` and `hf-transfer`.
- It runs a `HookedSAETransformer` (`TransformerLensWrapper` reads `model.hook_dict`, `data_parsing_fns` asserts
  `isinstance(model, HookedTransformer)`); ours are plain HF models hooked through `debias.models.hooks`.
- Its page loads d3 and plotly from CDNs (`html_fns.py`), so it is neither offline nor self-contained.
So the four parts are computed here from the project's corpus, hooks and feature statistics, and drawn as inline
SVG with no script.
"""

from __future__ import annotations

from pathlib import Path

from debias.dashboards.build import Page, build_page, heldout_means
from debias.dashboards.contexts import DEFAULT_TOKENS
from debias.dashboards.page import render

FILENAME = "dashboards.html"

__all__ = ["DEFAULT_TOKENS", "FILENAME", "Page", "build_page", "edit_title", "heldout_means", "render",
           "write_for_module", "write_page"]


def write_page(page: Page, path: str | Path) -> Path:
    """Write `page` as one HTML file at `path` (atomically); returns the path."""
    from debias.io import atomic_write

    path = Path(path)
    atomic_write(path, render(page))
    return path


def edit_title(model_id: str, method: str, parameters: list[str], layers: list[int]) -> str:
    """The page's title: the model, the method and every matrix the edit spans (a multi-layer mask names its layers)."""
    where = parameters[0] if len(parameters) == 1 else "W_out of layers " + ", ".join(map(str, layers))
    return f"{model_id}: {method} edit of {where}"


def write_for_module(module, texts: list[str], folder: str | Path, n_tokens: int = DEFAULT_TOKENS) -> Path:
    """`folder/dashboards.html` for a prepared `DebiasModule`: its chosen features and the latents its edit moved
    most on `texts` (the held-out bias prompts); "before", and the corpus contexts and histograms, come from the
    same network with the edit disabled (the model the SAE describes)."""
    where, cut = (module.net, module.tokenizer, module.sae, module.site), module.train_args.max_length
    after = heldout_means(*where, texts, max_length=cut)
    with module.delta.disabled():
        page = build_page(*where, module.features, texts, heldout_means(*where, texts, max_length=cut), after,
                          edit_title(module.model_id, module.edit_args.method, module.parameters_edited,
                                     module.layers_edited), n_tokens,
                          release=module.sae_args.spec, sae_id=module.sae_args.sae_id)
    return write_page(page, Path(folder) / FILENAME)
