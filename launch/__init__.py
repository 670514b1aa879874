"""ltsam-launch: one YAML recipe -> the exact commands for a local, torchrun, DeepSpeed or SLURM run.

The launcher only builds and runs command lines, so it imports neither torch nor the ltsam plugin: it can
validate and print a 16-GPU job on a laptop.
"""
