"""torch.distributed training (DDP, FSDP2) applied to the trainers from outside the model.

config: `DistributedConfig`; launch: torchrun start-up (`init`, `launch`); parallel: `wrap`,
`call`, the rank-aware helpers and the per-rank shard of a global step.
"""
