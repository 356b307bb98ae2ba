"""Every shell command in README.md and docs/*.md, as written, at smoke size.

The commands are read from the ```bash blocks (continuation lines joined, comments dropped); `...`
(the docs' "and your other overrides") is dropped and placeholder paths (/data/train, best.pt,
photos/, ...) point at files generated here: a folder dataset, an SA-1B folder, stand-in
checkpoints in the official layouts, cached under their names so that `mobile_sam` / `sam_vit_h`
resolve without a network. Smoke overrides are appended (they win) so each runs in seconds:

- `python run.py` (no -m), `python -m mobilesam_se.{segment,evaluate,export,weights,distill.cache,
  data.check}`: run in-process, for real (one training step, one image);
- commands that need a cluster, several GPUs, the network or minutes (SLURM launcher / sbatch /
  torchrun / -m sweeps / the benchmarks / make / pip / W&B): their run.py overrides must compose
  (each sweep's first job), the scripts and make targets they name must exist. Their own tests
  (test_sweeps*, test_ddp, test_preemption_slurm, test_benchmarks_smoke) run them.

A command that matches no rule fails the test, so a new command in the docs needs a rule here.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from helpers.hydra_utils import compose_cfg
from mobilesam_se import weights
from mobilesam_se.data import write_folder_sample
from mobilesam_se.models import teachers as teachers_mod
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import export_official, official_state_dict
from mobilesam_se.models.sam_vit import SAM_VIT_CONFIGS
from mobilesam_se.models.teachers import build_sam_vit_teacher

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# fp32: bf16 autocast (the GPU recipe's) is slow on a CPU; validation only where the command is about it.
RUN_SMOKE = ["logger=none", "trainer.max_epochs=1", "trainer.max_steps=1", "trainer.progress=false", "trainer.precision=fp32",
             "trainer.warmup_steps=1", "dataset.grid_points=2", "dataset.batch_size=1", "dataset.val_batch_size=1",
             "dataset.val_max_images=1", "visual.num_images=1", "model.image_size=128"]
SYNTHETIC_SMOKE = ["dataset.train.num_images=1", "dataset.val.num_images=1"]
CLI_SMOKE = {
    "segment": ["generator.points_per_side=2", "progress=false"],
    "evaluate": ["max_images=1", "dataset.grid_points=2", "progress=false", "model.image_size=128", "output=eval_out"],
    "export": ["onnx.check=false"],
    "tune": ["max_images=1", "dataset.grid_points=2", "progress=false", "model.image_size=128", "write=false"],
    "distill.cache": ["model.image_size=128", "dataset.grid_points=2", "dataset.batch_size=1"],
}


def doc_commands() -> List[Tuple[str, str]]:
    """(file:line, command) for every command of every ```bash block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        inside, buf, start = False, "", 0
        for n, line in enumerate(lines, 1):
            if line.startswith("```"):
                inside = line.strip() == "```bash"
                continue
            if not inside:
                continue
            if not buf:
                start = n
            buf += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
            if line.rstrip().endswith("\\"):
                continue
            words = shlex.split(buf, comments=True)
            buf = ""
            if words:
                out.append((f"{doc.name}:{start}", " ".join(shlex.quote(w) for w in words)))
    return out


def _sa1b(root: Path) -> None:
    from PIL import Image
    from pycocotools import mask as mask_utils

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "sa_1.jpg")
    m = np.zeros((24, 32), np.uint8, order="F")
    m[2:12, 3:20] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    (root / "sa_1.json").write_text(json.dumps({"image": {"file_name": "sa_1.jpg", "height": 24, "width": 32},
                                                "annotations": [{"id": 1, "segmentation": rle}]}))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[Dict[str, str]]:
    """Generated stand-ins for every placeholder the docs use; returns placeholder -> path."""
    tmp = tmp_path_factory.mktemp("docs")
    mp = pytest.MonkeyPatch()
    rng = np.random.default_rng(0)
    folder = tmp / "folder"
    for image_id in ("a", "b"):
        mask = np.zeros((24, 32), bool)
        mask[2:12, 3:20] = True
        write_folder_sample(folder, image_id, rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), [mask])
    _sa1b(tmp / "sa1b")
    (tmp / "photos").mkdir()
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp / "photos" / "p.png")
    torch.manual_seed(0)
    run_best = tmp / "run_best.pt"  # what the default run (`python run.py`, model=small) writes, described
    export_official(build_mobilesam(256, "small"), run_best, compose_cfg([]).model)
    # Official-layout stand-ins of the named checkpoints (tiny ViTs as SAM ViT-H / B), cached by name.
    wdir = tmp / "weights"
    wdir.mkdir()
    for cfg_name in ("vit_h", "vit_b"):
        mp.setitem(teachers_mod.SAM_VIT_CONFIGS, cfg_name, SAM_VIT_CONFIGS["tiny"])
    files = {"mobile_sam": official_state_dict(build_mobilesam(1024, "mobilesam")),
             "sam_vit_h": official_state_dict(build_sam_vit_teacher(SAM_VIT_CONFIGS["tiny"], 1024, "mobilesam")),
             "sam_vit_b": official_state_dict(build_sam_vit_teacher(SAM_VIT_CONFIGS["tiny"], 1024, "mobilesam"))}
    table = {}
    for name, sd in files.items():
        entry = weights.OFFICIAL[name]
        torch.save(sd, wdir / entry.filename)
        table[name] = {"url": entry.url, "sha256": hashlib.sha256((wdir / entry.filename).read_bytes()).hexdigest(),
                       "filename": entry.filename}
    (tmp / "table.json").write_text(json.dumps(table))
    mp.setenv(weights.ENV_TABLE, str(tmp / "table.json"))
    mp.setenv(weights.ENV_DIR, str(wdir))
    mp.setenv(weights.ENV_OFFLINE, "1")
    mp.setenv("MOBILESAM_SE_DATA", str(tmp / "data"))
    mp.chdir(tmp)  # relative outputs (masks/, outputs/, decoder.onnx) land here
    yield {
        "/data/train": str(folder), "/data/val": str(folder), "/data/mine": str(folder), "/data/mine_val": str(folder),
        "/data/sa1b": str(tmp / "sa1b"), "photos/": str(tmp / "photos"), "masks/": str(tmp / "masks"),
        "outputs/train/<run>/checkpoints/best.pt": str(run_best),
        "best.pt": str(wdir / "mobile_sam.pt"), "mobile_sam.pt": str(wdir / "mobile_sam.pt"),
        "/scratch/teacher_cache": str(tmp / "teacher_cache"), "_tmp": str(tmp),
    }
    mp.undo()


def _substitute(words: List[str], world: Dict[str, str]) -> List[str]:
    out = []
    for w in words:
        if w == "...":
            continue
        key, eq, value = w.partition("=")
        if eq and value in world:
            w = f"{key}={world[value]}"
        elif w in world:
            w = world[w]
        out.append(w)
    return out


def _run_train(args: List[str], world: Dict[str, str], label: str) -> None:
    from mobilesam_se.assembly import build_run

    out_dir = Path(world["_tmp"]) / "runs" / re.sub(r"\W", "_", label)
    args = [a for a in args if not a.startswith("hydra.run.dir=")]  # the run directory: ours
    smoke = RUN_SMOKE + [f"trainer.val_every={1 if any('eval' in a for a in args) else 0}"]
    cfg = compose_cfg(args + smoke)
    if cfg.dataset.name == "synthetic":
        cfg = compose_cfg(args + smoke + SYNTHETIC_SMOKE)
    trainer, cleanup = build_run(cfg, out_dir=out_dir)
    try:
        result = trainer.fit()
    finally:
        cleanup()
    assert result["step"] == 1, label


def _run_cli(module: str, args: List[str]) -> None:
    GlobalHydra.instance().clear()
    if module in ("weights", "data.check"):
        mod = __import__(f"mobilesam_se.{module}", fromlist=["main"])
        assert mod.main(args + (["--no-progress"] if module == "data.check" or args[:1] == ["fetch"] else [])) == 0
        return
    if module == "distill.cache":
        from mobilesam_se.distill.cache import main

        main(args + CLI_SMOKE[module])
        return
    # The Hydra CLIs: their config composed with the same overrides, then their run function (an
    # in-process @hydra.main would look for conf/ as a Python package).
    from hydra import compose, initialize_config_dir

    name, fn = {"segment": ("segment", "run"), "export": ("export", "run"), "evaluate": ("evaluate", "run_evaluation"),
                "tune": ("tune", "run_tune")}[module]
    mod = __import__(f"mobilesam_se.{module}", fromlist=[fn])
    if module == "evaluate":
        mod.register_evaluate_schema()
    overrides = args + CLI_SMOKE.get(module, [])
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(name, overrides=overrides)
        getattr(mod, fn)(cfg, overrides=overrides)  # typed, as on the command line: they win over the checkpoint's files
    finally:
        GlobalHydra.instance().clear()


def _compose_only(args: List[str]) -> None:
    args = [a for a in args if a not in ("-m", "--multirun")]
    args = [a.split(",")[0] if "=" in a and "," in a and not a.split("=", 1)[1].startswith("[") else a for a in args]
    compose_cfg([a for a in args if not a.startswith("hydra")], return_hydra_config=False)
    launcher = [a for a in args if a.startswith("hydra/launcher=")]
    if launcher:  # the launcher config and its keys compose too
        compose_cfg([a for a in args], return_hydra_config=True)


CLIS = ("segment", "evaluate", "export", "tune", "weights", "distill.cache", "data.check")


def run_command(cmd: str, world: Dict[str, str], label: str) -> str:
    """Runs or checks one command; returns how ("ran" / "composed" / "exists")."""
    words = _substitute(shlex.split(cmd), world)
    if words[:2] == ["python", "run.py"]:
        if "-m" in words or "hydra/launcher=slurm" in words:
            _compose_only(words[2:])
            return "composed"
        _run_train(words[2:], world, label)
        return "ran"
    if words[:2] == ["python", "-m"] and words[2].startswith("mobilesam_se."):
        module = words[2][len("mobilesam_se."):]
        assert module in CLIS, cmd
        _run_cli(module, words[3:])
        return "ran"
    if words[0] == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        _compose_only(words[script + 1:])
        return "composed"
    if words[0] == "sbatch":
        script = next(w for w in words if w.endswith(".sh"))
        assert (REPO / script).is_file(), script
        _compose_only(words[words.index(script) + 1:])
        return "composed"
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (REPO / "Makefile").read_text(), re.M), cmd
        return "exists"
    if words[0] in ("bash",) or words[0].startswith("experiments/"):
        script = words[1] if words[0] == "bash" else words[0]
        assert (REPO / script).is_file(), script
        if words[0].startswith("experiments/"):
            _compose_only(words[1:])
        return "exists"
    if words[:2] == ["python", "-m"] and words[2].startswith("benchmarks."):
        assert (REPO / (words[2].replace(".", "/") + ".py")).is_file(), cmd
        return "exists"
    if words[:2] == ["python", "experiments/collect.py"]:
        assert (REPO / "experiments" / "collect.py").is_file()
        return "exists"
    if words[0] in ("pip", "conda", "wandb"):
        return "exists"  # installation / W&B sync: outside what a test may do offline
    raise AssertionError(f"{label}: no rule for the documented command {cmd!r}")


def test_doc_commands_are_found():
    cmds = doc_commands()
    assert len(cmds) > 30
    text = " | ".join(c for _, c in cmds)
    assert "python run.py distillation=full model.multimask_output=false" in text
    assert "python run.py prompted.mode=single" in text  # the training mode's group (issue 13)
    from mobilesam_se.config import MOVED_KEYS

    old = [k for k in MOVED_KEYS if re.search(rf"(?<![\w.]){re.escape(k)}=", text)]
    assert not old, f"documented commands use moved keys: {old}"


def _unique_commands() -> List[Tuple[str, str]]:
    seen, out = set(), []
    for label, cmd in doc_commands():
        if cmd not in seen:  # the same command in two places runs once
            seen.add(cmd)
            out.append((label, cmd))
    return out


@pytest.mark.parametrize("label,cmd", _unique_commands(), ids=[label for label, _ in _unique_commands()])
def test_documented_command_runs_as_written(label, cmd, world):
    try:
        how = run_command(cmd, world, label)
    except BaseException as exc:
        raise AssertionError(f"{label}: {cmd}\n  {type(exc).__name__}: {exc}") from exc
    words = shlex.split(cmd)
    single_run = words[:2] == ["python", "run.py"] and "-m" not in words and "hydra/launcher=slurm" not in words
    if single_run or (words[:2] == ["python", "-m"] and words[2].startswith("mobilesam_se.")):
        assert how == "ran", (label, how)  # these run for real, not just compose
    else:
        assert how in ("composed", "exists"), (label, how)
