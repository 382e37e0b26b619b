r"""Runnable examples: ``torchrun --nproc_per_node=2 -m torchconstrain.examples.train_ddp``."""
