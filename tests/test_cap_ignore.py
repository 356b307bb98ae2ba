"""max_masks_per_image must not turn the capped-out objects into background for the loss."""
import numpy as np
import torch

from helpers.losses import everything_loss
from mobilesam_se.data.folder import FolderDataset
from mobilesam_se.data.folder_writer import write_folder_sample


def test_capped_objects_become_an_ignore_region(tmp_path):
    img = np.full((64, 64, 3), 120, np.uint8)
    big = np.zeros((64, 64), bool); big[:, :40] = True
    small = np.zeros((64, 64), bool); small[48:60, 48:60] = True
    write_folder_sample(tmp_path, "a", img, np.stack([big, small]))
    capped = FolderDataset(tmp_path, image_size=64, grid_points=2, max_masks_per_image=1)[0]
    assert capped.masks.shape[0] == 1 and capped.masks[0].sum() == big.sum()
    ign = capped.ignore_lowres
    assert ign is not None and ign.shape == (16, 16)
    assert ign[12:15, 12:15].all() and not ign[:, :8].any()
    full = FolderDataset(tmp_path, image_size=64, grid_points=2)[0]
    assert full.ignore_lowres is None


def test_loss_ignores_background_candidates_inside_the_ignore_region():
    h = w = 8
    gt = torch.zeros(1, h, w, dtype=torch.bool); gt[0, :, :4] = True
    ignore = torch.zeros(h, w, dtype=torch.bool); ignore[5:, 5:] = True
    logits = torch.full((2, 1, h, w), -5.0)
    logits[0, 0, :, :4] = 5.0  # matches the gt: foreground
    logits[1, 0, 5:, 5:] = 5.0  # segments the capped-out object
    pred_iou = torch.tensor([[0.9], [0.9]], requires_grad=True)
    loss = everything_loss(cls_term="recipe")  # background candidates are negatives
    with_ignore = loss(logits, pred_iou, gt, ignore_lowres=ignore)
    without = loss(logits, pred_iou, gt)
    # without the ignore region the second candidate is background and its confident score is punished
    assert without.terms["cls"] > with_ignore.terms["cls"] + 1.0
    with_ignore.terms["loss"].backward()
    assert pred_iou.grad[1, 0] == 0 and pred_iou.grad[0, 0] != 0


def test_objects_smaller_than_a_lowres_cell_become_ignore_regions(tmp_path):
    """64 px image at image_size 64: low-res cells are 4x4 px. A 2x2-px object owns no cell under the
    >= 0.5 rule; it stays a gt object for evaluation and its cell becomes an ignore region."""
    import numpy as np

    from mobilesam_se.data.folder import FolderDataset
    from mobilesam_se.data.folder_writer import write_folder_sample

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    big = np.zeros((64, 64), bool)
    big[0:32, 0:32] = True
    tiny = np.zeros((64, 64), bool)
    tiny[41:43, 49:51] = True  # inside low-res cell (10, 12), a quarter of it
    write_folder_sample(tmp_path, "a", image, [big, tiny])
    s = FolderDataset(tmp_path, image_size=64, grid_points=2)[0]
    assert s.masks.shape[0] == 2 and s.masks_lowres[1].sum() == 0 and s.masks_lowres[0].sum() == 64
    assert s.ignore_lowres is not None
    assert s.ignore_lowres.nonzero().tolist() == [[10, 12]]
