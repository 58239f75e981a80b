"""numpy's own BLAS held to one thread where auto_k runs (lvspec_vllm/_blas.py)."""

import torch  # noqa: F401  (its thread pools loaded, as in the engine's process)
from threadpoolctl import ThreadpoolController, threadpool_info

from lvspec_vllm._blas import numpy_blas_single_threaded


def test_only_numpys_own_blas_is_held_to_one_thread():
    before = {info["filepath"]: info["num_threads"] for info in threadpool_info()}
    controller = ThreadpoolController()
    try:
        limited = numpy_blas_single_threaded()
        after = {info["filepath"]: info["num_threads"] for info in threadpool_info()}
        numpys = [path for path in after if "/numpy" in path.replace("\\", "/")]
        assert numpys and all(after[path] == 1 for path in numpys)
        assert sorted(limited) == sorted(p.rsplit("/", 1)[-1] for p in numpys)
        # torch's pools (OpenMP, its BLAS) keep their threads
        assert all(after[path] == before[path] for path in after if path not in numpys)
    finally:
        for lib in controller.lib_controllers:  # as it was, for the tests after this one
            lib.set_num_threads(before[lib.filepath])
