"""Speculative-config presets (JSON), installed with the package as lvspec_vllm.configs."""
