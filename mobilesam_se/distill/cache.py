"""Pre-compute the teacher embedding cache of a dataset (see `embedding_cache`).

    python -m mobilesam_se.distill.cache distillation=seed distillation.cache_dir=/scratch/emb [overrides]
    python -m mobilesam_se.distill.cache --splits train,val distillation=seed distillation.cache_dir=...

The overrides are run.py's; the dataset, model.image_size (1024 with the presets) and teachers they
select are the ones cached, so pass the training run's overrides. Entries already present under the
same key are skipped. Training with the same distillation.cache_dir then never loads the teachers'
image encoders.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.errors import ConfigCompositionException, OverrideParseException

from mobilesam_se.errors import UserError, report_user_errors

log = logging.getLogger(__name__)


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mobilesam_se.assembly import register_resolvers

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
    from mobilesam_se.precision import resolve_device
    from mobilesam_se.assembly import build_datasets, resolve_checkpoints

    if not cfg.distillation.get("enabled", False):
        raise UserError("choose a distillation preset whose teachers to cache, e.g. distillation=seed")
    if not cfg.distillation.get("cache_dir"):
        raise UserError("set distillation.cache_dir=<folder> to pre-compute the teacher cache")
    specs = resolve_checkpoints(cfg)
    train_set, val_set = build_datasets(cfg, progress=progress)
    distiller = build_distiller(cfg, model_image_size=cfg.model.image_size, specs=specs)
    device = resolve_device(cfg.trainer.device)
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
            counts["images"] += len(batch)
    for t in distiller.teachers:
        log.info("teacher %r: cache hit rate %.1f%% (%d of %d)", t.name, 100 * t.cache.hit_rate, t.cache.hits,
                 t.cache.hits + t.cache.misses)
    return counts


@report_user_errors(extra=(ConfigCompositionException, OverrideParseException))
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
