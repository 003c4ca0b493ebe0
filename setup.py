"""Build script: the Python packages plus the optional C++ selection extension `fastsel._C`.

The extension is built with torch's cpp_extension; when no
compiler is available the build is skipped and fastsel falls back to its pure-torch selection ops at run time.
"""

from setuptools import find_packages, setup

# the shipped data folder is a package of its own (data files only), so setuptools installs it without warning
packages = [*find_packages(include=["fastsel", "fastsel.*"]), "fastsel.experiments.data.files"]

ext_modules = []
cmdclass = {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("fastsel._C", ["csrc/select.cpp"], extra_compile_args=["-O3", "-ffp-contract=off"])]
    cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}
except ImportError:  # torch missing at build time: pure-python install, JIT/fallback at run time
    pass

setup(
    packages=packages,
    package_data={"fastsel.experiments.data.files": ["*.jsonl", "*.md"], "fastsel": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
