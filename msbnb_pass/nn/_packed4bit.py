"""What the 4-bit cells (Linear4bit, Embedding4bit) share: a 2-D weight stored as packed 4-bit codes with
bitsandbytes' blockwise statistics, held as parameters named after bitsandbytes' state-dict keys."""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor

from ..errors import CheckpointError, CheckpointKeyError
from ..formats.quant_state import QuantState, to_numpy
from ._base import check_finite_stats


def read_packed_4bit(state_dict: dict, prefix: str, owner: str, layout: str) -> tuple[QuantState, np.ndarray]:
    """(QuantState, packed uint8 codes) of the 2-D 4-bit weight ``<prefix>weight`` in a bitsandbytes state
    dict; ``owner`` (the cell class) and ``layout`` (e.g. "[out, in]") name what is being built."""
    qs = QuantState.from_state_dict(f"{prefix}weight", state_dict)
    key = f"{prefix}weight"
    if key not in state_dict:
        raise CheckpointKeyError(f"state dict lacks '{key}' (the packed 4-bit weight) needed by {owner}")
    if len(qs.shape) != 2:
        raise CheckpointError(f"'{key}': a {owner} weight must be 2-D {layout}, the quant state says {qs.shape}")
    raw = np.ascontiguousarray(to_numpy(state_dict[key]))
    n = qs.numel
    if raw.nbytes != (n + 1) // 2:
        raise CheckpointError(
            f"'{key}' must hold {(n + 1) // 2} bytes of packed 4-bit codes for shape {list(qs.shape)}, "
            f"got {raw.dtype} of shape {list(raw.shape)} ({raw.nbytes} bytes)"
        )
    return qs, raw.reshape(-1).view(np.uint8)


class Packed4bitWeight:
    """Mixin: ``weight`` (uint8 ``[(n+1)//2, 1]``), ``weight_absmax``, ``weight_quant_map`` and, when
    present, the double-quantization state and the asymmetric block offsets, for a weight of shape
    ``self._weight_shape`` quantized as ``self.quant_type`` / ``self.blocksize``. Absent statistics are
    one-element constants, not parameters (nothing to store)."""

    layer_name: str
    quant_type: str
    blocksize: int
    _weight_shape: tuple[int, int]

    def _param(self, value: np.ndarray, attr: str, requires_grad: bool = False) -> Parameter:
        return Parameter(Tensor(np.ascontiguousarray(value)), name=attr, requires_grad=requires_grad)

    def _load_quantized(self, packed: np.ndarray, qs: QuantState) -> None:
        owner = self.layer_name
        shape = tuple(self._weight_shape)
        n = int(np.prod(shape))
        if tuple(qs.shape) != shape:
            raise ValueError(f"{owner}: quant_state.shape {tuple(qs.shape)} != {shape}")
        if packed.dtype != np.uint8 or packed.size != (n + 1) // 2:
            raise ValueError(
                f"{owner}: packed weight must be uint8 with {(n + 1) // 2} bytes, got {packed.dtype} {packed.size}"
            )
        if qs.quant_type != self.quant_type or qs.blocksize != self.blocksize:
            raise ValueError(
                f"{owner}: quant_state is {qs.quant_type}/blocksize {qs.blocksize}, the layer {self.quant_type}/{self.blocksize}"
            )
        check_finite_stats(
            owner,
            absmax=qs.absmax if not qs.nested else None,
            nested_absmax=qs.state2.absmax if qs.nested else None,
            offset=None if qs.offset is None else np.asarray([qs.offset], np.float32),
            block_offset=qs.block_offset,
        )
        self.quant_state = qs
        self.compress_statistics = qs.nested
        self.symmetric = qs.symmetric
        one = np.zeros(1, np.float32)
        self.weight = self._param(packed.reshape(-1, 1), "weight")
        self.weight_absmax = self._param(qs.absmax, "weight_absmax")
        self.weight_quant_map = self._param(qs.code.astype(np.float32), "weight_quant_map")
        if qs.nested:
            self.weight_nested_absmax = self._param(qs.state2.absmax.astype(np.float32), "weight_nested_absmax")
            self.weight_nested_quant_map = self._param(qs.state2.code.astype(np.float32), "weight_nested_quant_map")
            self.weight_nested_offset = self._param(np.array([qs.offset], np.float32), "weight_nested_offset")
        else:  # constants, not parameters: nothing to store
            self.weight_nested_absmax = Tensor(one)
            self.weight_nested_quant_map = Tensor(one)
            self.weight_nested_offset = Tensor(one)
        if qs.block_offset is not None:
            self.weight_block_offset = self._param(qs.block_offset.astype(np.float32), "weight_block_offset")
        else:
            self.weight_block_offset = Tensor(one)

    def current_quant_state(self) -> QuantState:
        """The QuantState of the parameters as they are now (after any checkpoint load)."""
        qs = self.quant_state
        state2 = None
        if qs.nested:
            state2 = QuantState(
                quant_type="dynamic",
                blocksize=qs.state2.blocksize,
                dtype="float32",
                shape=qs.state2.shape,
                absmax=self.weight_nested_absmax.asnumpy().copy(),
                code=self.weight_nested_quant_map.asnumpy().copy(),
            )
        return QuantState(
            quant_type=qs.quant_type,
            blocksize=qs.blocksize,
            dtype=qs.dtype,
            shape=qs.shape,
            absmax=self.weight_absmax.asnumpy().copy(),
            code=self.weight_quant_map.asnumpy().copy(),
            state2=state2,
            offset=np.float32(self.weight_nested_offset.asnumpy()[0]) if qs.nested else None,
            block_offset=self.weight_block_offset.asnumpy().copy() if qs.block_offset is not None else None,
        )

    def _weight_state_dict(self, prefix: str) -> dict[str, np.ndarray]:
        """``<prefix>weight`` and its quant state under bitsandbytes' keys."""
        sd = {f"{prefix}weight": self.weight.asnumpy().copy()}
        sd.update(self.current_quant_state().to_state_dict(f"{prefix}weight"))
        return sd
