# Hooks the cffi extension build into setuptools, and ships the llama.cpp patches inside the package; metadata
# lives in pyproject.toml.
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# One source of the patches: native/llama_patches (tools/build/build_llama.sh reads them there). A wheel carries a
# copy at qrealign_gguf/llama_patches, where `qrealign-gguf package` finds them in an installed (non-editable) package.
PATCHES = Path(__file__).resolve().parent / "native" / "llama_patches"


class build_py_with_patches(build_py):  # noqa: N801 - setuptools command naming
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads native/llama_patches from the checkout itself
            return
        dst = Path(self.build_lib) / "qrealign_gguf" / "llama_patches"
        self.mkpath(str(dst))
        for p in sorted(PATCHES.glob("*.patch")):
            self.copy_file(str(p), str(dst / p.name))


setup(cffi_modules=["native/build_ffi.py:ffibuilder"], cmdclass={"build_py": build_py_with_patches})
