import json
import shutil

import pytest

from distill.rollout.engine import EXPORT_MANIFEST, verified_weights_hash, weights_hash


def export_dir(tmp_path, tiny_model, gate, name="model"):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(tiny_model / "model.safetensors", d)
    (d / EXPORT_MANIFEST).write_text(json.dumps({"weights_sha256": weights_hash(d), "gate": gate}))
    return d


def test_passed_export_is_accepted(tmp_path, tiny_model):
    d = export_dir(tmp_path, tiny_model, "passed")
    assert verified_weights_hash(d) == weights_hash(d)
    assert verified_weights_hash(tiny_model) == weights_hash(tiny_model)  # a base model has no export record


def test_ungated_or_changed_export_is_refused(tmp_path, tiny_model):
    d = export_dir(tmp_path, tiny_model, "pending")
    with pytest.raises(RuntimeError, match="export gate has not passed"):
        verified_weights_hash(d)
    d = export_dir(tmp_path, tiny_model, "passed", name="changed")
    with (d / "model.safetensors").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(RuntimeError, match="weights changed since export"):
        verified_weights_hash(d)
