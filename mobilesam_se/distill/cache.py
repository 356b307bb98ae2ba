"""Pre-compute the teacher embedding cache of a dataset (see `embedding_cache`).

    python -m mobilesam_se.distill.cache distillation=seed distillation.cache_dir=/scratch/emb [overrides]
    python -m mobilesam_se.distill.cache --splits train,val distillation=seed distillation.cache_dir=...

The overrides are run.py's; the dataset, model.image_size and teachers they select are the ones
cached. Entries already present under the same key are skipped.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger(__name__)


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mobilesam_se.setup import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def precompute(cfg, splits: Sequence[str] = ("train",), progress: bool = True) -> Dict[str, int]:
    """Fill `cfg.distillation.cache_dir` for every teacher and image of the given splits."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from mobilesam_se.data.sample import collate_samples
    from mobilesam_se.distill import build_distiller
    from mobilesam_se.engine.trainer import resolve_device
    from mobilesam_se.setup import build_datasets

    if not cfg.distillation.get("cache_dir"):
        raise ValueError("set distillation.cache_dir=<folder> to pre-compute the teacher cache")
    distiller = build_distiller(cfg, model_image_size=cfg.model.image_size)
    device = resolve_device(cfg.trainer.device)
    train_set, val_set = build_datasets(cfg)
    sets = {"train": train_set, "val": val_set}
    counts = {"images": 0, "computed": 0}
    for split in splits:
        ds = sets.get(split)
        if ds is None:
            continue
        loader = DataLoader(ds, batch_size=cfg.dataset.batch_size, shuffle=False, collate_fn=collate_samples,
                            num_workers=cfg.dataset.num_workers)
        for batch in tqdm(loader, desc=f"teacher cache ({split})", disable=not progress):
            counts["computed"] += distiller.fill_cache(batch, device)
            counts["images"] += len(batch["file_name"])
    return counts


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", default="train", help="comma-separated: train, val or train,val")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = _compose(args.overrides)
    splits = [s for s in args.splits.split(",") if s]
    bad = set(splits) - {"train", "val"}
    if bad:
        parser.error(f"--splits takes train and/or val, got {sorted(bad)}")
    counts = precompute(cfg, splits)
    log.info("teacher cache %s: %d images, %d teacher embeddings computed (the rest were cached)",
             cfg.distillation.cache_dir, counts["images"], counts["computed"])


if __name__ == "__main__":
    main(sys.argv[1:])
