"""Model files: metadata and SHA-256 travel with the weights; anything altered is refused."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch

from pneumoscan.labels import LABELS
from pneumoscan.modelfile import (
    ModelFileError,
    load_model,
    metadata_sha256,
    save_model,
    weights_sha256,
)


def _state():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).state_dict()


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    meta = save_model(tmp_path / "m.pt", _state(), {"kind": "test", "labels": list(LABELS)})
    state, loaded = load_model(tmp_path / "m.pt", kind="test", labels=LABELS)
    assert loaded["weights_sha256"] == meta["weights_sha256"] == weights_sha256(_state())
    torch.testing.assert_close(state["weight"], _state()["weight"])


def test_half_precision_loads_as_float32(tmp_path):
    save_model(tmp_path / "m.pt", _state(), {"kind": "test"}, half=True)
    state, _ = load_model(tmp_path / "m.pt", kind="test")
    assert state["weight"].dtype == torch.float32
    torch.testing.assert_close(state["weight"], _state()["weight"], atol=1e-3, rtol=1e-3)


def test_altered_weights_are_refused(tmp_path):
    save_model(tmp_path / "m.pt", _state(), {"kind": "test"})
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["state_dict"]["weight"][0, 0] += 1e-3
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match="SHA-256"):
        load_model(tmp_path / "m.pt", kind="test")


def test_wrong_kind_and_label_order_are_refused(tmp_path):
    save_model(tmp_path / "m.pt", _state(), {"kind": "test", "labels": list(reversed(LABELS))})
    with pytest.raises(ModelFileError, match="expected 'classifier'"):
        load_model(tmp_path / "m.pt", kind="classifier")
    with pytest.raises(ModelFileError, match="label order"):
        load_model(tmp_path / "m.pt", kind="test", labels=LABELS)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_truncation_and_missing_file_are_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"meta_json": "{}", "state_dict": _Payload()}, handle)
    with pytest.raises(ModelFileError, match="safe loader"):
        load_model(tmp_path / "evil.pt", kind="test")
    assert "pwned" not in capsys.readouterr().out
    save_model(tmp_path / "m.pt", _state(), {"kind": "test"})
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "cut.pt", kind="test")
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "none.pt", kind="test")


def test_altered_metadata_is_refused(tmp_path):
    """One changed threshold in the metadata is caught like a changed weight."""
    save_model(tmp_path / "m.pt", _state(), {"kind": "test", "thresholds": {"Pneumonia": 0.42}})
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["meta_json"] = blob["meta_json"].replace("0.42", "0.02")
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match="metadata does not match"):
        load_model(tmp_path / "m.pt", kind="test")


def test_format_1_file_loads_with_one_warning_and_malformed_metadata_is_refused(tmp_path):
    meta = {"kind": "test", "format_version": 1, "weights_sha256": weights_sha256(_state())}
    torch.save({"meta_json": json.dumps(meta), "state_dict": _state()}, tmp_path / "old.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(tmp_path / "old.pt", kind="test")
        load_model(tmp_path / "old.pt", kind="test")
    assert sum("metadata" in str(w.message) for w in caught) == 1
    for bad_meta, bad_state in (("[1, 2]", _state()), (json.dumps(meta), {"w": "not a tensor"})):
        torch.save({"meta_json": bad_meta, "state_dict": bad_state}, tmp_path / "bad.pt")
        with pytest.raises(ModelFileError, match="malformed"):
            load_model(tmp_path / "bad.pt", kind="test")
    written = save_model(tmp_path / "new.pt", _state(), {"kind": "test"})
    assert written["format_version"] == 2 and written["sha256"] == metadata_sha256(written)


def test_last_checkpoint_is_every_epochs_end_even_when_the_monitored_metric_falls(tmp_path):
    """A resumed run starts where the killed one stopped: last.ckpt holds the latest epoch, also
    after epochs that did not improve (Lightning 2.6's save_last alone keeps the best one there),
    and best.ckpt the best."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from pneumoscan.modelfile import checkpoint_callbacks

    class Falling(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val_score", 1.0 / (self.current_epoch + 1))  # best at epoch 0, worse after

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    best, last = checkpoint_callbacks(tmp_path, "val_score")
    L.Trainer(max_epochs=3, callbacks=[best, last], logger=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(Falling(), data, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    epoch = {name: torch.load(tmp_path / name, weights_only=False)["epoch"] for name in ("best.ckpt", "last.ckpt")}
    assert epoch == {"best.ckpt": 0, "last.ckpt": 2}


def test_valid_hashes_over_weights_of_the_wrong_shape_are_refused_in_one_line(tmp_path):
    """A file whose hashes are right but whose tensors do not fit the recorded network (a head
    of another width, say) is refused by every face in one line that names the tensor."""
    import subprocess
    import sys

    from pneumoscan.classify import Classifier, default_model_path
    from pneumoscan.modelfile import ModelFileError, load_model, save_model

    state, meta = load_model(default_model_path(), kind="chest-classifier")
    state["net.class_layers.out.3.weight"] = torch.zeros(3, 3)
    save_model(tmp_path / "bad.pt", state, {k: v for k, v in meta.items() if k not in ("sha256", "weights_sha256")})
    with pytest.raises(ModelFileError, match=r"do not fit .*size mismatch for net.class_layers.out.3.weight"):
        Classifier.load(tmp_path / "bad.pt")
    from conftest import REPO

    film = REPO / "examples" / "nih-cxr14" / "images" / "00001734_000.png"
    for backend in ("torch", "onnx"):
        run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "predict", str(film), "--model",
                              str(tmp_path / "bad.pt"), "--out", str(tmp_path / backend), "--backend", backend],
                             capture_output=True, text=True, check=False, timeout=300,
                             env={**__import__("os").environ, "PNEUMOSCAN_CACHE": str(tmp_path / "cache")})
        assert run.returncode == 2 and "size mismatch" in run.stderr and "Traceback" not in run.stderr, run.stderr[-1500:]
