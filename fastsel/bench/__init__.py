"""Benchmarks: `fastsel bench` (the norm pass against a plain step, the naive loop, torch.func and Opacus, and the
training overheads) and `fastsel bench-kernels` (per-layer Triton kernels against torch).

Top layer, beside `fastsel.experiments`: `suite` (plans and cases), `baselines` (the methods compared),
`timing` (one timing and memory harness), `output` (JSON reports and Markdown tables), `kernel_bench`.
Extra: `pip install 'fastsel[bench]'` (Opacus is optional and installed by hand, see benchmarks/README.md).
"""
