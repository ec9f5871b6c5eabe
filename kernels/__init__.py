"""quantsink's compute kernels (installed as ``quantsink.kernels``): Triton kernels for CUDA and
C++ kernels for the CPU, each with a plain torch reference that is its spec.

Nothing here is imported by ``import quantsink``; Triton modules import triton lazily, when a
launcher first runs, and the C++ extension compiles on first use (:mod:`.cpu_ext`).
"""
if __name__ != "quantsink.kernels":  # found as a top-level `kernels` from the repo root
    import os
    import runpy  # by path: importing the quantsink package here would import it for a third party

    runpy.run_path(os.path.join(os.path.dirname(__file__), os.pardir, "quantsink", "_toplevel.py"))[
        "step_aside"](__name__, __file__)
