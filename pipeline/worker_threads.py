"""One compute thread per worker process of the processes runner (its initializer).

N worker processes on N cores each running a library's own thread pool (torch
intra-op, OpenBLAS/MKL, OpenMP, OpenCV) would oversubscribe the cores. This
module imports nothing heavy, so the environment is set before a worker loads
numpy, torch or OpenCV; a variable the user set is kept.
"""

from __future__ import annotations

import os
import sys

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "OPENCV_FOR_THREADS_NUM")


def one_thread_per_worker() -> None:
    """Set the thread-count variables to 1 (unless set) and apply them to torch / OpenCV if already loaded."""
    for key in THREAD_ENV:
        os.environ.setdefault(key, "1")
    n = int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 1
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(n, 1))
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(max(n, 1))
