"""Selection: the rules that turn per-example losses and gradient norms into the kept examples.

Layer 2 (imports the engine only). `rules` holds Algorithm 1 of Bach et al. (Moderate-G) and its variants, the
`Selection` record and `select(batch, model)`; `ops` dispatches the numeric ops to the C++ extension
`fastsel._C` (csrc/), a JIT build of it, or a pure-torch fallback.
"""
