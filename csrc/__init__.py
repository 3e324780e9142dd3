"""CUDA C++ sources of mmfast, shipped as package data (``mmfast.csrc``).

Nothing here is Python: mmfast.cuda.build compiles these files on first use on a machine
with CUDA and a compiler. Importing this package loads nothing.
"""
