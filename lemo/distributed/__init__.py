"""LeMo beyond one GPU, on torch.distributed's own engines.

- `data_parallel`: DDP or FSDP2 (`fully_shard` per decoder layer, then the root) around a LeMo + PEFT
  LoRA model; selection is per sequence, so data parallelism needs no LeMo-specific communication.
- `adapter_io`: adapter-only checkpoints (rank 0 writes PEFT's adapter files) and loading them back.
- `sequence`: Ulysses sequence parallelism for LeMo layers (Llama family, batch 1).
- `bench`: `lemo dist-bench`, the torchrun entry point that measures a multi-GPU point.
"""
