"""Why the stock AMG rejects the best masks: for every val object, the AMG mask with the highest true IoU.

    python experiments/learning/best_masks.py <best.pt> [more checkpoints...]

Runs the AMG with every filter open (as stability.py) on the synthetic val split of the default config,
pairs each ground-truth object with its best mask by true IoU (full resolution), and prints by object
size the share whose best mask passes IoU 0.88 with that mask's predicted IoU and stability score, then
the best masks above IoU 0.85. The stock AMG keeps a mask only when predicted IoU > 0.88 and
stability >= 0.95.
"""
import sys

import numpy as np
import torch

from mobilesam_se.assembly import register_resolvers
from stability import open_amg  # this folder (the script's own directory is on sys.path)

SIZES = ((0, 1024), (1024, 4096), (4096, 1e9))  # COCO small / medium / large, in pixels


def main(checkpoints) -> None:
    register_resolvers()
    for ckpt in checkpoints:
        gen, ds = open_amg(ckpt)
        rows = []
        for i in range(len(ds)):
            s = ds[i]
            with torch.no_grad():
                recs = gen.generate(s.image_uint8)
            M = np.stack([r["segmentation"] for r in recs]).reshape(len(recs), -1).astype(np.float32)
            G = s.masks.numpy().reshape(s.masks.shape[0], -1).astype(np.float32)
            inter = G @ M.T
            iou = inter / (G.sum(1)[:, None] + M.sum(1)[None] - inter + 1e-9)
            pred = np.array([r["predicted_iou"] for r in recs])
            stab = np.array([r["stability_score"] for r in recs])
            for k in range(G.shape[0]):
                j = iou[k].argmax()
                rows.append((G[k].sum(), iou[k, j], pred[j], stab[j]))
        a = np.array(rows)
        print(ckpt, len(a), "objects")
        for lo, hi in SIZES:
            sel = (a[:, 0] >= lo) & (a[:, 0] < hi)
            b = a[sel]
            print(f" area [{lo},{hi}): n={sel.sum()} best IoU mean {b[:,1].mean():.3f} >0.88: {(b[:,1]>0.88).mean():.2%}; "
                  f"its pred mean {b[:,2].mean():.3f}, stab mean {b[:,3].mean():.3f} max {b[:,3].max():.3f}")
        g = a[a[:, 1] > 0.85]
        for r in g[np.argsort(-g[:, 1])][:12]:
            print(f"   area {int(r[0])} IoU {r[1]:.3f} pred {r[2]:.3f} stab {r[3]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
