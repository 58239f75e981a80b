"""numpy's own BLAS held to one thread in the process where ``auto_k`` runs.

numpy's wheels bring their own OpenBLAS, with a thread per core, beside the model's threads
(torch's OpenMP pool and its BLAS). ``auto_k``'s linear algebra is tiny (a 13 x 13 solve per
grid point, products over a few thousand samples) and gains nothing from threads, while
numpy's BLAS threads compete for the cores the model's forward runs on: on a 2-core CPU, at
one request, an ``auto_k`` engine's steady k = 0 steps took 1.07-1.18x those of an engine
without it, and 1.01-1.05x with numpy's BLAS held to one thread here (but in the first round
of a run: 1.16-1.18x; docs/benchmarks.md, s35).
Only the BLAS libraries loaded from numpy's own folder are limited, never torch's.
"""

from __future__ import annotations

from pathlib import Path

from lvspec_vllm._logging import get_logger

logger = get_logger(__name__)


def numpy_blas_single_threaded() -> list[str]:
    """Set every BLAS library that numpy loaded from its own wheel to one thread; returns
    their file names (empty if none was found, or threadpoolctl is missing)."""
    try:
        import numpy as np
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a dependency of the package; without it nothing is limited
        logger.warning("LVSpec auto k: threadpoolctl is not installed; numpy's BLAS keeps "
                       "its threads beside the model's")
        return []
    home = Path(np.__file__).resolve().parent.parent
    limited = []
    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        path = Path(lib.filepath).resolve()
        if path.parent.name.startswith("numpy") and path.parent.parent == home:
            if lib.num_threads != 1:
                lib.set_num_threads(1)
            limited.append(path.name)
    return limited
