"""`python -m mobilesam_se.export`: official MobileSAM weights and the ONNX prompt decoder, round trips."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import perturbed_official_state_dict
from mobilesam_se.export import check_onnx, export_onnx, run
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import export_official, load_official_state_dict

REPO = Path(__file__).resolve().parents[1]


def compose_export(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("export", overrides=overrides)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_mobilesam(128, size="tiny").eval()
    sd = {k: v + 0.05 * torch.randn_like(v) if v.dtype.is_floating_point else v
          for k, v in model.state_dict().items()}  # non-trivial biases and norms
    model.load_state_dict(sd)
    root = tmp_path_factory.mktemp("export")
    export_official(model, root / "best.pt")
    torch.save({"model": torch.load(root / "best.pt"), "epoch": 1}, root / "last.ckpt")
    return root, model


@pytest.mark.parametrize("multimask", [True, False])
def test_onnx_matches_pytorch(tiny_ckpt, tmp_path, multimask):
    pytest.importorskip("onnxruntime")
    root, model = tiny_ckpt
    out = tmp_path / "decoder.onnx"
    # a bare file (no description): its size is read from the weights, the image size and mask count typed
    cfg = compose_export([f"checkpoint={root / 'last.ckpt'}", "format=onnx", f"out={out}",
                          "model.image_size=128", f"model.multimask_output={str(multimask).lower()}"])
    run(cfg)  # also checks with onnxruntime
    import onnx

    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["image_embeddings", "point_coords", "point_labels"]
    assert [o.name for o in m.graph.output] == ["low_res_masks", "iou_predictions"]
    # dynamic prompts and points: other P and K than at export
    for p, k in [(1, 1), (7, 4)]:
        dm, di = check_onnx(model, out, multimask_output=multimask, num_prompts=p, num_points=k, seed=p)
        assert dm < 1e-4 and di < 1e-4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    masks, iou = sess.run(None, {"image_embeddings": np.zeros((1, 32, 8, 8), np.float32),
                                 "point_coords": np.full((2, 1, 2), 50.0, np.float32),
                                 "point_labels": np.ones((2, 1), np.float32)})
    m_out = 3 if multimask else 1
    assert masks.shape == (2, m_out, 32, 32) and iou.shape == (2, m_out)


@pytest.mark.slow
def test_onnx_dynamo_exporter(tiny_ckpt, tmp_path):
    pytest.importorskip("onnxscript")
    _, model = tiny_ckpt
    path = export_onnx(model, tmp_path / "d.onnx", dynamo=True)
    for p, k in [(3, 2), (5, 1)]:
        dm, di = check_onnx(model, path, num_prompts=p, num_points=k)
        assert dm < 1e-4 and di < 1e-4


def test_export_errors(tiny_ckpt, tmp_path):
    root, _ = tiny_ckpt
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run(compose_export([f"checkpoint={tmp_path / 'x.pt'}", f"out={tmp_path / 'y.pt'}"]))
    with pytest.raises(ValueError, match="format"):
        run(compose_export([f"checkpoint={root / 'best.pt'}", "format=tflite", f"out={tmp_path / 'y'}"]))
    with pytest.raises(ValueError, match="out="):
        run(compose_export([f"checkpoint={root / 'best.pt'}"]))


def test_mobile_sam_export_loads_in_official_code(tmp_path, coffee):
    mobile_sam = pytest.importorskip("mobile_sam")
    torch.manual_seed(1)
    sd = perturbed_official_state_dict(mobile_sam.build_sam_vit_t(), seed=1)
    ours = build_mobilesam(1024).eval()
    load_official_state_dict(ours, sd, "test weights")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"model": sd, "optimizer": {}}, ckpt)  # a training checkpoint as input
    out = tmp_path / "mobile_sam_export.pt"
    run(compose_export([f"checkpoint={ckpt}", "format=mobile_sam", f"out={out}"]))
    ref = mobile_sam.build_sam_vit_t(checkpoint=str(out)).eval()  # strict load
    pred = mobile_sam.SamPredictor(ref)
    pred.set_image(coffee)
    with torch.no_grad():
        emb = ours.encode(ours.preprocess([coffee]))
        assert ((pred.features - emb).abs().max() / emb.abs().max()).item() < 1e-4
        pts = torch.tensor([[100.0, 200.0], [600.0, 300.0], [900.0, 50.0]])
        _, iou, low = pred.predict_torch(pts[:, None], torch.ones(3, 1, dtype=torch.long), return_logits=True)
        out_ours = ours.predict_grid(emb, pts[None])
    assert ((out_ours.masks[0] - low).abs().max() / low.abs().max()).item() < 1e-4
    assert (out_ours.iou_pred[0] - iou).abs().max().item() < 1e-4


@pytest.mark.parametrize("multimask", [True, False])
def test_single_mask_export_warns_about_the_official_amg(tiny_ckpt, tmp_path, capsys, multimask):
    root, _ = tiny_ckpt
    out = tmp_path / "exported.pt"
    run(compose_export([f"checkpoint={root / 'best.pt'}", "format=mobile_sam", f"out={out}",
                        "model.image_size=128", f"model.multimask_output={str(multimask).lower()}"]))
    err = capsys.readouterr().err
    assert ("SamAutomaticMaskGenerator" in err) is (not multimask)
    # the description beside the export keeps the setting, so our segment / evaluate decode token 0
    from mobilesam_se.models.checkpoint import description_path

    assert f"multimask_output: {str(multimask).lower()}" in description_path(out).read_text()
