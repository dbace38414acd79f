"""Tensor parallelism without Lightning: process groups (mesh), the collectives as autograd
functions (comm), tensor layouts (sharding), the parallel layers, the vocab-parallel loss, the
model-parallel RNG and sequence parallelism's pieces. Nothing here imports ``lightning``."""
