"""Loggers under vLLM's "vllm" namespace, so plugin messages use vLLM's handlers and levels."""

from vllm.logger import init_logger


def get_logger(module_name: str):
    return init_logger(f"vllm.plugins.{module_name}")
