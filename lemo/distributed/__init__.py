"""LeMo beyond one GPU, on torch.distributed's own engines (launch with torchrun).

- `data_parallel`: DDP or FSDP2 (`fully_shard` per decoder layer, then the root) around a LeMo + PEFT
  LoRA model, checkpointing before wrapping, initial weights broadcast from rank 0.
- `adapter_io`: adapter-only checkpoints (rank 0 writes PEFT's adapter files) and loading them back.
- `channel`: channel-mode MLP ranking over every rank's tokens (DP and SP equal one process).
- `sequence` (+ `sp_scoring`, `ulysses`): Ulysses sequence parallelism for LeMo layers (Llama family,
  batch 1): exact scores split over query blocks, one selection, kept-token attention per head group.
- `points`, `bench`, `report`, `cli`: multi-GPU sweep points, `lemo dist-bench` under torchrun,
  `lemo dist-report`.
"""
