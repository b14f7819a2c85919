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
           "BENCH_SIZES": "64", "BENCH_STEPS": "1", "BENCH_WARMUP": "1", "CARRY_MIB": "40",
           "CARRIED": str(tmp_path / "nothing-carried"),
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
    # the checkpoint comes back in parts a carry can hold, with its SHA-256 ...
    parts = sorted((out / "resume").glob("last.ckpt.part*"))
    assert len(parts) >= 2 and all(p.stat().st_size <= 40 * 2**20 for p in parts)
    import hashlib

    joined = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    assert (out / "resume" / "last.ckpt.sha256").read_text().split()[0] == joined
    # ... and the next call, on a fresh machine (new cache, run and out), resumes from it: one more
    # epoch of the same run, not the run again from the start
    again = tmp_path / "out2"
    again.mkdir()
    env2 = env | {"OUT": str(again), "CACHE": str(tmp_path / "cache2"), "RUN": str(tmp_path / "run2"), "EPOCHS": "3",
                  "CARRIED": str(out / "resume")}
    second = subprocess.run(["bash", "tools/gpu_train.sh"], cwd=REPO, env=env2, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resuming from the carried checkpoint" in second.stdout
    assert [json.loads(line)["epoch"] for line in (again / "progress.jsonl").read_text().splitlines()] == [2]
    assert Classifier.load(again / "chest_densenet121.pt").meta["from_checkpoint"]["epoch"] == 2
    # a damaged part is refused before anything trains
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in parts:
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / parts[-1].name).write_bytes(parts[-1].read_bytes()[:-10])
    (broken / "last.ckpt.sha256").write_text((out / "resume" / "last.ckpt.sha256").read_text())
    env3 = env2 | {"OUT": str(tmp_path / "out3"), "RUN": str(tmp_path / "run3"), "CARRIED": str(broken)}
    (tmp_path / "out3").mkdir()
    refused = subprocess.run(["bash", "tools/gpu_train.sh"], cwd=REPO, env=env3, capture_output=True, text=True,
                             timeout=900)
    assert refused.returncode != 0 and "do not join into the file they were cut from" in refused.stdout

