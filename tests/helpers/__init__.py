"""Test helpers (not tests): Hydra composition, the local SLURM cluster and its job functions, the
offline W&B record reader, the script each DDP rank runs. Imported as `helpers.<module>`: pytest puts
tests/ on sys.path (tests/ is not a package)."""
