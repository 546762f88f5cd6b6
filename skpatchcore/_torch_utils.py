"""Torch helpers shared by the engine: devices, NumPy views, thread counts."""

import threading
import warnings
from contextlib import contextmanager

import torch

# torch's thread count is one setting for the whole process: selections
# running at once in several threads (joblib's threading backend, dask
# workers) share one "single thread" period, and the last one out restores
# the count the first one found.
_THREADS_LOCK = threading.Lock()
_single_thread_users = 0
_saved_threads = None


def resolve_device(device):
    """The torch device that ``device`` ("auto", a name or a torch.device) asks for."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a valid torch device: {exc}"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but CUDA is not available.")
    if resolved.type == "meta":
        raise ValueError(
            f"device={device!r} holds no data, so no image can be scored on "
            "it; pass device='auto' or 'cpu'."
        )
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError, ImportError) as exc:
        # Torch is built with every device type it can name, but a device is
        # usable only with its hardware, drivers and torch build.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            available.append("mps")
        raise ValueError(
            f"device={device!r} is not available here ({reason}). Pass "
            f"device='auto' (CUDA when available, else the CPU) or one of "
            f"{available}."
        ) from exc
    return resolved


def as_tensor(array):
    """A CPU tensor sharing ``array``'s memory, also when ``array`` is read-only."""
    # Such tensors are only read, but torch warns on every read-only array,
    # e.g. the bank of a detector loaded with joblib.load(..., mmap_mode="r"),
    # or points that joblib hands to a worker as a read-only memory map.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable"
        )
        return torch.from_numpy(array)


@contextmanager
def one_torch_thread():
    """Run torch on one thread inside, and restore the thread count after."""
    global _single_thread_users, _saved_threads
    with _THREADS_LOCK:
        if _single_thread_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_thread_users += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _single_thread_users -= 1
            if _single_thread_users == 0:
                torch.set_num_threads(_saved_threads)
