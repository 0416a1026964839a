"""kubetrain's trainer: data preparation, FSDP2 training on Ray Train, checkpoints,
evaluation, metrics and export. Runs inside the Ray cluster and, unchanged, on a laptop.

Layout (after torchtitan): `config` (resolved settings), `data/` (preparation, its own
step), `models` (build/load, LoRA), `parallelize` (FSDP2/DDP), `optim`, `loop` (one
worker's training loop), `checkpoint` (DCP, atomic commit), `evaluate`, `metrics`,
`export`, `driver` (Ray Train launcher), `local` (`kubetrain run`).
"""
