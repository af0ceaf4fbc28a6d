"""The engine's table and calls on PyTorch: a tensor written in place by index assignment, gathered
with `index_select`; the forward runs eagerly (no compilation, so nothing to retrace)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from model.backends import Devices

NAME = "torch"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where Keras' torch backend computes


def version() -> str:
    return f"PyTorch {torch.__version__}"


def devices() -> Devices:
    if not torch.cuda.is_available():
        return Devices(("CPU",), False)
    free, _ = torch.cuda.mem_get_info()
    names = tuple(f"GPU:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
    return Devices(names, True, int(free))


def configure_threads(cores: int) -> None:
    torch.set_num_threads(cores)


def constants(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(array, device=_device()).to(_DTYPES[dtype]) for name, array in arrays.items()}


class Table:
    """See `model.backends.tensorflow.Table` for the contract."""

    def __init__(
        self,
        capacity: int,
        width: int,
        dtype: str,
        kernels: Mapping,
        forward: Callable,
        input_size: int,
        jit_compile: bool = False,
    ):
        self.device, self.dtype = _device(), _DTYPES[dtype]
        self.rows = torch.empty((capacity, width), dtype=self.dtype, device=self.device)  # pages untouched
        self._kernels, self._forward = kernels, forward

    def _call(self, images: np.ndarray, rows: torch.Tensor, single: bool) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            return self._forward(self._kernels, rows, x, single).cpu().numpy()

    def mixed(self, images: np.ndarray, slots: np.ndarray) -> np.ndarray:
        index = torch.from_numpy(np.asarray(slots, np.int64)).to(self.device)
        return self._call(images, self.rows.index_select(0, index), False)

    def single(self, images: np.ndarray, slot: int) -> np.ndarray:
        return self._call(images, self.rows[int(slot)], True)

    def write(self, slots: np.ndarray, rows: np.ndarray) -> None:
        index = torch.from_numpy(np.asarray(slots, np.int64)).to(self.device)
        with torch.no_grad():
            self.rows.index_copy_(0, index, torch.from_numpy(np.ascontiguousarray(rows)).to(self.device, self.dtype))

    def read(self, slots: np.ndarray) -> np.ndarray:
        index = torch.from_numpy(np.asarray(slots, np.int64)).to(self.device)
        return self.rows.index_select(0, index).float().cpu().numpy()

    def tracing_count(self) -> int:
        return 0

    def warm_up(self, batch_sizes: Sequence[int], input_size: int) -> None:
        for n in batch_sizes:
            x = np.zeros((n, input_size, input_size, 3), np.float32)
            self.single(x, 0)
            self.mixed(x, np.zeros((n,), np.int64))
