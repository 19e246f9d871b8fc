"""Builds the optional C kernel (bridge/_kernels.c); everything else is declared in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the numpy backend
falls back to NumPy's own take (see bridge/backends/numpy.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bridge._kernels",
            ["bridge/_kernels.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
