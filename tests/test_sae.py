"""Loading and validating sae_lens SAEs, with tiny SAEs saved to disk (no downloads)."""

import pytest
import torch

from debias.models.hooks import resolve_hook
from debias.models.tiny import tiny_model, tiny_sae
from debias.sae.load import check_features, check_sae_fits, load_sae, sae_hook_name

HOOK = "blocks.1.hook_mlp_out"


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_load_sae_round_trip(tmp_path, architecture):
    sae = tiny_sae(32, HOOK, architecture=architecture)
    sae.save_model(tmp_path)
    loaded = load_sae(str(tmp_path))
    assert type(loaded) is type(sae)
    assert sae_hook_name(loaded) == HOOK
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=0, rtol=0)
    assert load_sae(tmp_path, dtype=torch.float64).W_enc.dtype == torch.float64


def test_load_sae_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_sae(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="sae_id"):
        load_sae("gemma-scope-2b-pt-mlp-canonical")

    from huggingface_hub.errors import LocalEntryNotFoundError
    from sae_lens import SAE

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(SAE, "from_pretrained", offline)
    with pytest.raises(OSError, match="hub"):
        load_sae("gemma-scope-2b-pt-mlp-canonical", "layer_12/width_16k/canonical")


def test_sae_hook_name_missing():
    sae = tiny_sae(32, HOOK)
    sae.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="hook_name"):
        sae_hook_name(sae)


def test_check_sae_fits():
    model = tiny_model("gemma2")
    site = resolve_hook(model, HOOK)
    check_sae_fits(tiny_sae(32, HOOK), model, site)
    with pytest.raises(ValueError, match="48") as err:
        check_sae_fits(tiny_sae(48, HOOK), model, site)
    assert "32" in str(err.value) and HOOK in str(err.value) and "Gemma2" in str(err.value)


def test_check_features():
    sae = tiny_sae(32, HOOK, d_sae=64)
    check_features(sae, [0, 5, 63])
    for bad in ([64], [3, -1], [1.5]):
        with pytest.raises(ValueError, match="64" if bad != [1.5] else "integer") as err:
            check_features(sae, bad)
        assert str(bad[-1]) in str(err.value)
    with pytest.raises(ValueError):
        check_features(sae, [])
