"""Foundations every layer may use: errors, atomic files, strict JSON, HDF5 writing and checking, validation,
progress, shipped resources, the array backend (NumPy or CuPy) and the CPU runtime settings.

Imports nothing from nfed outside this package. Must not import NumPy on package import: nfed/__init__ runs
cpu_runtime before NumPy loads.
"""
