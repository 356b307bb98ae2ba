"""Checkpoints describe the model that wrote them, and segment / evaluate / export / tune build that
model from them with no model flags: best.pt + best.model.yaml and last.ckpt from a real tiny
training run, bare official-layout files (mobile_sam.pt) recognised by their weights' shapes, and
typed model flags that disagree (image_size: wins with a warning; size: an error)."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers.hydra_utils import compose_cfg
from mobilesam_se.errors import ConfigError
from mobilesam_se.models.build import build_from_checkpoint, build_mobilesam
from mobilesam_se.models.checkpoint import (
    CheckpointError,
    description_path,
    export_official,
    official_shapes,
    official_state_dict,
    read_description,
)
from mobilesam_se.overrides import typed_model_keys

REPO = Path(__file__).resolve().parents[1]
# A model no CLI default matches (they default to model=mobilesam: full size, 256 px, multimask).
TRAINED = ["model.image_size=128", "model.multimask_output=false", "trainer.max_epochs=1"]
DESCRIBED = {"name": "tiny", "size": "tiny", "image_size": 128, "multimask_output": False}
SMALL_DATA = ["dataset.val.num_images=2", "dataset.val.image_hw=[96,128]", "dataset.grid_points=4", "progress=false",
              "device=cpu"]


def _data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "data"


pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """checkpoints/ of a real tiny training run (best.pt, best.model.yaml, last.ckpt)."""
    from mobilesam_se.assembly import build_run

    out = tmp_path_factory.mktemp("described") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILESAM_SE_DATA", str(_data_dir(tmp_path_factory)))
        trainer, cleanup = build_run(compose_cfg(["debug=default", *TRAINED]), out_dir=out)
        try:
            trainer.fit()
        finally:
            cleanup()
    return out / "checkpoints"


def compose_cli(name: str, overrides):
    import importlib

    importlib.import_module(f"mobilesam_se.{name}")  # registers the CLI's schema (<name>_schema)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _described(model_cfg) -> dict:
    return {k: model_cfg[k] for k in DESCRIBED}


# -- what the project writes --------------------------------------------------------------------------
def test_training_describes_best_pt_beside_it_and_last_ckpt_inside(ckpts):
    best = torch.load(ckpts / "best.pt", weights_only=True)
    with torch.device("meta"):
        expected = official_shapes(build_mobilesam(128, size="tiny"))
    # the official layout, no extra key
    assert {k: tuple(v.shape) for k, v in best.items()} == {k: tuple(v) for k, v in expected.items()}
    side = yaml.safe_load((ckpts / "best.model.yaml").read_text())["model"]
    assert _described(side) == DESCRIBED
    assert side["net"] == {"_target_": "mobilesam_se.models.build.build_mobilesam", "image_size": 128, "size": "tiny",
                           "checkpoint": None, "drop_path_rate": 0.0, "grad_checkpointing": False,
                           "attention_init": "tied_qk", "pe_scale": 0.5}
    last = ckpts / "last.ckpt"
    description, source = read_description(last, torch.load(last, weights_only=True))
    assert description == side and source == "the config inside last.ckpt"


def test_python_gets_the_described_model_whatever_the_config_says(ckpts):
    cfg = compose_cli("segment", [])
    assert (cfg.model.size, cfg.model.image_size) == ("mobilesam", 256)  # the segment CLI's default model
    model = build_from_checkpoint(ckpts / "best.pt", cfg)
    assert model.image_size == 128 and model.prompt_encoder.embed_dim == 32  # tiny at 128 px


# -- every CLI, no model flags ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["best.pt", "last.ckpt"])
def test_segment_builds_the_described_model(ckpts, tmp_path, coffee, name):
    from PIL import Image

    from mobilesam_se.segment import run

    Image.fromarray(coffee[::8, ::8]).save(tmp_path / "cup.png")
    args = [f"checkpoint={ckpts / name}", f"input={tmp_path / 'cup.png'}", f"output={tmp_path / 'out'}",
            "generator.points_per_side=4", "generator.pred_iou_thresh=0", "generator.stability_score_thresh=0",
            "progress=false"]
    cfg = compose_cli("segment", args)
    assert run(cfg, overrides=args) == [tmp_path / "out" / "cup.json"]
    assert _described(cfg.model) == DESCRIBED


def test_evaluate_builds_the_described_model(ckpts, tmp_path):
    from mobilesam_se.evaluate import run_evaluation

    args = [f"checkpoint={ckpts / 'best.pt'}", f"output={tmp_path}", "generator.enabled=false", *SMALL_DATA]
    report = run_evaluation(compose_cli("evaluate", args), overrides=args)
    info = report["info"]
    assert (info["model"], info["image_size"], info["multimask_output"]) == ("tiny", 128, False)
    assert report["coco_raw"]["dets_per_image"] == 16  # 4 x 4 prompts, one candidate each (single-mask)


def test_tune_builds_the_described_model(ckpts):
    from mobilesam_se.tune import load_for_tuning

    args = [f"checkpoint={ckpts / 'last.ckpt'}", *SMALL_DATA]
    cfg = compose_cli("tune", args)
    model, dataset = load_for_tuning(cfg, overrides=args)
    assert model.image_size == 128 and _described(cfg.model) == DESCRIBED
    assert dataset[0].image.shape[-1] == 128  # the dataset follows the model's image size


def test_export_round_trips_the_description(ckpts, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from mobilesam_se.export import run

    out = tmp_path / "exported.pt"
    args = [f"checkpoint={ckpts / 'last.ckpt'}", "format=mobile_sam", f"out={out}"]
    run(compose_cli("export", args), overrides=args)
    exported, best = torch.load(out, weights_only=True), torch.load(ckpts / "best.pt", weights_only=True)
    # one epoch: best.pt and last.ckpt hold the same weights
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)
    assert (tmp_path / "exported.model.yaml").read_text().split("\n", 1)[1] == \
        (ckpts / "best.model.yaml").read_text().split("\n", 1)[1]
    # ... and the export is itself a described checkpoint: ONNX of the single-mask model, no flags
    onnx_args = [f"checkpoint={out}", "format=onnx", f"out={tmp_path / 'decoder.onnx'}"]
    run(compose_cli("export", onnx_args), overrides=onnx_args)  # onnx.check compares with PyTorch
    sess = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    masks, iou = sess.run(None, {"image_embeddings": np.zeros((1, 32, 8, 8), np.float32),
                                 "point_coords": np.full((2, 1, 2), 50.0, np.float32),
                                 "point_labels": np.ones((2, 1), np.float32)})
    assert masks.shape == (2, 1, 32, 32) and iou.shape == (2, 1)


# -- files without a description ----------------------------------------------------------------------
def test_official_file_is_recognised_and_runs_at_1024(tmp_path):
    """A state dict written by the official code: evaluate's defaults say 256 px, the file is read as
    MobileSAM at 1024, and the dataset follows."""
    mobile_sam = pytest.importorskip("mobile_sam")
    path = tmp_path / "mobile_sam.pt"
    torch.save(mobile_sam.build_sam_vit_t().state_dict(), path)
    cfg = compose_cli("evaluate", [f"checkpoint={path}"])
    assert cfg.model.image_size == 256
    model = build_from_checkpoint(path, cfg)
    assert (cfg.model.name, cfg.model.size, cfg.model.image_size, model.image_size) == ("mobilesam", "mobilesam", 1024, 1024)
    assert cfg.dataset.val.image_size == 1024
    typed = compose_cli("evaluate", [f"checkpoint={path}", "model.image_size=512"])
    assert build_from_checkpoint(path, typed, {"image_size"}).image_size == 512  # typed: wins, nothing to disagree with


def test_bare_tiny_file_is_recognised_at_the_configured_size(tmp_path):
    path = tmp_path / "weights.pt"
    export_official(build_mobilesam(128, size="tiny"), path, compose_cfg(["model=tiny"]).model)
    assert description_path(path).is_file()
    export_official(build_mobilesam(128, size="tiny"), path)  # bare now: the old description must go with it
    assert not description_path(path).exists()
    cfg = compose_cli("segment", [])
    model = build_from_checkpoint(path, cfg)
    assert (cfg.model.name, cfg.model.size, cfg.model.image_size, model.image_size) == ("tiny", "tiny", 256, 256)


def test_description_from_before_the_size_rename_loads(tmp_path):
    """Files described before model.size took the model= names say size: full for mobilesam."""
    path = tmp_path / "best.pt"
    old = compose_cfg(["model.image_size=128"]).model
    old.size = old.net.size = "full"
    export_official(build_mobilesam(128, size="mobilesam"), path, old)
    assert yaml.safe_load(description_path(path).read_text())["model"]["size"] == "full"
    cfg = compose_cli("segment", [])
    model = build_from_checkpoint(path, cfg)
    assert (cfg.model.size, cfg.model.net.size, model.image_size) == ("mobilesam", "mobilesam", 128)


def test_unknown_architecture_and_broken_description_name_the_file(tmp_path):
    sd = official_state_dict(build_mobilesam(128, size="tiny"))
    sd.pop(next(k for k in sd if k.startswith("mask_decoder.")))
    odd = tmp_path / "odd.pt"
    torch.save(sd, odd)
    with pytest.raises(CheckpointError, match=r"odd\.pt is no MobileSAM of a known size \(mobilesam: \d+ keys"):
        build_from_checkpoint(odd, compose_cli("segment", []))
    good = tmp_path / "good.pt"
    export_official(build_mobilesam(128, size="tiny"), good)
    (tmp_path / "good.model.yaml").write_text("model: [not, a, mapping]\n")
    with pytest.raises(CheckpointError, match=r"good\.model\.yaml: a model description needs .* delete it"):
        build_from_checkpoint(good, compose_cli("segment", []))


# -- typed flags that disagree ------------------------------------------------------------------------
def test_typed_image_size_wins_with_a_warning(ckpts, caplog):
    args = ["model.image_size=256", "model.multimask_output=false"]
    cfg = compose_cli("segment", args)
    with caplog.at_level(logging.WARNING, logger="mobilesam_se.models.build"):
        model = build_from_checkpoint(ckpts / "best.pt", cfg, typed_model_keys(args))
    assert model.image_size == 256 and cfg.model.image_size == 256 and cfg.model.net.image_size == 256
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"model.image_size=256 (typed) overrides 128 recorded for {ckpts / 'best.pt'} (best.model.yaml)"]


@pytest.mark.parametrize("flag,named", [("model=small", "model=small"), ("model.size=mobilesam", "model.size=mobilesam")])
def test_typed_architecture_that_does_not_fit_is_an_error(ckpts, flag, named):
    cfg = compose_cli("evaluate", [flag])
    expected = rf"{named} does not fit checkpoint .*best\.pt: it is a model\.size=tiny model"
    with pytest.raises(ConfigError, match=expected):
        build_from_checkpoint(ckpts / "best.pt", cfg, typed_model_keys([flag]))
    agreeing = compose_cli("evaluate", ["model=tiny"])
    build_from_checkpoint(ckpts / "best.pt", agreeing, typed_model_keys(["model=tiny"]))  # the same size: fine


def test_command_line_error_is_one_line(ckpts, tmp_path, coffee):
    """The real command line (Hydra's overrides): a size that does not fit ends with exit status 2."""
    from PIL import Image

    Image.fromarray(coffee[::8, ::8]).save(tmp_path / "cup.png")
    cmd = [sys.executable, "-m", "mobilesam_se.segment", f"checkpoint={ckpts / 'best.pt'}",
           f"input={tmp_path / 'cup.png'}", f"output={tmp_path / 'out'}", "model=small"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model=small does not fit checkpoint")


def test_typed_model_keys():
    typed = ["model.image_size=512", "+model.extra=1", "generator.points_per_side=4"]
    assert typed_model_keys(typed) == {"image_size", "extra"}
    assert typed_model_keys(["model=small", "checkpoint=model.pt"]) == {"name", "size"}
