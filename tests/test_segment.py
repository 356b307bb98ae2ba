"""Segment everything: AMG pieces against the reference's, the generator on a tiny model, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobilesam_se.inference import EverythingGenerator, crop_boxes, layer_point_grids
from mobilesam_se.inference import rle as rle_utils
from mobilesam_se.inference.amg import near_crop_edge, remove_small_regions, upsample_logits
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import export_official

REPO = Path(__file__).resolve().parents[1]
amg_ref = pytest.importorskip("mobile_sam.utils.amg")


def random_masks(k=6, h=37, w=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(k, 1, h // 4 + 1, w // 4 + 1, generator=g)
    m = F.interpolate(low, (h, w), mode="bilinear")[:, 0] > 0.6
    m[0] = False  # an empty mask
    m[1, 0, 0] = True  # a corner pixel
    return m


# -- pieces ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(400, 600), (640, 481), (17, 33)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes_and_grids_match_reference(hw, layers):
    assert crop_boxes(hw, layers, 512 / 1500) == amg_ref.generate_crop_boxes(hw, layers, 512 / 1500)
    for a, b in zip(layer_point_grids(7, layers, 2), amg_ref.build_all_layer_point_grids(7, layers, 2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("S,input_hw,crop_hw", [(256, (171, 256), (400, 600)), (256, (256, 192), (640, 480)),
                                                (128, (128, 64), (31, 15))])
def test_upsampling_is_bit_identical_to_sams(S, input_hw, crop_hw):
    low = torch.randn(5, S // 4, S // 4)
    ref = F.interpolate(low[:, None], (S, S), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref[..., : input_hw[0], : input_hw[1]], crop_hw, mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(upsample_logits(low, input_hw, crop_hw, S), ref)


def test_boxes_rle_and_edges_match_reference():
    masks = random_masks()
    assert torch.equal(rle_utils.mask_boxes(masks), amg_ref.batched_mask_to_box(masks))
    rles = rle_utils.encode(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    np.testing.assert_array_equal(rle_utils.decode_many(rles), masks.numpy())
    for m, r, u in zip(masks, rles, amg_ref.mask_to_rle_pytorch(masks)):
        assert rle_utils.area(r) == amg_ref.area_from_rle(u)
        assert rle_utils.to_uncompressed(m.numpy()) == u
        assert r == amg_ref.coco_encode_rle(u)
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 30, 30], [0, 0, 49, 30], [2, 25, 40, 40]])
    crop, orig = [10, 20, 60, 70], [0, 0, 60, 200]
    assert torch.equal(near_crop_edge(boxes, crop, orig), amg_ref.is_box_near_crop_edge(boxes, crop, orig))
    # uncrop places a crop's mask in the image
    full = rle_utils.decode(rle_utils.uncrop(rles[2], [3, 4, 56, 41], (50, 70)))
    assert full.shape == (50, 70) and full[4:41, 3:56].sum() == masks[2].sum() == full.sum()


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_small_regions_match_reference(mode):
    for m in random_masks(k=4, h=60, w=60, seed=3).numpy():
        mine, changed = remove_small_regions(m, 30, mode)
        theirs, changed_ref = amg_ref.remove_small_regions(m, 30, mode)
        assert changed == changed_ref
        np.testing.assert_array_equal(mine, theirs)


# -- the generator on a tiny model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_mobilesam(128, size="tiny").eval()


@pytest.fixture(scope="module")
def small_image(coffee):
    return np.ascontiguousarray(coffee[::4, ::4])  # 100 x 150


def test_generator_records(tiny, small_image):
    gen = EverythingGenerator(tiny, points_per_side=4, points_per_batch=5, pred_iou_thresh=0.0,
                              stability_score_thresh=0.0, box_nms_thresh=0.99, crop_n_layers=1,
                              crop_n_points_downscale_factor=2, min_mask_region_area=10)
    recs = gen.generate(small_image)
    assert recs and gen.stats["points_decoded"] == 16 + 4 * 4
    h, w = small_image.shape[:2]
    for r in recs:
        assert set(r) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
        m = rle_utils.decode(r["segmentation"])
        assert m.shape == (h, w) and int(m.sum()) == r["area"]
        if r["area"]:
            ys, xs = np.nonzero(m)
            assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        x0, y0, cw, ch = r["crop_box"]
        assert 0 <= x0 and x0 + cw <= w and 0 <= y0 and y0 + ch <= h
        (px, py), = r["point_coords"]
        assert x0 <= px <= x0 + cw and y0 <= py <= y0 + ch
    binary = EverythingGenerator(tiny, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 output_mode="binary_mask").generate(small_image)
    assert all(r["segmentation"].dtype == bool for r in binary)
    unc = EverythingGenerator(tiny, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              output_mode="uncompressed_rle").generate(small_image)
    for a, b in zip(binary, unc):
        assert sum(b["segmentation"]["counts"][1::2]) == a["segmentation"].sum() == a["area"]


def test_generator_thresholds_and_empty(tiny, small_image):
    assert EverythingGenerator(tiny, points_per_side=3, pred_iou_thresh=1e9).generate(small_image) == []
    gen = EverythingGenerator(tiny, points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=1.0)
    assert all(r["stability_score"] >= 1.0 for r in gen.generate(small_image))
    with pytest.raises(ValueError):
        EverythingGenerator(tiny, output_mode="png")
    with pytest.raises(ValueError):
        EverythingGenerator(tiny, points_per_side=None)
    with pytest.raises(ValueError):
        gen.generate(small_image.astype(np.float32))


def test_hierarchical_decodes_fewer_points(tiny, small_image):
    full = EverythingGenerator(tiny, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    hier = EverythingGenerator(tiny, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                               hierarchical=True)
    a, b = full.generate(small_image), hier.generate(small_image)
    assert hier.stats["points_decoded"] < full.stats["points_decoded"] == 64
    assert hier.stats["points_decoded"] >= 16 and b


# -- CLI ----------------------------------------------------------------------------------------------
def compose_segment(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("segment", overrides=overrides)


TINY_CLI = ["model.size=tiny", "model.image_size=128", "generator.points_per_side=4", "generator.pred_iou_thresh=0",
            "generator.stability_score_thresh=0", "progress=false"]


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, tiny, coffee):
    from PIL import Image

    root = tmp_path_factory.mktemp("segment")
    export_official(tiny, root / "best.pt")
    torch.save({"model": torch.load(root / "best.pt"), "epoch": 3}, root / "last.ckpt")
    (root / "images").mkdir()
    Image.fromarray(coffee[::4, ::4]).save(root / "images" / "cup.jpg")
    Image.fromarray(np.ascontiguousarray(coffee[::5, ::3])).save(root / "images" / "wide.png")
    (root / "images" / "notes.txt").write_text("not an image")
    return root


def check_output(out: Path, stem: str, file_name: str, image_hw):
    data = json.loads((out / f"{stem}.json").read_text())
    assert data["image"] == {"image_id": data["image"]["image_id"], "width": image_hw[1], "height": image_hw[0],
                             "file_name": file_name}
    assert data["annotations"]
    from pycocotools import mask as mask_utils

    for i, a in enumerate(data["annotations"]):
        assert a["id"] == i
        assert set(a) == {"id", "segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords", "crop_box"}
        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        m = mask_utils.decode(rle)
        assert m.shape == tuple(image_hw) and int(m.sum()) == a["area"] == int(mask_utils.area(rle))
    import cv2

    png = cv2.imread(str(out / f"{stem}.png"))
    assert png is not None and png.shape == (*image_hw, 3)


@pytest.mark.parametrize("ckpt", ["best.pt", "last.ckpt"])
def test_cli_folder(cli_inputs, tmp_path, ckpt):
    from mobilesam_se.segment import run

    out = tmp_path / "out"
    cfg = compose_segment([f"checkpoint={cli_inputs / ckpt}", f"input={cli_inputs / 'images'}", f"output={out}"] + TINY_CLI)
    written = run(cfg)
    assert sorted(p.name for p in written) == ["cup.json", "wide.json"]
    check_output(out, "cup", "cup.jpg", (100, 150))
    check_output(out, "wide", "wide.png", (80, 200))


def test_cli_errors(cli_inputs, tmp_path):
    from mobilesam_se.segment import run

    base = [f"output={tmp_path}"] + TINY_CLI
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run(compose_segment(base + [f"checkpoint={tmp_path / 'nope.pt'}", f"input={cli_inputs / 'images'}"]))
    with pytest.raises(FileNotFoundError, match="input not found"):
        run(compose_segment(base + [f"checkpoint={cli_inputs / 'best.pt'}", f"input={tmp_path / 'nothing'}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        run(compose_segment(base + [f"checkpoint={cli_inputs / 'best.pt'}", f"input={tmp_path / 'empty'}"]))
    with pytest.raises(ValueError, match="checkpoint=... is required"):
        run(compose_segment(base + [f"input={cli_inputs / 'images'}"]))


def test_cli_module_relative_paths(cli_inputs, tmp_path):
    """`python -m mobilesam_se.segment` with relative paths, from another directory: no Hydra files."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.jpg").write_bytes((cli_inputs / "images" / "cup.jpg").read_bytes())
    (work / "model.pt").write_bytes((cli_inputs / "best.pt").read_bytes())
    cmd = [sys.executable, "-m", "mobilesam_se.segment", "checkpoint=model.pt", "input=in.jpg", "output=res"] + TINY_CLI
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["in.jpg", "model.pt", "res"]
    assert sorted(p.name for p in (work / "res").iterdir()) == ["in.json", "in.png"]
    bad = subprocess.run(cmd[:3] + ["checkpoint=missing.pt", "input=in.jpg", "output=res"], cwd=work,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "checkpoint not found: missing.pt" in bad.stderr


def test_single_mask_generator_decodes_token_0(tiny, small_image):
    """A model trained with model.multimask_output=false has learnt mask token 0 only: the AMG must
    decode that token (one mask per point), not tokens 1-3 as the reference's AMG always does."""
    open_filters = dict(points_per_side=3, pred_iou_thresh=-1e9, stability_score_thresh=0.0, box_nms_thresh=1.0,
                        output_mode="binary_mask")
    one = EverythingGenerator(tiny, multimask_output=False, **open_filters).generate(small_image)
    three = EverythingGenerator(tiny, **open_filters).generate(small_image)
    assert len(one) == 9 and len(three) == 27  # every mask kept: 1 vs 3 per point
    from mobilesam_se.transforms import apply_coords, preprocess_image

    S = tiny.image_size
    pixels = preprocess_image(small_image, S)
    pts = layer_point_grids(3, 0, 1)[0] * np.array(small_image.shape[1::-1])
    with torch.no_grad():
        emb = tiny.image_encoder(pixels[None])
        coords = torch.as_tensor(apply_coords(pts, small_image.shape[:2], S), dtype=torch.float32)
        token0 = tiny.predict_grid(emb, coords[None], multimask_output=False).iou_pred[0, :, 0]
    np.testing.assert_allclose(sorted(r["predicted_iou"] for r in one), sorted(token0.tolist()), rtol=1e-5, atol=1e-6)
