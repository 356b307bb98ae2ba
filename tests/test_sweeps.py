"""Sweeps: the experiment configs, the SLURM launcher config, unique sweep directories, W&B group /
name per job, a real submitit_local multirun of run.py, and experiments/collect.py (offline)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from helpers.hydra_utils import compose_cfg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import collect  # noqa: E402

# 2 images x batch 2: one step per epoch; validation on one image.
SWEEP_TINY = [
    "debug=default", "logger=wandb", "model.image_size=128", "dataset.train.num_images=2", "dataset.val.num_images=1", "trainer.max_epochs=1",
    "visual.num_images=0",
]


def job_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               MOBILESAM_SE_DATA=str(tmp_path.parent / "sweep_data"))
    return env


# -- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params", [
    ("sweep_grid", {"dataset.grid_points": "8,16,32"}),
    ("sweep_loss", {"loss.w_focal": "5.0,15.0,20.0", "loss.w_dice": "0.5,1.0"}),
])
def test_experiment_sweep_configs(name, params):
    cfg = compose_cfg([f"experiment={name}"], return_hydra_config=True)
    assert cfg.task_name == name
    assert {k: str(v) for k, v in cfg.hydra.sweeper.params.items()} == params


def test_slurm_launcher_config():
    cfg = compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                       "hydra.launcher.tasks_per_node=4"], return_hydra_config=True)
    la = cfg.hydra.launcher
    assert la._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (la.partition, la.gpus_per_node, la.tasks_per_node) == ("gpu", 4, 4)
    assert la.signal_delay_s > 0 and la.max_num_timeout > 0 and la.additional_parameters.requeue is True
    assert la.name == cfg.task_name and any("OMP_NUM_THREADS" in s for s in la.setup)


def test_sweep_dir_pattern():
    raw = OmegaConf.to_container(compose_cfg([], return_hydra_config=True).hydra.sweep, resolve=False)
    assert "${sweep_uid:}" in raw["dir"] and "oc.env" not in raw["dir"]  # jobs re-resolve it: cached only
    assert raw["subdir"] == "${hydra.job.num}"
    # (two launches with the same timestamp: test_submitit_local_sweeps)


# -- a real multirun: submitit_local ------------------------------------------------------------
@pytest.mark.slow
def test_submitit_local_sweeps(tmp_path):
    """Two sweeps started together, with the timestamp part of the directory forced equal (a day-
    resolution pattern): the per-launch token keeps them apart, and each job runs in <sweep>/<num>."""
    pattern = f"hydra.sweep.dir={tmp_path}/multirun/${{now:%Y-%m-%d}}_${{sweep_uid:}}"
    common = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15",
              pattern, *SWEEP_TINY, "experiment=sweep_loss", "loss.w_focal=15.0"]
    a = subprocess.Popen(common + ["logger=wandb", "logger.mode=disabled", "loss.w_dice=0.5,1.0"], cwd=REPO, env=job_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b = subprocess.Popen(common + ["logger=none", "loss.w_dice=2.0"], cwd=REPO, env=job_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out_a, out_b = a.communicate(timeout=400)[0], b.communicate(timeout=400)[0]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert a.returncode == 0, out_a[-4000:]
    assert b.returncode == 0, out_b[-4000:]

    sweeps = sorted((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 2, sweeps
    assert len({s.name.rsplit("_", 1)[0] for s in sweeps}) == 1  # same timestamp part ...
    by_jobs = {len(collect.job_dirs(s)): s for s in sweeps}  # ... yet two directories
    sweep_a, sweep_b = by_jobs[2], by_jobs[1]
    for sweep, n in ((sweep_a, 2), (sweep_b, 1)):
        for i in range(n):
            assert (sweep / str(i) / "checkpoints" / "last.ckpt").exists(), list(sweep.rglob("*"))[:30]
        assert (sweep / ".submitit").is_dir() and (sweep / "multirun.yaml").exists()

    # W&B: group = the sweep, name = the job's overrides (recorded in the config the run logs)
    for i, dice in enumerate(("0.5", "1.0")):
        logger = yaml.safe_load((sweep_a / str(i) / "config_resolved.yaml").read_text())["logger"]
        assert logger["group"] == f"sweep_loss-{sweep_a.name}"
        assert f"loss.w_dice={dice}" in logger["name"] and "loss.w_focal=15.0" in logger["name"]

    # collect.py, offline: a table over the swept values and a plot
    proc = subprocess.run([sys.executable, "experiments/collect.py", str(sweep_a), "--source", "offline"],
                          cwd=REPO, env=job_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    assert table[0].startswith("| job | loss.w_focal | loss.w_dice | best val/dice")
    assert [row.split(" | ")[2] for row in table[2:4]] == ["0.5", "1.0"]
    assert all("complete" in row for row in table[2:4])
    assert (sweep_a / "results.png").stat().st_size > 1000 and (sweep_a / "results.csv").exists()


# -- collect.py on a made-up sweep (fast) -------------------------------------------------------
def _fake_run(root: Path, num: int, overrides, scores, max_epochs=3, with_ckpt=True):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / "checkpoints").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (d / "config_resolved.yaml").write_text(yaml.safe_dump(
        {"trainer": {"monitor": "dice", "max_epochs": max_epochs, "early_stop_patience": None},
         "logger": {"group": "sweep_grid-x", "name": ",".join(overrides)}}))
    history = [{"epoch": e, "step": 10 * (e + 1), "train/loss": 1.0 / (e + 1), "val/dice": s} for e, s in enumerate(scores)]
    log = "\n".join("\t".join(f"{k}={v}" for k, v in h.items()) for h in history) + "\n"
    (d / "checkpoints" / "training_log.txt").write_text(log)
    if with_ckpt:
        torch.save({"history": history, "best_score": max(scores), "epoch": len(scores), "step": 10 * len(scores),
                    "bad_validations": 0}, d / "checkpoints" / "last.ckpt")


def test_collect_offline_table_and_plot(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"sweeper": {"params": {"dataset.grid_points": "8,16"}},
                   "overrides": {"task": ["loss.w_dice=0.5,1.0", "trainer.max_epochs=3"]}}}))
    _fake_run(sweep, 0, ["trainer.max_epochs=3", "dataset.grid_points=8", "loss.w_dice=0.5"], [0.1, 0.3, 0.2])
    _fake_run(sweep, 1, ["trainer.max_epochs=3", "dataset.grid_points=8", "loss.w_dice=1.0"], [0.2, 0.4, 0.5])
    _fake_run(sweep, 2, ["trainer.max_epochs=3", "dataset.grid_points=16", "loss.w_dice=0.5"], [0.3, 0.6, 0.55])
    # preempted and not yet resumed, last.ckpt lost: the text log still tells its story
    _fake_run(sweep, 3, ["trainer.max_epochs=3", "dataset.grid_points=16", "loss.w_dice=1.0"], [0.25], with_ckpt=False)

    results, keys = collect.collect_offline(sweep)
    assert keys == ["dataset.grid_points", "loss.w_dice"]  # trainer.max_epochs is the same everywhere
    assert [r.best for r in results[:3]] == [0.3, 0.5, 0.6]
    assert [r.final for r in results] == [0.2, 0.5, 0.55, 0.25]
    assert [r.status for r in results] == ["complete"] * 3 + ["partial (1/3 epochs)"]
    assert collect.sweep_group(sweep) == "sweep_grid-x"

    assert collect.main([str(sweep), "--source", "offline", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| 2 | 16 | 0.5 | 0.6000 | 0.5500 | 3 | 30 | complete |" in printed
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("job,dataset.grid_points,loss.w_dice,best val/dice,final val/dice") and len(rows) == 5
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
    # another metric from the history
    results, _ = collect.collect_offline(sweep, metric="train/loss")
    assert results[0].best == 1.0 and results[0].final == pytest.approx(1 / 3)
