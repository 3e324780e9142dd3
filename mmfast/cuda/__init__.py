"""The CUDA C++ path: kernels written in csrc/, bound as ``torch.ops.mmfast_cuda.*``.

``build`` compiles and loads them lazily, on the first call that runs a ``cuda`` backend;
the other modules are their launchers, one per op family, with the contract of the
matching Triton launchers in mmfast.kernels. Importing this package compiles nothing.
"""
