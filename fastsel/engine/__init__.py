"""The engine: one batched forward+backward gives every example's loss, exact gradient norm and gradient dots.

Layer 1 (torch only; the Triton kernels of `fastsel.kernels` when present). Data flow:
`batch` (checks, padded or packed) -> `model_io` (the model call) -> `losses` (per-example L_i) ->
`capture` (per-call input and output-gradient hooks on the `targets`) -> `accumulate` (per-parameter exact
squared norms, from `linear_math` or the kernels) -> `norms` (the norm pass and its backends).
"""
