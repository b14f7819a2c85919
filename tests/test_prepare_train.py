"""`prepare` (crop cache), `train` (resume, 2-process DDP) and `evaluate` on a small real manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoscan.modelfile import file_sha256, load_model
from pneumoscan.training.cache import CacheError, CropCache, prepare, shard_paths

from conftest import CLI, DATA, needs_data

pytestmark = needs_data


def test_prepare_writes_complete_cache_and_lists_unreadable(cache64, small_manifest):
    manifest = pd.read_csv(small_manifest)
    cache = CropCache(cache64, verify=True)
    assert len(cache) == len(manifest) - 1
    errors = pd.read_csv(cache64 / "errors.csv")
    assert len(errors) == 1 and errors.path.iloc[0].endswith("broken.png")
    assert cache.image(0).shape == (64, 64) and cache.image(0).dtype == np.uint8
    assert cache.image(0).std() > 5  # a picture, not zeros
    assert {"x0", "y0", "x1", "y1", "fallback"} <= set(cache.table.columns)
    nih = cache.table[cache.table.source == "nih"]
    assert (nih.x1 > nih.x0).all() and (nih.x1 <= 1024).all()
    assert nih.fallback.mean() < 0.5


def test_prepare_resumes_only_missing_shards_and_matches(cache64, small_manifest, tmp_path):
    table = pd.read_csv(small_manifest)
    out = tmp_path / "partial"
    prepare(table, out, size=64, shard_size=64, shard=(0, 2), progress=False)  # job 0 of a 2-job array
    first = {k: shard_paths(out, k)[0].stat().st_mtime_ns for k in range(0, 4, 2)}
    _, _, mark = shard_paths(out, 0)
    mark.unlink()  # as if killed while shard 0 was being written
    result = prepare(table, out, size=64, shard_size=64, shard=(0, 1), progress=False)
    job0 = len(range(0, result["shards_total"], 2))
    assert result["shards_done_now"] == result["shards_total"] - job0 + 1  # job 0's kept, 0 redone
    assert shard_paths(out, 2)[0].stat().st_mtime_ns == first[2]
    assert result["complete"]
    a, b = CropCache(cache64), CropCache(out, verify=True)
    np.testing.assert_array_equal(a.images(range(len(a))), b.images(range(len(b))))


def test_prepare_sigkill_then_resume_gives_identical_shards(small_manifest, cache64, tmp_path):
    out = tmp_path / "killed"
    cmd = [*CLI, "prepare", "--manifest", str(small_manifest), "--out", str(out), "--size", "64",
           "--shard-size", "64", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not shard_paths(out, 0)[2].exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "errors.csv").exists(), "killed after the end; nothing was interrupted"
    with pytest.raises(CacheError, match="incomplete"):
        CropCache(out)
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    a, b = CropCache(cache64), CropCache(out, verify=True)
    np.testing.assert_array_equal(a.images(range(len(a))), b.images(range(len(b))))


def test_prepare_refuses_a_cache_made_with_other_settings(cache64, small_manifest):
    with pytest.raises(CacheError, match="size"):
        prepare(pd.read_csv(small_manifest), cache64, size=96, shard_size=64, progress=False)


def test_prepare_stops_the_pool_on_a_failing_shard(small_manifest, tmp_path):
    """A shard that cannot be written (a folder stands where its file goes) ends the run at once
    with the error; the shards still queued are not worked through first (the pool is terminated,
    not closed and joined)."""
    table = pd.read_csv(small_manifest)
    out = tmp_path / "failing"
    npy, _, _ = shard_paths(out, 0)
    npy.with_name(npy.name + ".tmp.npy").mkdir(parents=True)
    with pytest.raises(OSError):
        prepare(table, out, size=32, shard_size=2, workers=2, progress=False)
    shards = (len(table) + 1) // 2
    done = sum(shard_paths(out, k)[2].exists() for k in range(shards))
    assert done < shards // 2, f"{done} of {shards} shards were still worked through after the failure"


def _train(cache: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "train", "--cache", str(cache), "--out", str(out), "--init", "random",
            "--batch-size", "16", "--workers", "0", "--accelerator", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(cache64, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run: the reference for resume, and a model to evaluate."""
    out = tmp_path_factory.mktemp("train") / "a"
    result = subprocess.run(_train(cache64, out, "--epochs", "2"), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "stdout.txt").write_text(result.stdout)
    return out


def test_trained_model_records_assessment_selection_and_an_honest_headline(trained):
    from pneumoscan.labels import LABELS

    _, meta = load_model(trained / "model.pt", kind="chest-classifier")
    assert list(meta["assessment"]) == list(LABELS)
    for label, entry in meta["assessment"].items():
        assert isinstance(entry["assessed"], bool) and entry["reason"]
        assert (entry["threshold"] is None) == (not entry["assessed"])
        assert meta["thresholds"][label] == entry["threshold"]
    # 150 NIH films hold far fewer than 100 adult positives of any finding: nothing is assessed
    assert not any(e["assessed"] for e in meta["assessment"].values())
    assert meta["selection"]["metric"].startswith("mean within-source validation AUC")
    assert meta["training_data"]["sampling"]["source_balance"] == 0.5
    left_out = meta["training_data"]["labels_left_out_of_the_loss"]
    assert left_out["min_positives"] == 50 and "Hernia" in left_out["labels"]  # 6 NIH positives here
    stdout = (trained / "stdout.txt").read_text()
    assert "AUC within sources" in stdout or "no AUC is reported" in stdout
    assert "mean AUC (14 findings)" not in stdout and "assessed labels (0 of 15): none" in stdout


def test_train_resumes_exactly_after_sigkill(cache64, trained, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "b"
    proc = subprocess.Popen(_train(cache64, out, "--epochs", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.pt").exists(), "killed too late to test resume"
    b = subprocess.run(_train(cache64, out, "--epochs", "2"), capture_output=True, text=True,
                       timeout=900, env=env)
    assert b.returncode == 0, b.stderr[-3000:]
    (_, ma), (_, mb) = (load_model(run / "model.pt", kind="chest-classifier") for run in (trained, out))
    assert ma["weights_sha256"] == mb["weights_sha256"]
    assert ma["epochs_trained"] == mb["epochs_trained"] == 2
    assert ma["validation"] == mb["validation"] and ma["thresholds"] == mb["thresholds"]
    assert ma["init"] == {"init": "random"}
    logs = [p for p in sorted((out / "logs").glob("*/metrics.csv")) if p.stat().st_size]
    metrics = pd.concat(pd.read_csv(p) for p in logs)
    assert 1 in set(metrics.dropna(subset=["val_loss"])["epoch"])  # the resumed run logged the redone epoch


def test_a_model_from_a_chosen_checkpoint_without_training(cache64, trained, tmp_path):
    """``--from-checkpoint``: model.pt holds that checkpoint's weights (not the best epoch's), says
    which checkpoint it came from, and is assessed like any run's; a checkpoint of a run that
    validated on other films, or a file that is no checkpoint, is a one-line refusal."""
    import torch

    last = trained / "checkpoints" / "last.ckpt"
    out = tmp_path / "from_last"
    result = subprocess.run(_train(cache64, out, "--epochs", "2", "--from-checkpoint", str(last)),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no training" in result.stderr and not (out / "checkpoints").exists()
    state, meta = load_model(out / "model.pt", kind="chest-classifier")
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], saved["model." + k]) for k in state)
    assert meta["from_checkpoint"]["epoch"] == meta["epochs_trained"] == 1
    assert meta["from_checkpoint"]["sha256"] == file_sha256(last)
    assert list(meta["assessment"]) == list(meta["labels"]) and meta["validation"]["n_images"] > 0

    relative = subprocess.run(_train(Path(os.path.relpath(cache64)), tmp_path / "rel", "--epochs", "2",
                                     "--from-checkpoint", str(last)), capture_output=True, text=True, timeout=900)
    assert relative.returncode == 0, relative.stderr[-3000:]  # the same cache, written another way
    other_films = subprocess.run(_train(cache64, tmp_path / "x", "--val-fold", "0", "--from-checkpoint", str(last)),
                                 capture_output=True, text=True, timeout=300)
    assert other_films.returncode != 0 and "Traceback" not in other_films.stderr
    assert "its run had other val_fold" in other_films.stderr
    not_one = subprocess.run(_train(cache64, tmp_path / "y", "--from-checkpoint", str(trained / "model.pt")),
                             capture_output=True, text=True, timeout=300)
    assert not_one.returncode != 0 and "Traceback" not in not_one.stderr
    assert "not a checkpoint of this classifier" in not_one.stderr


def test_two_process_ddp_on_cpu(cache64, tmp_path):
    result = subprocess.run(_train(cache64, tmp_path / "ddp", "--epochs", "1", "--devices", "2"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size: 2" in result.stderr or "distributed_backend=gloo" in result.stderr
    _, meta = load_model(tmp_path / "ddp" / "model.pt", kind="chest-classifier")
    assert meta["optimiser"]["devices"] == 2 and meta["epochs_trained"] == 1


def test_imagenet_init_offline_fails_with_instructions(cache64, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run([*CLI, "train", "--cache", str(cache64), "--out", str(tmp_path / "r"),
                             "--epochs", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "densenet121-a639ec97.pth" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_from_manifest_and_from_cache_agree(cache64, trained, small_manifest, tmp_path):
    reports = []
    for name, extra in (("direct", []), ("cached", ["--cache", str(cache64)])):
        result = subprocess.run([*CLI, "evaluate", "--manifest", str(small_manifest), "--split", "test",
                                 "--out", str(tmp_path / name), "--model", str(trained / "model.pt"),
                                 "--n-boot", "100", *extra], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    direct, cached = reports
    assert direct["n_images"] == cached["n_images"] > 10
    assert direct["auc"] == cached["auc"]
    assert set(direct) >= {"auc", "auc_ci", "mean_auc_14", "n_images"}
    assert (tmp_path / "direct" / "report.md").exists() and (tmp_path / "direct" / "roc.png").exists()
    text = (tmp_path / "direct" / "report.md").read_text()
    assert "Assessed labels: none." in text and "not assessed" in text.split("## Detail")[1]
    assert "## Headline: AUC measured inside each data source" in text
    bad = subprocess.run([*CLI, "evaluate", "--manifest", str(small_manifest), "--split", "nope",
                          "--out", str(tmp_path / "x"), "--model", str(trained / "model.pt")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no labelled images" in bad.stderr


def test_half_written_checkpoint_is_refused_not_loaded(cache64, trained, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # as if the disk filled mid-write
    result = subprocess.run(_train(cache64, out, "--epochs", "3"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "damaged" in result.stderr and "--no-resume" in result.stderr
    assert "Traceback" not in result.stderr and not (out / "model.pt").exists()


def test_frozen_backbone_trains_the_head_only(cache64, trained, tmp_path):
    import torch

    out = tmp_path / "lp"
    result = subprocess.run([*CLI, "train", "--cache", str(cache64), "--out", str(out), "--init",
                             str(trained / "model.pt"), "--freeze-backbone", "--epochs", "1", "--batch-size", "16",
                             "--workers", "0", "--accelerator", "cpu"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (before, _), (after, meta) = (load_model(p, kind="chest-classifier") for p in (trained / "model.pt", out / "model.pt"))
    backbone = [k for k in before if k.startswith("net.features.")]
    head = [k for k in before if k.startswith("net.class_layers.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # BN statistics too
    assert any(not torch.equal(before[k], after[k]) for k in head)
    assert meta["optimiser"]["trained"] == "head only (backbone frozen)"
    assert "kermany" in meta["training_data"]["labels_masked_in_single_class_sources"]


def test_fine_tuning_the_shipped_model_starts_from_its_head(tmp_path):
    """The shipped head is crossval's (1,024 wide; the loop's default is 1,000): the module a
    fine-tune from it trains starts from that head, not from a random one. (The saved width is
    checked wherever a run from the shipped file is saved and loaded again: test_options.)"""
    import torch

    from pneumoscan.classify import Classifier
    from pneumoscan.labels import LABELS
    from pneumoscan.training.classify import TrainConfig
    from pneumoscan.training.fit_all import lightning_module

    shipped = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "models" / "chest_densenet121.pt"
    info: dict = {}
    module = lightning_module(TrainConfig(cache=str(tmp_path), out=str(tmp_path), init=str(shipped)),
                     np.ones(len(LABELS), np.float32), info, np.array([]))
    before, after = Classifier.load(shipped).model.state_dict(), module.model.state_dict()
    assert info["head"] == "the checkpoint's" and module.model.head[3].in_features == 1024
    assert before.keys() == after.keys()  # the backbone and the head, with the head's shapes
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)


def test_unknown_strategy_is_a_one_line_usage_error(cache64, tmp_path):
    run = subprocess.run(_train(cache64, tmp_path / "s", "--strategy", "horovod"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "--strategy must be auto, ddp or fsdp" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("launcher, env, expected", [
    ("torchrun", {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "job"},
     ("TorchElasticEnvironment", 3, 4, 1, 1, "10.0.0.1")),
    ("srun", {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
              "SLURM_NODELIST": "gpu[01-02]", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "train",
              "SLURM_JOB_ID": "7"},
     ("SLURMEnvironment", 2, 4, 1, 0, "gpu01")),
])
def test_multi_node_launch_environment_gives_rank_and_world(monkeypatch, launcher, env, expected):
    """What docs/MULTINODE.md promises: under torchrun or srun, 2 nodes × 2 processes, the trainer
    train builds knows its rank, world size, node and master from the launcher's variables."""
    from pneumoscan.training.classify import TrainConfig
    from pneumoscan.training.fit_all import make_trainer

    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in
                ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = TrainConfig(cache="c", out="o", accelerator="cpu", devices=2, num_nodes=2)
    trainer = make_trainer(cfg, "32-true", [], False)
    environment = trainer.strategy.cluster_environment
    assert (type(environment).__name__, trainer.global_rank, trainer.world_size, trainer.node_rank,
            trainer.local_rank, environment.main_address) == expected


def _tail_cfg(cache: Path, out: Path, **extra):
    from pneumoscan.training.classify import TrainConfig

    settings = dict(init="random", epochs=2, batch_size=8, lr=1e-3, workers=0, accelerator="cpu",
                    train_from="denseblock4", epoch_size=32, select="all")
    return TrainConfig(cache=str(cache), out=str(out), **(settings | extra))


def test_train_from_a_block_resumes_exactly_after_an_interruption(cache64, tmp_path, monkeypatch):
    """``--train-from``: the frozen layers' output is computed once; the fit, interrupted in the
    middle of an epoch, resumes from its saved state to the weights an unbroken fit reaches."""
    import pneumoscan.training.classify as ct
    import pneumoscan.training.fit_loop as loop
    import pneumoscan.training.fit_tail as tail

    reference = ct.train_classifier(_tail_cfg(cache64, tmp_path / "a"))
    assert (tmp_path / "a" / "stem_denseblock4_train.npy").exists()
    assert reference["optimiser"]["trained"].startswith("denseblock4 onwards")
    assert reference["epochs_trained"] == 2

    monkeypatch.setattr(tail, "SAVE_EVERY", 1)
    calls = {"n": 0}
    real_bce = loop.masked_bce

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # 4 batches + validation in epoch 0, then the second batch of epoch 1
            raise KeyboardInterrupt
        return real_bce(*args, **kwargs)

    monkeypatch.setattr(loop, "masked_bce", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ct.train_classifier(_tail_cfg(cache64, tmp_path / "b"))
    state = __import__("torch").load(tmp_path / "b" / "tail_state.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 1)
    monkeypatch.setattr(loop, "masked_bce", real_bce)
    resumed = ct.train_classifier(_tail_cfg(cache64, tmp_path / "b"))
    assert resumed["best_epoch"] == reference["best_epoch"]
    (a, _), (b, _) = (load_model(run / "model.pt", kind="chest-classifier") for run in (tmp_path / "a", tmp_path / "b"))
    # equal up to BLAS rounding (kernels may differ in the last bits between runs in one process)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    changed = [k for k in a if "denseblock4" in k and not k.endswith("num_batches_tracked")]
    assert changed and all(a[k].shape == b[k].shape for k in changed)
    with pytest.raises(ValueError, match="other settings"):
        ct.train_classifier(_tail_cfg(cache64, tmp_path / "b", lr=5e-4))


class _Broken(Exception):
    pass


@pytest.mark.slow
def test_every_layer_fit_resumes_at_the_next_batch_inside_an_epoch(cache64, tmp_path, monkeypatch):
    """The Lightning loop saves last.ckpt in the middle of an epoch (``checkpoint_minutes``); a run
    that dies there resumes at the next batch (the loader skips the batches already trained) and
    reaches the weights an unbroken run does, also when a worker process loads the batches (it
    draws them as soon as its iterator exists) and the next epoch is whole again."""
    import torch

    import pneumoscan.training.classify as ct
    import pneumoscan.training.fit_all as fit_all

    every_batch = dict(train_from="", checkpoint_minutes=1e-6, epochs=3)
    reference = ct.train_classifier(_tail_cfg(cache64, tmp_path / "a", **every_batch))
    assert reference["epochs_trained"] == 3
    every_batch["workers"] = 1

    real_bce, calls = fit_all.masked_bce, {"n": 0}

    def dies(*args, **kwargs):
        if len(args) == 4:  # training batches only (validation passes no weights)
            calls["n"] += 1
            if calls["n"] == 7:  # epoch 1's third batch (4 batches an epoch)
                raise _Broken
        return real_bce(*args, **kwargs)

    monkeypatch.setattr(fit_all, "masked_bce", dies)
    with pytest.raises(_Broken):
        ct.train_classifier(_tail_cfg(cache64, tmp_path / "b", **every_batch))
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    loop = saved["loops"]["fit_loop"]
    assert loop["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert loop["epoch_loop.batch_progress"]["current"]["completed"] == 1  # Lightning adds the batch it saved in
    monkeypatch.setattr(fit_all, "masked_bce", real_bce)
    resumed = ct.train_classifier(_tail_cfg(cache64, tmp_path / "b", **every_batch))
    assert resumed["epochs_trained"] == 3 and resumed["best_epoch"] == reference["best_epoch"]
    # the last weights (model.pt holds the best epoch's, which may be the unbroken first)
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
            for run in (tmp_path / "a", tmp_path / "b"))
    trained = [k for k in a if a[k].is_floating_point()]
    assert max(float((a[k] - b[k]).abs().max()) for k in trained) < 1e-4


def test_a_run_stopped_by_its_rule_stays_stopped_when_rerun(cache64, tmp_path, monkeypatch):
    """``--early-stop``: a run rerun after its rule fired (say, killed while writing model.pt)
    trains no further epoch: Lightning restores the rule's count, not its decision."""
    import torch

    import pneumoscan.training.classify as ct
    import pneumoscan.training.fit_all as fit_all

    monkeypatch.setattr(fit_all, "selection_score", lambda *args: (0.5, {}))  # never a gain after epoch 0
    cfg = _tail_cfg(cache64, tmp_path / "r", train_from="", early_stop=1, epochs=5)
    first = ct.train_classifier(cfg)
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=False)
    assert first["epochs_trained"] == 2 and before["epoch"] == 1  # epochs 0 and 1, then the rule
    again = ct.train_classifier(cfg)
    after = torch.load(last, weights_only=False)
    assert after["global_step"] == before["global_step"] and after["epoch"] == 1
    assert again["weights_sha256"] == first["weights_sha256"]


def test_max_minutes_too_short_for_finalise_is_refused_up_front(cache64, tmp_path):
    from pneumoscan.training.classify import train_classifier

    with pytest.raises(ValueError, match="leaves no time to train"):
        train_classifier(_tail_cfg(cache64, tmp_path / "c", max_minutes=0.001))


def test_timing_the_deadline_leaves_the_model_in_training_mode(tmp_path):
    """``--max-minutes`` times one forward pass in eval mode to reserve finalise's time; the fit
    that follows must still train with batch statistics and dropout (it once ran every layer in
    eval mode, Lightning warning "Found 500 module(s) in eval mode")."""
    import time

    from pneumoscan.networks import ChestClassifier
    from pneumoscan.training.classify import TrainConfig
    from pneumoscan.training.fit_state import fit_deadline

    model = ChestClassifier().train()
    cfg = TrainConfig(cache="", out=str(tmp_path), max_minutes=60)
    deadline = fit_deadline(cfg, time.time(), model, n_val=10, size=64)
    assert time.time() < deadline < time.time() + 3600
    assert all(m.training for m in model.modules())
    model.eval()
    fit_deadline(cfg, time.time(), model, n_val=10, size=64)
    assert not any(m.training for m in model.modules())  # a caller's eval mode is kept too


def test_cache_bundle_in_parts_rebuilds_the_same_cache(cache64, tmp_path):
    """The GPU carry: a cache packed in parts of a size limit unpacks to what one bundle gives."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from cache_bundle import pack, unpack

    whole = pack(cache64, tmp_path / "one.npz", 90, max_mib=1000)
    parts = pack(cache64, tmp_path / "crops.npz", 90, max_mib=0.05)
    shards = json.loads((cache64 / "config.json").read_text())["shards"]
    assert len(whole) == 1 and len(parts) == shards > 1  # each shard is over the limit: one per part
    unpack(whole, tmp_path / "a")
    unpack(list(reversed(parts)), tmp_path / "b")
    a, b = CropCache(tmp_path / "a", verify=True), CropCache(tmp_path / "b", verify=True)
    assert len(a) == len(b) == len(CropCache(cache64))
    np.testing.assert_array_equal(a.images(range(len(a))), b.images(range(len(b))))
    assert np.abs(a.images(range(5)).astype(int) - CropCache(cache64).images(range(5)).astype(int)).mean() < 3


def test_view_balance_weights_make_each_label_independent_of_the_view():
    from pneumoscan.training.data import view_balance_weights

    rng = np.random.default_rng(0)
    n = 4000
    views = np.where(rng.random(n) < 0.5, "AP", "PA")
    sources = np.array(["nihmasked"] * 3000 + ["kermany"] * 1000)
    labels = np.full((n, 15), np.nan, np.float32)
    labels[:, 13] = (rng.random(n) < np.where(views == "AP", 0.48, 0.10)).astype(np.float32)  # view-confounded
    labels[3000:, 3] = np.nan  # a label the second source does not give
    labels[:3000, 3] = 1.0  # one class only inside the first source: weights stay 1
    w = view_balance_weights(labels, sources, views)
    for source in ("nihmasked", "kermany"):
        inside = sources == source
        rates = [np.sum(w[inside & (views == v), 13] * labels[inside & (views == v), 13])
                 / np.sum(w[inside & (views == v), 13]) for v in ("AP", "PA")]
        assert abs(rates[0] - rates[1]) < 1e-6  # the weighted positive rate no longer follows the view
        assert abs(rates[0] - labels[inside, 13].mean()) < 1e-6
    assert (w[:, 3] == 1).all() and (w[:, 0] == 1).all()


def test_compare_agrees_with_two_evaluate_runs(cache64, trained, small_manifest, tmp_path):
    import torch

    from pneumoscan.classify import Classifier

    other = Classifier.load(trained / "model.pt")  # a second model: the same one with its head perturbed
    with torch.no_grad():
        head = other.model.head[-1].weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(7)) * head.std())
    other.save(tmp_path / "other.pt")
    models = [trained / "model.pt", tmp_path / "other.pt"]
    common = ["--manifest", str(small_manifest), "--split", "train", "--cache", str(cache64)]
    reports = []
    for k, model in enumerate(models):
        run = subprocess.run([*CLI, "evaluate", *common, "--out", str(tmp_path / f"e{k}"), "--model", str(model),
                              "--n-boot", "20"], capture_output=True, text=True, timeout=900, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "report.md" in run.stdout and "## Detail" not in run.stdout  # a summary, not 200 lines of tables
        reports.append(json.loads((tmp_path / f"e{k}" / "report.json").read_text()))
    run = subprocess.run([*CLI, "compare", *map(str, models), *common, "--out", str(tmp_path / "c"), "--n-boot", "50",
                          "--label", "No Finding", "--label", "Pneumonia"],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert result["images"] == reports[0]["n_images"] == reports[1]["n_images"]
    assert set(result["labels"]) == {"No Finding", "Pneumonia"}
    compared = 0
    for label, sources in result["labels"].items():
        for source, entry in sources.items():
            for k, report in enumerate(reports):
                theirs = report["within_source"]["per_label"][label]["sources"][source]
                assert entry["models"][k]["auc"] == theirs["auc"] and entry["positives"] == theirs["positives"]
                compared += 1
            d = entry["models"][1]["difference_from_first"]
            assert d["difference"] == pytest.approx(entry["models"][1]["auc"] - entry["models"][0]["auc"], abs=1e-3)
            assert d["low"] <= d["difference"] <= d["high"] and 0 <= d["p"] <= 1
    differences = [e["models"][1]["difference_from_first"]["difference"] for v in result["labels"].values()
                   for e in v.values()]
    assert any(abs(d) > 0 for d in differences)  # two different models, not one compared with itself
    assert compared >= 4 and "difference from the first" in (tmp_path / "c" / "compare.md").read_text()
    # a model against its own re-thresholded copy: said, scored once, no bootstrap
    twin = Classifier.load(trained / "model.pt")
    twin.meta["note"] = "same weights, other metadata"
    twin.save(tmp_path / "twin.pt")
    run = subprocess.run([*CLI, "compare", str(trained / "model.pt"), str(tmp_path / "twin.pt"), *common, "--out",
                          str(tmp_path / "t"), "--n-boot", "50", "--label", "Pneumonia"],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0 and "has the weights of model 1" in run.stderr, run.stderr[-2000:]
    same = json.loads((tmp_path / "t" / "compare.json").read_text())
    assert all(e["models"][1]["difference_from_first"] == {"identical_weights": True}
               for v in same["labels"].values() for e in v.values())
    assert "identical weights" in (tmp_path / "t" / "compare.md").read_text()


def test_compare_reads_segments_and_crops_each_film_once(trained, small_manifest, tmp_path, monkeypatch):
    """Two models of one preprocessing (crop size, masking, lung model) are scored on the same
    crops: each film is read, segmented and cropped once, not once per model."""
    import torch

    import pneumoscan.training.cache as cache_module
    from pneumoscan.classify import Classifier
    from pneumoscan.training.compare import compare_models

    other = Classifier.load(trained / "model.pt")
    with torch.no_grad():
        other.model.head[-1].weight.mul_(-1)  # other weights: scored for real, not as a twin
    other.save(tmp_path / "other.pt")
    real, films = cache_module.crop_paths, []
    monkeypatch.setattr(cache_module, "crop_paths", lambda paths, *a, **k: films.extend(paths) or real(paths, *a, **k))
    result = compare_models(small_manifest, "test", [trained / "model.pt", tmp_path / "other.pt"], n_boot=10,
                            labels=["Pneumonia"])
    assert result["images"] > 10 and len(films) == len(set(films)) >= result["images"]


def test_crossval_head_is_exact_in_the_model_and_its_figures_are_out_of_fold(cache64, trained, tmp_path):
    """`crossval` on a frozen backbone: the backbone is unchanged, the linear head written into
    the two-layer head gives exactly the logistic probabilities, every patient sits in one fold,
    and the thresholds say they come from out-of-fold probabilities."""
    import torch

    from pneumoscan.classify import Classifier
    from pneumoscan.training.crossval import linear_probs

    out = tmp_path / "cv"
    result = subprocess.run([*CLI, "crossval", "--cache", str(cache64), "--backbone", str(trained / "model.pt"),
                             "--out", str(out), "--folds", "3"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fold 3/3" in result.stderr and "out-of-fold (3-fold CV)" in result.stdout
    (before, _), (after, meta) = (load_model(p, kind="chest-classifier") for p in (trained / "model.pt", out / "model.pt"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("net.features."))
    assert meta["threshold_provenance"]["method"] == "cross-validation"
    classifier = Classifier.load(out / "model.pt")
    assert "out-of-fold probabilities of 3-fold" in classifier.thresholds_from

    cache = CropCache(cache64)
    saved = np.load(out / "features.npz")
    rows = saved["indices"][:40]
    head = classifier.model.head
    W, b = head[3].weight.detach().numpy(), head[3].bias.detach().numpy()
    expected = linear_probs(saved["features"][:40], (W, b))
    got = classifier.predict_proba(cache.images(rows).astype(np.float32) / 255.0)
    assert np.abs(got - expected).max() < 1e-4

    oof = pd.read_csv(out / "oof.csv")
    patients = cache.table.set_index("path").loc[oof.path, "patient"].to_numpy()
    assert (pd.Series(oof.fold.to_numpy()).groupby(patients).nunique() == 1).all()
    assert sorted(oof.fold.unique()) == [0, 1, 2]
    report = json.loads((out / "cv_report.json").read_text())
    assert report["n_images"] == len(oof) == meta["training_data"]["train_images"]
    assert meta["training_data"]["sampling"]["domain_weight"] == {"source": "nih", "times": 1.0, "grid": [1.0]}
    for bad in ("0,2", "two"):
        refused = subprocess.run([*CLI, "crossval", "--cache", str(cache64), "--backbone", str(trained / "model.pt"),
                                  "--out", str(tmp_path / "bad"), "--domain-weights", bad],
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "--domain-weights" in refused.stderr and "Traceback" not in refused.stderr


def _crossval_run(folder: Path, cache: Path, paths, folds, probs, seed: int = 2026) -> Path:
    """A crossval run folder as ``compare --crossval`` reads it: config.json and oof.csv."""
    from pneumoscan.labels import LABELS

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"cache": str(cache), "backbone": "b.pt", "folds": 3, "seed": seed}))
    frame = pd.DataFrame(probs, columns=list(LABELS))
    frame.insert(0, "fold", folds)
    frame.insert(0, "path", paths)
    frame.to_csv(folder / "oof.csv", index=False)
    return folder


def test_compare_crossval_runs_out_of_fold_resampling_patients(cache64, tmp_path):
    """``compare --crossval``: each watched task's AUC of each run on its out-of-fold probabilities,
    the paired difference from the first (patients resampled), only the folds asked for; runs
    that drew other folds, or a folder that is no finished run, are one-line refusals."""
    from sklearn.metrics import roc_auc_score

    from pneumoscan.labels import LABELS
    from pneumoscan.training.data import patient_folds

    table = CropCache(cache64).table
    labels = table[list(LABELS)].to_numpy(float)
    folds = patient_folds(table["patient"].astype(str).to_numpy(), 3, 2026)
    rng = np.random.default_rng(0)
    guess = rng.random(labels.shape)
    knows = np.where(np.isnan(labels), guess, 0.35 * np.nan_to_num(labels) + 0.65 * guess)
    a = _crossval_run(tmp_path / "a", cache64, table["path"], folds, guess)
    b = _crossval_run(tmp_path / "b", cache64, table["path"], folds, knows)
    run = subprocess.run([*CLI, "compare", "--crossval", str(a), str(b), "--out", str(tmp_path / "c"), "--n-boot", "200"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert result["films"] == len(table) and result["resampled"].startswith("patients")
    nf = LABELS.index("No Finding")
    on = (table["source"] == "nih").to_numpy() & ~np.isnan(labels[:, nf])
    task = result["tasks"]["no_finding_originals"]
    assert (task["positives"], task["negatives"]) == (int(labels[on, nf].sum()), int((labels[on, nf] == 0).sum()))
    first, second = (roc_auc_score(labels[on, nf], p[on, nf]) for p in (guess, knows))
    assert task["runs"][0]["auc"] == pytest.approx(first, abs=1e-4) and task["runs"][1]["auc"] == pytest.approx(second, abs=1e-4)
    d = task["runs"][1]["difference_from_first"]
    assert d["difference"] == pytest.approx(second - first, abs=1e-4) and d["low"] <= d["difference"] <= d["high"]
    assert d["difference"] > 0.2 and d["low"] > 0  # the run that knows the labels is better, and says so
    assert "No Finding, originals" in (tmp_path / "c" / "compare.md").read_text()

    one_fold = subprocess.run([*CLI, "compare", "--crossval", str(a), str(b), "--out", str(tmp_path / "f"), "--fold", "0",
                               "--n-boot", "50"], capture_output=True, text=True, timeout=300)
    assert one_fold.returncode == 0, one_fold.stderr[-2000:]
    assert json.loads((tmp_path / "f" / "compare.json").read_text())["films"] == int((folds == 0).sum())

    other_seed = _crossval_run(tmp_path / "s", cache64, table["path"], folds, knows, seed=7)
    for args, says in (([str(a), str(other_seed)], "drew different folds"), ([str(a), str(tmp_path)], "not a finished crossval run"),
                       ([str(a), str(b), "--manifest", str(cache64 / "manifest.csv")], "do not apply"),
                       ([str(a), str(b), "--fold", "3"], "the runs' folds are 0, 1, 2")):
        refused = subprocess.run([*CLI, "compare", "--crossval", *args, "--out", str(tmp_path / "r")],
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and says in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_crossval_weighs_the_films_read_as_in_use_by_what_an_inner_split_of_them_says():
    """The weight of the NIH originals (``confirm_in``) multiplies their rows only, and is chosen on
    inner films of that source: where the lung-masked copies teach the opposite of the originals,
    the largest weight wins."""
    from pneumoscan.labels import LABELS
    from pneumoscan.training.crossval import (
        CrossvalConfig,
        choose_settings,
        row_weights,
    )

    rng = np.random.default_rng(1)
    n = 800
    sources = np.array(["nih", "nihmasked", "nihmasked", "nihmasked"] * (n // 4))
    views, patients = np.array(["PA"] * n), np.array([f"p{i}" for i in range(n)])
    x = rng.normal(size=(n, 8)).astype(np.float32)
    labels = np.full((n, len(LABELS)), np.nan, np.float32)
    copy = sources == "nihmasked"
    labels[:, 0] = np.where(copy, x[:, 0] + 0.5 * x[:, 1] < 0, x[:, 0] > 0).astype(np.float32)
    cfg = CrossvalConfig(cache="", backbone="", out="", view_balance=False, l2_grid=(1e-3,),
                         domain_weights=(1.0, 16.0))
    w1, w16 = (row_weights(labels, sources, views, cfg, dw)[:, 0] for dw in (1.0, 16.0))
    assert np.allclose((w16[~copy] / w16[copy].mean()), 16 * (w1[~copy] / w1[copy].mean()))
    dw, l2, scores = choose_settings(x, labels, sources, views, patients, cfg, salt=0)
    assert (dw, l2) == (16.0, 1e-3) and scores["16/0.001"] > 0.8 > scores["1/0.001"]


def test_per_label_l2_gives_each_label_the_strength_its_own_inner_auc_prefers():
    """One strength per label, each the one its own inner AUC prefers (here the label carried by one
    sharp feature takes the weak penalty, the one spread thin over thirty noisy features the strong
    one), labels the inner split cannot judge the overall choice; the shipped head takes, per
    label, the strength most folds chose."""
    from pneumoscan.labels import LABELS
    from pneumoscan.training.crossval import (
        CrossvalConfig,
        choose_settings,
        describe_l2,
        fit_linear_head,
        label_strength,
        shipped_settings,
    )

    assert label_strength("Pneumonia", {1e-3: {"Pneumonia/nih": 0.70, "Edema/nih": 0.8},
                                        1e-5: {"Pneumonia/nih": 0.75, "Edema/nih": 0.6}}, 1e-3) == 1e-5
    assert label_strength("Hernia", {1e-3: {"Pneumonia/nih": 0.7}}, 0.3) == 0.3  # not judged: the fallback
    assert label_strength("Edema", {1e-3: {"Edema/nih": 0.8}, 1e-1: {"Edema/nih": 0.8}}, 1e-5) == 1e-1  # tie: stronger
    rng = np.random.default_rng(3)
    n = 1200
    x = rng.normal(size=(n, 40)).astype(np.float32)
    labels = np.full((n, len(LABELS)), np.nan, np.float32)
    labels[:, 0] = (x[:, :30].sum(1) + rng.normal(scale=3, size=n) > 0).astype(np.float32)
    labels[:, 1] = (x[:, 0] + rng.normal(scale=0.3, size=n) > 0).astype(np.float32)
    sources, views, patients = np.array(["nih"] * n), np.array(["PA"] * n), np.array([f"p{i}" for i in range(n)])
    cfg = CrossvalConfig(cache="", backbone="", out="", view_balance=False, l2_grid=(1e-4, 3.0), per_label_l2=True)
    _, l2, _ = choose_settings(x, labels, sources, views, patients, cfg, salt=0)
    assert len(l2) == len(LABELS) and (l2[0], l2[1]) == (3.0, 1e-4) and set(l2[2:]) == {1e-4}
    assert "L2 per label" in describe_l2(l2) and describe_l2(1e-3) == "L2 0.001"
    W, _ = fit_linear_head(x, labels, np.ones_like(labels), l2)
    same, _ = fit_linear_head(x, labels, np.ones_like(labels), 3.0)
    assert np.allclose(W[0], same[0], atol=1e-4) and np.abs(W[1]).max() > np.abs(same[1]).max()
    folds = [{"domain_weight": 1.0, "l2": (1e-3, 1e-5)}, {"domain_weight": 1.0, "l2": (1e-3, 1e-4)},
             {"domain_weight": 1.0, "l2": (1e-2, 1e-5)}]
    assert shipped_settings(folds) == (1.0, (1e-3, 1e-5))
    assert shipped_settings([{"domain_weight": 1.0, "l2": 0.01}] * 2) == (1.0, 0.01)
    # one strength for all: the pair most folds chose, as before per-label strengths existed
    pairs = [(1.0, 0.1), (1.0, 0.01), (2.0, 0.03), (2.0, 0.03), (1.0, 0.3)]
    assert shipped_settings([{"domain_weight": d, "l2": s} for d, s in pairs]) == (2.0, 0.03)


def test_out_of_fold_probabilities_never_depend_on_the_films_own_labels():
    """Flip every label of one fold's films: that fold's out-of-fold probabilities stay exactly
    the same (no film, and no film of its patient, reached the head that scored it), while the
    other folds' change."""
    from pneumoscan.labels import LABELS
    from pneumoscan.training.crossval import CrossvalConfig, cross_validate
    from pneumoscan.training.data import patient_folds
    from pneumoscan.training.metrics import roc_auc

    rng = np.random.default_rng(0)
    n = 240
    patients = np.array([f"p{i // 2}" for i in range(n)])  # two films per patient
    x = rng.normal(size=(n, 16)).astype(np.float32)
    labels = (rng.random((n, len(LABELS))) < 0.3).astype(np.float32)
    labels[:, 0] = (x[:, 0] > 0).astype(np.float32)
    sources, views = np.array(["nih"] * n), np.array(["PA", "AP"] * (n // 2))
    cfg = CrossvalConfig(cache="", backbone="", out="", folds=4, l2_grid=(1e-3, 1e-1))
    first = cross_validate(x, labels, sources, views, patients, cfg, progress=lambda m: None)
    flipped = labels.copy()
    inside = patient_folds(patients, 4, cfg.seed) == 0
    flipped[inside] = 1 - flipped[inside]
    second = cross_validate(x, flipped, sources, views, patients, cfg, progress=lambda m: None)
    assert np.array_equal(first["oof"][inside], second["oof"][inside])
    assert not np.allclose(first["oof"][~inside], second["oof"][~inside])
    assert roc_auc(labels[:, 0], first["oof"][:, 0]) > 0.9  # the learnable label is learnt out of fold


def test_cosine_schedule_warms_up_then_falls_to_zero():
    from pneumoscan.training.fit_all import warmup_cosine

    factors = [warmup_cosine(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


@needs_data
def test_val_fold_holds_out_crossval_fold_k(cache64):
    """--val-fold k: validation is exactly crossval's fold k of the labelled films, whole patients."""
    from pneumoscan.training.cache import CropCache
    from pneumoscan.training.data import patient_folds, select_rows

    cache = CropCache(cache64)
    rows = select_rows(cache, True, val_fold=1)
    patients = cache.table["patient"].astype(str).to_numpy()
    fold = patient_folds(patients, 5, 2026)
    assert len(rows["val"]) and (fold[rows["val"]] == 1).all() and (fold[rows["train"]] != 1).all()
    assert not set(patients[rows["val"]]) & set(patients[rows["train"]])
    with pytest.raises(ValueError, match="--val-fold"):
        select_rows(cache, True, val_fold=5)


def test_fold_figures_track_the_radiologists_label_where_the_index_gives_it():
    """progress.jsonl's figures: NIH Pneumonia against normal films, RSNA's opacity label read from
    rsna-nih-masked/index.csv (copies by file name, originals by NIH image name)."""
    import pandas as pd

    from pneumoscan.labels import LABELS
    from pneumoscan.training.data import opacity_of
    from pneumoscan.training.fit_all import fold_figures

    index = pd.read_csv(DATA / "rsna-nih-masked" / "index.csv").groupby("rsna_class").head(14).reset_index(drop=True)
    index = index.head(40)
    table = pd.DataFrame({"path": [f"/x/{p}" for p in index["path"]] + [f"/y/{index['nih_image'][0]}", "/z/other.png"],
                          "source": ["nihmasked"] * 40 + ["nih", "kermany"]})
    opacity = opacity_of(table, DATA / "rsna-nih-masked" / "index.csv")
    assert list(opacity[:40]) == list(index["rsna_class"]) and opacity[40] == index["rsna_class"][0] and opacity[41] == ""
    labels = np.full((42, len(LABELS)), np.nan)
    labels[:, LABELS.index("Pneumonia")] = (opacity == "Lung Opacity").astype(float)
    labels[:, LABELS.index("No Finding")] = (opacity == "Normal").astype(float)
    probs = np.where(opacity == "Lung Opacity", 0.9, 0.1)[:, None].repeat(len(LABELS), axis=1)
    figures = fold_figures(labels, probs, table["source"].to_numpy(), opacity)
    expected = [int((opacity[:40] == "Lung Opacity").sum()), int((opacity[:40] == "Normal").sum())]
    assert figures["opacity_vs_normal_copies"] == {"auc": 1.0, "pos_neg": expected}
    assert figures["kermany_pneumonia"]["auc"] is None  # one film: no AUC, said as None


def test_frozen_batchnorm_keeps_its_statistics_through_training_mode(tmp_path):
    """--frozen-bn: every time the loop puts the module in training mode, BatchNorm stays in eval
    mode, so a training step leaves its running statistics as they were (the rest still learns)."""
    import torch

    from pneumoscan.labels import LABELS
    from pneumoscan.training.config import TrainConfig
    from pneumoscan.training.fit_all import lightning_module

    cfg = TrainConfig(cache=str(tmp_path), out=str(tmp_path), init="random", frozen_bn=True)
    module = lightning_module(cfg, np.ones(len(LABELS), np.float32), {}, np.array([])).train()
    module.on_train_batch_start(None, 0)  # what the loop calls before each batch
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and module.model.head.training
    before = norms[0].running_mean.clone()
    weight = module.model.net.features.conv0.weight.clone()
    loss = module.model(torch.rand(4, 1, 64, 64)).sum()
    loss.backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert torch.equal(norms[0].running_mean, before) and not torch.equal(module.model.net.features.conv0.weight, weight)
    plain = lightning_module(TrainConfig(cache=str(tmp_path), out=str(tmp_path), init="random"),
                             np.ones(len(LABELS), np.float32), {}, np.array([])).train()
    plain.on_train_batch_start(None, 0)
    assert all(m.training for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.slow
def test_evaluate_takes_the_crops_an_earlier_command_made_from_the_shared_cache(trained, small_manifest, tmp_path,
                                                                                 monkeypatch):
    """Issue 40: `evaluate`, `calibrate` and `compare` read, segment and crop a film once per
    preprocessing across commands: the second run reads no film and scores the same; a renamed copy
    is found by its content, a film changed in place is cropped again, and the store keeps to its
    size limit (0 turns it off)."""
    import shutil

    import pneumoscan.pipeline as pipeline_module
    from pneumoscan.data.manifest import read_manifest
    from pneumoscan.training.evaluate import score_split

    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "cache"))
    table = read_manifest(small_manifest)
    rows = table[(table.split == "test") & (table.source == "nih")].head(6).copy()
    films = tmp_path / "films"
    films.mkdir()
    for i, path in enumerate(rows.path):
        shutil.copy(path, films / f"{i}.png")
    rows["path"] = [str(films / f"{i}.png") for i in range(len(rows))]
    manifest = tmp_path / "m.csv"
    rows.to_csv(manifest, index=False)
    real, read = pipeline_module.read_segment_crop, []
    monkeypatch.setattr(pipeline_module, "read_segment_crop",
                        lambda paths, *a, **k: read.extend(paths) or real(paths, *a, **k))

    def score():
        read.clear()
        return score_split(manifest, "test", model=trained / "model.pt", backend="torch")

    first = score()
    assert len(read) == 6 and len(list((tmp_path / "cache" / "crops").glob("*/*/*.npz"))) == 6
    again = score()
    assert read == [] and np.array_equal(first.probs, again.probs)
    (films / "0.png").rename(films / "renamed.png")
    shutil.copy(table[table.source == "nih"].path.iloc[-1], films / "1.png")  # another film, same name
    rows["path"] = [str(films / "renamed.png"), *rows.path.iloc[1:]]
    rows.to_csv(manifest, index=False)
    score()
    assert read == [str(films / "1.png")]
    entry = max(p.stat().st_size for p in (tmp_path / "cache" / "crops").glob("*/*/*.npz"))
    monkeypatch.setenv("PNEUMOSCAN_CROP_CACHE_MB", str(2.5 * entry / 2**20))  # room for 2 crops
    score()
    assert 1 <= len(list((tmp_path / "cache" / "crops").glob("*/*/*.npz"))) <= 2
    monkeypatch.setenv("PNEUMOSCAN_CROP_CACHE_MB", "0")
    shutil.rmtree(tmp_path / "cache" / "crops")
    score()
    assert len(read) == 6 and not (tmp_path / "cache" / "crops").exists()


@pytest.mark.parametrize("value", ["abc", "-5", "nan"])
def test_a_shared_crop_cache_size_that_is_not_a_size_is_a_clear_error(monkeypatch, value):
    """``PNEUMOSCAN_CROP_CACHE_MB`` is read when a command scores films; anything but a size in MiB
    ends in one line naming the variable (the CLI prints ValueErrors of a scoring job as one line)."""
    from pneumoscan.training.cropstore import limit_from_env

    monkeypatch.setenv("PNEUMOSCAN_CROP_CACHE_MB", value)
    with pytest.raises(ValueError, match="PNEUMOSCAN_CROP_CACHE_MB=.*expected a size in MiB"):
        limit_from_env()
    monkeypatch.setenv("PNEUMOSCAN_CROP_CACHE_MB", "0.5")
    assert limit_from_env() == 2**19


def test_train_config_refuses_what_cannot_work_when_it_is_made(tmp_path):
    """The options are checked in TrainConfig itself, so a Python caller gets the command line's
    one-line refusals; every problem is named at once."""
    from pneumoscan.training.config import TrainConfig

    with pytest.raises(ValueError) as refused:
        TrainConfig(cache="c", out="o", init=str(tmp_path / "absent.pt"), strategy="mpi", train_from="denseblock4",
                    freeze_backbone=True, betas=(0.9, 1.5), schedule="step")
    text = str(refused.value)
    for words in ("--init must be imagenet, random or an existing model file", "--strategy must be auto, ddp or fsdp",
                  "--train-from and --freeze-backbone exclude each other", "--betas must be two numbers",
                  "--schedule must be plateau or cosine"):
        assert words in text, text
    assert TrainConfig(cache="c", out="o", init="random", train_from="denseblock4").train_from == "denseblock4"
