"""The CPU backend: XLA:CPU's fastest forms of the zoo's layers (`ops.CpuOps`), oneDNN's kernels
(`native`, `onednn`), and the allocator set-up for CPU runs (`hostmem`).

Everything CPU-specific in jaxvision lives here; nothing outside imports it except
`jaxvision.backends`, which picks `CpuOps` for computations compiled for CPU when the `cpu` extra
(`pip install 'jaxvision[cpu]'`) is installed. The modules load on demand, so `hostmem` can run
before jax is imported.
"""
