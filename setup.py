"""Packaging glue: ship the C++ sources of ``csrc/`` inside ``caad_kernels`` for non-editable installs.

The C++ kernels are compiled just in time (``torch.utils.cpp_extension.load`` with ninja) on first
use, so nothing is compiled here; the sources only need to travel with the package.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCSrc(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "caad_kernels" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in Path(__file__).parent.joinpath("csrc").glob("*.[ch]*"):
            shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithCSrc})
