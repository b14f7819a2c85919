"""tools/gpu_train.sh end to end on the CPU: a lent GPU session's minutes go to training, not to
debugging the script. Two optimiser steps on a small real cache, carried as a bundle like the
device run's, with the long run's schedule (cosine, every layer, validation on patient fold 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_data

REPO = Path(__file__).resolve().parents[1]


@needs_data
@pytest.mark.slow
def test_gpu_training_script_runs_on_the_cpu(cache64, tmp_path):
    bundle = tmp_path / "crops.npz"
    packed = subprocess.run([sys.executable, "tools/cache_bundle.py", "pack", str(cache64), str(bundle)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert packed.returncode == 0, packed.stderr[-2000:]
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PY": sys.executable, "DEVICE": "cpu", "OUT": str(out), "BUNDLE": str(bundle),
           "CACHE": str(tmp_path / "cache"), "RUN": str(tmp_path / "run"), "EPOCHS": "2", "EPOCH_SIZE": "2",
           "BATCH": "2", "WORKERS": "0", "MINUTES": "10", "TRAIN_SECONDS": "600", "BENCH_BATCHES": "2",
           "BENCH_SIZES": "64", "BENCH_STEPS": "1", "BENCH_WARMUP": "1",
           "INIT": str(REPO / "src/pneumoscan/models/chest_densenet121.pt")}  # what .gpu/init.pt carries
    result = subprocess.run(["bash", "tools/gpu_train.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "saved fp16 model" in result.stdout
    bench = (out / "train_bench.txt").read_text()
    assert "device: cpu" in bench and any(line.split()[:1] == ["64"] for line in bench.splitlines())
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [p["epoch"] for p in progress] == [0, 1]
    assert {"pneumonia_vs_no_finding_originals", "kermany_pneumonia"} <= set(progress[0])
    assert progress[1]["lr"] < progress[0]["lr"] or progress[0]["lr"] == 0  # cosine: the LR falls
    from pneumoscan.classify import Classifier

    model = Classifier.load(out / "chest_densenet121.pt")
    assert model.meta["optimiser"]["trained"] == "all layers" and model.meta["epochs_trained"] >= 1
    # the candidate is the schedule's last checkpoint (epoch 1 of 0-1), not fold 0's best epoch
    assert model.meta["from_checkpoint"]["epoch"] == 1
    assert model.meta["from_checkpoint"]["file"].endswith("run/checkpoints/last.ckpt")
    assert model.model.head[3].in_features == 1024  # the shipped head's width, kept to the end (it was lost once)
    # --frozen-bn (the script's default): two steps leave every BatchNorm's statistics as they were
    start = Classifier.load(env["INIT"]).model.state_dict()
    end = model.model.state_dict()
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.allclose(end[k], start[k], rtol=2e-3, atol=1e-4) for k in stats)
