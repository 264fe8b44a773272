"""`scripts/probe.py`: a probe's lists replace a spec's held-out split, and the loader refuses a probe item that is
also in train or validation."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from debias.bias_spec import bias_spec_path, load_bias_spec

ROOT = Path(__file__).resolve().parents[1]


def _probe_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("probe", ROOT / "scripts" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _heldout_side(spec: dict) -> dict:
    groups = list(spec["groups"])
    return {"professions": {g: spec["contexts"][g]["heldout"] for g in groups},
            "gap_templates": spec["templates"]["heldout"],
            "attributes": {g: spec["attributes"][g]["heldout"] for g in groups},
            "statement_templates": spec["statements"]["templates"]["heldout"],
            "subjects": spec["statements"]["subjects"]["heldout"],
            "cue_templates": spec["cues"]["templates"]["heldout"],
            "cue_relatives": {g: spec["cues"]["relatives"][g]["heldout"] for g in groups},
            "factual": spec["factual"]["heldout"]}


def test_a_probe_replaces_the_held_out_split_and_a_train_item_in_it_is_refused(tmp_path):
    probe = _probe_module()
    spec = yaml.safe_load(bias_spec_path("gender").read_text())
    side = _heldout_side(spec)
    side["factual"] = [{"prompt": "Her Grace the duchess is a", "target": " woman.", "group": "female"},
                       {"prompt": "His Grace the duke is a", "target": " man.", "group": "male"}]
    side["extra_domains"] = {"hobbies": "hobbies and leisure"}
    side["attributes"]["female"] = [*side["attributes"]["female"],
                                    {"domain": "hobbies", "text": " loves knitting.", "plural": " love knitting."}]
    merged = probe.merge_probe(spec, side)
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(merged, allow_unicode=True))
    loaded = load_bias_spec(tmp_path / "ok.yaml")
    assert [f.prompt for f in loaded.factual["heldout"]] == ["Her Grace the duchess is a", "His Grace the duke is a"]
    assert spec["factual"]["heldout"][0] not in merged["factual"]["heldout"]
    assert merged["factual"]["train"] == spec["factual"]["train"]  # train and validation stay the spec's

    side["gap_templates"] = [*side["gap_templates"], spec["templates"]["train"][0]]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(probe.merge_probe(spec, side), allow_unicode=True))
    with pytest.raises(ValueError, match=spec["templates"]["train"][0].replace("{", r"\{").replace("}", r"\}")):
        load_bias_spec(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="probe key 'heldout_factual' is not one of"):
        probe.merge_probe(spec, {"heldout_factual": []})
