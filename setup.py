"""Installs mae_jax: Masked Autoencoders in JAX/Flax."""

import os

import setuptools


def _readme():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8") as f:
    return f.read()


INSTALL_REQUIRES = [
    "jax>=0.7.0,<0.11",
    "flax>=0.11.0,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11.0,<0.13",
    "tensorflow-cpu>=2.18,<2.23; platform_system != 'Darwin'",
    "tensorflow>=2.18,<2.23; platform_system == 'Darwin'",
    "tensorflow-datasets>=4.9.7,<4.10",
    "ml-collections>=1.0.0,<1.2",
    "clu>=0.0.12,<0.1",
    "tensorboard>=2.18,<2.23",
    "importlib_resources>=6.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "absl-py>=2.0",
    "safetensors>=0.4",
    "tqdm>=4.60",
]

EXTRAS_REQUIRE = {
    "tpu": ["jax[tpu]>=0.7.0,<0.11"],
    "gpu": ["jax[cuda12]>=0.7.0,<0.11"],
    "cuda13": ["jax[cuda13]>=0.7.0,<0.11"],
    # Tests; gcsfs and gcp-storage-emulator serve the gs:// workdir tests on 127.0.0.1; wandb's writer is
    # tested offline; matplotlib draws the Fashion-MNIST study's plot (benchmarks/, tested).
    "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.5", "gcsfs>=2024.2", "gcp-storage-emulator>=2024.8",
            "wandb>=0.17", "matplotlib>=3.7"],
    # Optional experiment tracking (config.wandb.enabled=True).
    "wandb": ["wandb>=0.17"],
    # Weight conversion tests against PyTorch / Hugging Face models.
    "torch": ["torch>=2.4", "safetensors>=0.4", "transformers>=4.40"],
}

setuptools.setup(
    name="mae_jax",
    version="0.1.0",
    description="Masked Autoencoders (MAE) in JAX/Flax, TPU-first.",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["mae_jax", "mae_jax.*", "configs", "configs.*", "launch", "launch.*"]),
    python_requires=">=3.11",  # JAX >= 0.7; .ci/setup finds or installs 3.11 where python3 is 3.10.
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "mae-jax=mae_jax.main:run",
            "mae-jax-prepare=mae_jax.data.prepare:run",
            "mae-jax-export=mae_jax.export:run",
            "mae-jax-visualize=mae_jax.visualize:run",
            "mae-jax-aot=mae_jax.aot:run",
            "mae-jax-downstream=mae_jax.downstream:run",
            "mae-jax-demo=mae_jax.demo:run",
            "mae-jax-features=mae_jax.features:run",
        ],
    },
)
