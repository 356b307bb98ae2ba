"""Break the default training step into parts (wall time at this process's threads).

    OMP_NUM_THREADS=2 N=30 python experiments/learning/round7/prof.py [overrides...]
"""
import collections
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from mobilesam_se.assembly import build_run, register_resolvers
import mobilesam_se.objective as objmod
from mobilesam_se.data.sample import collate_samples

T = collections.defaultdict(float)
def timed(name, fn):
    def w(*a, **k):
        t = time.perf_counter(); r = fn(*a, **k); T[name] += time.perf_counter() - t; return r
    return w

REPO = Path(__file__).resolve().parents[3]
register_resolvers()
overrides = ["logger=none", "trainer.progress=false", "hydra.run.dir=/tmp/prof_run"] + sys.argv[1:]
with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
    cfg = compose("config", overrides=overrides)
trainer, cleanup = build_run(cfg, out_dir=Path("/tmp/prof_run"))
model = trainer.objective.model
model.image_encoder.forward = timed("encoder", model.image_encoder.forward)
model.mask_decoder.forward = timed("decoder", model.mask_decoder.forward)
crit = trainer.objective.criterion
crit.batch_forward = timed("loss", crit.batch_forward)
objmod.select_balanced_prompts = timed("balanced", objmod.select_balanced_prompts)
objmod.point_groups = timed("groups", objmod.point_groups)
from mobilesam_se.engine.freeze import freeze_batchnorm_stats
trainer.objective.train()
freeze_batchnorm_stats(model)  # as the default run trains (statistics fixed)
ds = trainer.train_set
ds.set_epoch(0)
N = int(os.environ.get("N", 40))
for i in range(N + 5):
    if i == 5: T.clear(); t0 = time.perf_counter()
    t = time.perf_counter(); batch = collate_samples([ds[i % len(ds)]]); T["data"] += time.perf_counter() - t
    t = time.perf_counter(); losses = trainer._micro_step(batch, i); T["fwd_total"] += time.perf_counter() - t
    t = time.perf_counter(); losses["loss"].backward(); T["backward"] += time.perf_counter() - t
    t = time.perf_counter(); trainer._optimizer_step(); T["opt"] += time.perf_counter() - t
tot = time.perf_counter() - t0
print(f"threads={torch.get_num_threads()} step={tot/N*1000:.1f} ms")
for k, v in T.items(): print(f"  {k:10s} {v/N*1000:7.1f} ms  {v/tot:5.1%}")
cleanup()
