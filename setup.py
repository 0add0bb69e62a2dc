"""Build entry: the cpu backend's C++ kernels (csrc/) as the private module portinfer._cpu."""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

sources = sorted(glob.glob("csrc/*.cpp"))
# no -march=native: the module must run on any x86-64 / aarch64; kernels_<isa>.cpp compile their
# vector paths with GCC target pragmas and bindings.cpp picks one at run time
ext_modules = [
    Pybind11Extension("portinfer._cpu", sources, cxx_std=17, extra_compile_args=["-O3"],
                      depends=sorted(glob.glob("csrc/*.h"))),
] if sources else []

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
