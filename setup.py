"""Build the C++ extension ``prunepeft._C`` (plain C++17 + pybind11, not linked against libtorch).

Metadata lives in pyproject.toml; this file only declares the extension.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "prunepeft._C",
        sources=["csrc/bank.cpp", "csrc/bindings.cpp"],
        include_dirs=["csrc"],
        depends=["csrc/bank.hpp", "csrc/thread_pool.hpp"],
        cxx_std=17,
        extra_compile_args=["-O3", "-Wall", "-Wextra", "-ffp-contract=off"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
