"""Benchmarks of mobilesam_se against the official MobileSAM decoder (run: python -m benchmarks.run_all)."""
