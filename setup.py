from setuptools import find_packages, setup

setup(
    name="megamoe",
    version="0.1.0",
    description="Multimodal Mixture-of-Experts pretraining on Megatron-Core",
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    # copied into exported Hugging Face folders as remote code (megamoe.checkpoint.hf_megamoe)
    package_data={"megamoe.checkpoint.hf_remote": ["configuration_megamoe.py",
                                                   "modeling_megamoe.py",
                                                   "routers_megamoe.py",
                                                   "mor_megamoe.py",
                                                   "configuration_megamoe_vit.py",
                                                   "modeling_megamoe_vit.py",
                                                   "configuration_megamoe_vlm.py",
                                                   "modeling_megamoe_vlm.py"],
                  # copied into exported diffusers pipeline folders (diffusers_export)
                  "megamoe.checkpoint.diffusers_remote": ["modeling_megamoe_dit.py",
                                                          "pipeline_megamoe_dit.py"],
                  # the recipes, `megamoe train --config <name>`, and the fragments they list
                  # under `defaults:` (configs/models, data, parallel, train): megamoe/recipes
                  # is a symlink to configs/, whose files the wheel and sdist copy
                  "megamoe": ["recipes/*.yaml", "recipes/*/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # GPU users bring their own CUDA build; 2.13.0 (CPU) satisfies this range.
        "torch>=2.6,<2.15",
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "matplotlib",      # plots: `megamoe eval`'s expert-usage heat map (vlm)
        "Pillow",          # the shapes image set (megamoe.data.shapes)
        "psutil",
        "pyyaml",
        "sentencepiece",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # train.engine=deepspeed (ZeRO 1/2); megamoe.platform.deepspeed_bridge is pinned to 0.19
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "mpi": ["mpi4py"],
        # the releases tests/unit/test_hf_transformers_range.py checks (floor and newest)
        "hf": ["transformers>=5.18,<5.25", "safetensors"],
        # the dit family: diffusers' noise schedulers and samplers (schedulers only; the export
        # writes a diffusers pipeline folder), torchmetrics' KID/FID on custom features
        "diffusion": ["diffusers>=0.42,<0.43", "torchmetrics>=1.9,<2"],
        # data.kind energon and tools/preprocess_data.py --kind image-text (WebDataset shards)
        "data": ["megatron-energon>=7.4,<7.5", "webdataset"],
        "test": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["megamoe=megamoe.cli:main"]},
)
