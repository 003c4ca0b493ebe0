"""Training with selection: `selective_backward` (a drop-in for `loss.backward()`), torch.distributed (DDP), the
minimal loop `train`, atomic checkpoints, the forgetting regularizers (KL, EWC) and the option checks.

Layer 3 (imports selection and engine).
"""
