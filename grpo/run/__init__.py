"""The machinery of a training run, beside the algorithm in ``grpo/``.

| file                    | what it holds |
|-------------------------|---------------|
| ``stream.py``           | each rank's sample order (``SampleStream``), decoded batches, the data checks before a run |
| ``distributed.py``      | ranks under torchrun: DDP or FSDP2, gathering a sharded policy, metrics and states across ranks |
| ``checkpoint.py``       | checkpoints of one process or DDP: atomic save, resume, pruning, logs trimmed on resume |
| ``sharded_checkpoint.py`` | FSDP checkpoints, every rank its shards; ``consolidate_weights`` into a Hugging Face folder |
| ``resume.py``           | resuming on any number of processes and either strategy (resharded by DCP) |
| ``memory_plan.py``      | bytes per rank of every state and phase of a step, before any GPU is touched |

The commands over it keep their paths: ``python -m grpo.memory``, ``python -m grpo.export``.
"""
