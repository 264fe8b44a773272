"""lm-evaluation-harness interop on a tiny model, offline: the shipped tasks run, CrowS-Pairs agrees with debias's
own sentence scores, and a steer file changes the harness's logits exactly as debias's hook does."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from debias import harness
from debias.edits.interventions import SAEClamp, SteeringVector, fit_steering_vector
from debias.edits.steer_file import load_steer_file, steer_entries, write_steer_file
from debias.models import hooks
from debias.models.tiny import save_tiny_model, tiny_sae_from_spec

pytestmark = pytest.mark.usefixtures("one_thread")
lm_eval = pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is an extra: {harness.INSTALL}")
HOOK = "blocks.1.hook_mlp_out"
TEXTS = ["The nurse said that she would come back.", "My brother, a pilot, said that"]
N = 6  # items per task: the harness's `limit`


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "export", "llama")


@pytest.fixture(scope="module")
def loaded(export_dir):
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(export_dir), hooks.resolve_hook(model, HOOK)


def test_shipped_tasks_run_offline_and_crows_agrees_with_debias_summed_scores(export_dir):
    rows = harness.compare(export_dir, "gender", limit=N, batch_size=8)  # runs the harness's hf model on the tasks
    crows, stereoset = rows["crows_pairs"], rows["stereoset"]
    assert crows["items"] == stereoset["items"] == N
    # the same items, scored by debias's own code with the harness's convention: the same numbers
    assert crows["harness pct_stereotype"] == pytest.approx(crows["debias stereo_pct, summed log-probs, strict"])
    assert crows["harness likelihood_diff (nats)"] == pytest.approx(crows["debias mean |summed difference| (nats)"],
                                                                    rel=1e-4)
    assert crows["harness likelihood_diff (nats)"] > 0
    for name in ("harness ss", "harness lms", "debias ss (per target, official)"):
        assert 0 <= stereoset[name] <= 100


def test_the_harness_runs_the_religion_tasks_too(export_dir):
    results = harness.evaluate(export_dir, "religion", limit=2, bootstrap_iters=0)
    assert set(results) == {"debias_crows_religion", "debias_stereoset_religion"}
    assert set(results["debias_stereoset_religion"]) >= {"ss", "lms"}


def test_every_shipped_axis_has_both_tasks_and_an_unshipped_one_is_refused():
    for domain in ("gender", "religion"):
        for name in harness.task_names(domain):
            assert (harness.task_dir() / f"{name}.yaml").is_file()
    with pytest.raises(ValueError, match=r"no harness task for bias axis 'race'.*\['gender', 'religion'\]"):
        harness.task_names("race")
    with pytest.raises(ValueError, match="harness suites must be among"):
        harness.task_names("gender", ["winobias"])
    line = harness.command("runs/export", "religion", steer_path="steer.pt")
    assert line[:5] == ["lm_eval", "--model", "steered", "--model_args", "pretrained=runs/export,steer_path=steer.pt"]
    assert "debias_crows_religion,debias_stereoset_religion" in line


def test_a_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'debias\[harness\]'"):
        harness.require_lm_eval()


def _harness_logits(export_dir, steer_path, ids):
    from lm_eval.models.hf_steered import SteeredModel

    steered = SteeredModel(pretrained=str(export_dir), steer_path=str(steer_path), device="cpu", dtype="float32")
    with torch.no_grad():
        return steered._model_call(ids)


def _ids(tok):
    return tok(TEXTS[:1], return_tensors="pt")["input_ids"]


def test_steering_file_changes_the_harness_logits_exactly_as_debias_does(export_dir, loaded, tmp_path):
    model, tok, site = loaded
    vector = fit_steering_vector(model, tok, site, TEXTS[:1], TEXTS[1:])
    steer = SteeringVector(site, vector, alpha=3.0)
    steer.set_strength(0.5)
    path = write_steer_file(steer, model, tmp_path / "steer.pt")
    entry = load_steer_file(path)["layers.1.mlp"]
    assert entry["action"] == "add" and entry["debias"]["exact"] is True
    ids = _ids(tok)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with steer.applied(model):
            ours = model(input_ids=ids).logits
    theirs = _harness_logits(export_dir, path, ids)
    assert torch.equal(theirs, ours)
    assert not torch.allclose(ours, base, atol=1e-4)


def test_clamp_file_is_the_documented_directional_clamp_and_says_it_is_not_exact(export_dir, loaded, tmp_path):
    model, tok, site = loaded
    sae = tiny_sae_from_spec(f"tiny:{HOOK}", model)
    clamp = SAEClamp(sae, site, [5], value=0.0)
    path = write_steer_file(clamp, model, tmp_path / "clamp.pt")
    entry = load_steer_file(path)["layers.1.mlp"]
    assert entry["action"] == "clamp" and entry["debias"]["exact"] is False and "b_dec" in entry["debias"]["note"]
    row, bias = sae.W_dec[5].detach(), sae.b_dec.detach()
    d = row / row.norm()

    def documented(acts):  # the component of acts - b_dec along the decoder row set to value * |row|
        return acts + d * (0.0 * row.norm() - ((acts - bias) * d).sum(-1, keepdim=True))

    ids = _ids(tok)
    with torch.no_grad():
        with hooks.replace(model, site, documented):
            expected = model(input_ids=ids).logits
        with clamp.applied(model):
            debias_clamp = model(input_ids=ids).logits
        base = model(input_ids=ids).logits
    theirs = _harness_logits(export_dir, path, ids)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theirs, base, atol=1e-4)
    assert not torch.allclose(theirs, debias_clamp, atol=1e-4)  # the approximation is not debias's clamp


def test_steer_files_that_cannot_be_written_are_refused(loaded, tmp_path):
    model, tok, site = loaded
    sae = tiny_sae_from_spec(f"tiny:{HOOK}", model)
    with pytest.raises(ValueError, match=r"sae_clamp of 2 latents \[1, 2\] has no steer file"):
        steer_entries(SAEClamp(sae, site, [1, 2]), model)
    half = SAEClamp(sae, site, [1])
    half.set_strength(0.5)
    with pytest.raises(ValueError, match="strength 0.5"):
        steer_entries(half, model)
    with pytest.raises(ValueError, match="not object: a trained edit is a weight change"):
        steer_entries(object(), model)
    with pytest.raises(ValueError, match=r"\.pt or \.pth"):
        write_steer_file(SteeringVector(site, torch.ones(32), 1.0), model, tmp_path / "steer.safetensors")
    with pytest.raises(ValueError, match="steering vector has dimension 4"):
        steer_entries(SteeringVector(site, torch.ones(4), 1.0), model)
    mlp_in = hooks.resolve_hook(model, "blocks.1.mlp.hook_post")  # an input, and not the output of any module
    with pytest.raises(ValueError, match="edits module outputs"):
        steer_entries(SteeringVector(mlp_in, torch.ones(model.config.intermediate_size), 1.0), model)
    (tmp_path / "other.pt").write_bytes(b"not a pickle")
    with pytest.raises(Exception):  # noqa: B017 - torch's own unpickling error
        load_steer_file(tmp_path / "other.pt")
    torch.save({"layers.0": {"steering_vector": torch.ones(2)}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="is not a steer file"):
        load_steer_file(tmp_path / "partial.pt")


def test_a_residual_input_hook_is_written_on_the_previous_block_output(loaded):
    model, _, _ = loaded
    site = hooks.resolve_hook(model, "blocks.1.hook_resid_pre")
    assert site.position == "input"
    entries = steer_entries(SteeringVector(site, torch.ones(model.config.hidden_size), 2.0), model)
    assert list(entries) == ["layers.0"]
