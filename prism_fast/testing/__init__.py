"""Support code that the project's tests (tests/) and benchmarks (bench/) share: the real model
they run (`smollm2`), Triton's launch path with a no-op GPU (`noop_triton`) and the compile
signatures of the kernels (`kernel_signatures`), their ptxas resource check
(`kernel_resources`) and the model shapes both use (`shapes`).

It lives in the library, not in either folder, because tests/ must stand alone (it never
imports bench/) and a benchmark importing tests/ would be the wrong way round. prism_fast itself
never imports it; like numpy.testing it is importable by anyone who wants the same fixtures.
"""
