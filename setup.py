"""lvspec-vllm: LVSpec loosely speculative decoding for video LLMs, as a vLLM plugin."""

from setuptools import find_packages, setup

# The vLLM releases whose internals the patches in lvspec_vllm/patches/ were checked against.
# lvspec_vllm.register() refuses any other version at startup; keep the two in step.
SUPPORTED_VLLM = ">=0.32,<0.34"

setup(
    name="lvspec-vllm",
    version="0.1.0",
    description="LVSpec: training-free loosely speculative decoding for video LLMs, as a vLLM plugin",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and configs/ sit at the top of the repository but install as lvspec_vllm.kernels
    # and lvspec_vllm.configs, so they never clash with another distribution's top-level names.
    packages=find_packages(include=["lvspec_vllm", "lvspec_vllm.*"])
    + ["lvspec_vllm.kernels", "lvspec_vllm.configs"],
    package_dir={"lvspec_vllm.kernels": "kernels", "lvspec_vllm.configs": "configs"},
    package_data={"lvspec_vllm.configs": ["*.json"],
                  "lvspec_vllm.world": ["checkpoints/README.md", "checkpoints/*/*"]},
    install_requires=[f"vllm{SUPPORTED_VLLM}", "threadpoolctl>=3.1"],
    extras_require={"test": ["pytest>=8", "openai>=1.40", "requests"], "bench": ["matplotlib>=3.8"]},
    entry_points={
        "vllm.general_plugins": ["lvspec = lvspec_vllm:register"],
        "console_scripts": [
            "lvspec-tiny-models = lvspec_vllm.testing.tiny_models:main",
            "lvspec-preset = lvspec_vllm.config:preset_main",
            "lvspec-demo = lvspec_vllm.demo:main",
            "lvspec-bench-verify = lvspec_vllm.bench.verify_step:main",
            "lvspec-bench = lvspec_vllm.bench.cli:main",
            "lvspec-train-world = lvspec_vllm.world.train:main",
            "lvspec-world-eval = lvspec_vllm.world.evaluate:main",
        ],
    },
)
