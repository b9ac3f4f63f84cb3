"""The quantized lookup tables: Embedding4bit (EmbeddingNF4 / EmbeddingFP4) and Embedding8bit.

* a lookup equals the numpy oracle's decoding of the same rows bit for bit (``formats.dequantize_4bit_rows``
  of the oracle's own quantization; ``int8_vectorwise_dequant``), for tables whose rows hold whole blocks and
  tables whose blocks straddle rows, odd sizes, double quantization, asymmetric int4, ids of shape [B, T],
  int32 and int64, in PyNative, GRAPH_MODE and under ms.jit;
* the state dict has bitsandbytes' keys (those of a Linear4bit weight) and survives a round trip byte for byte;
* bad arguments and ids raise errors naming them.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msbnb_pass import Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, Linear4bit
from msbnb_pass import formats as fm
from msbnb_pass.errors import CheckpointError
from msbnb_pass.models._layers import Embedding, WeightSource

# (num_embeddings, embedding_dim, blocksize, double quant, quant_type, symmetric)
SHAPES = [
    (37, 64, 64, False, "nf4", True),  # rows of whole blocks
    (33, 40, 32, True, "fp4", True),  # blocks straddle rows, double quant
    (101, 72, 64, True, "int4", False),  # straddling, asymmetric int4 + double quant
    (7, 3, 32, False, "nf4", True),  # odd table size: a half-filled last byte, one partial block
    (129, 100, 128, False, "fp4", True),  # rows shorter than a block
]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def oracle_rows(w: np.ndarray, ids: np.ndarray, bs: int, qt: str, dq: bool, sym: bool) -> np.ndarray:
    """The numpy oracle end to end: quantize the table, decode the rows ``ids``."""
    packed, qs = fm.quantize_4bit(w, bs, qt, dq, symmetric=sym)
    return fm.dequantize_4bit_rows(packed, qs, ids.reshape(-1)).reshape(ids.shape + (w.shape[1],))


@pytest.fixture
def graph_mode(ms_cpu):
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("num,dim,bs,dq,qt,sym", SHAPES)
def test_embedding4bit_rows_equal_the_oracle_pynative(ms_cpu, num, dim, bs, dq, qt, sym):
    rng = np.random.default_rng(num)
    w = rng.standard_normal((num, dim)).astype(np.float32)
    emb = Embedding4bit(num, dim, qt, bs, dq, symmetric=sym, weight=w)
    ids = rng.integers(0, num, (3, 5))
    ids[0, 0], ids[-1, -1] = 0, num - 1  # first and last row
    for dtype in (np.int32, np.int64):
        y = emb(Tensor(ids.astype(dtype))).asnumpy()
        assert y.shape == (3, 5, dim) and y.dtype == np.float32
        assert np.array_equal(bits(y), bits(oracle_rows(w, ids, bs, qt, dq, sym)))
    # the table's bytes are the oracle's, and the decoded table is the oracle's full decoding
    packed, _ = fm.quantize_4bit(w, bs, qt, dq, symmetric=sym)
    assert np.array_equal(emb.weight.asnumpy().reshape(-1), packed.reshape(-1))
    assert np.array_equal(bits(emb.dequantized_weight()), bits(oracle_rows(w, np.arange(num), bs, qt, dq, sym)))


@pytest.mark.parametrize("num,dim,bs,dq,qt,sym", SHAPES[:3])
def test_embedding4bit_rows_equal_the_oracle_graph_mode_and_jit(num, dim, bs, dq, qt, sym, graph_mode):
    rng = np.random.default_rng(num + 1)
    w = rng.standard_normal((num, dim)).astype(np.float32)
    emb = Embedding4bit(num, dim, qt, bs, dq, symmetric=sym, weight=w)
    ids = rng.integers(0, num, (2, 9)).astype(np.int32)
    expected = bits(oracle_rows(w, ids, bs, qt, dq, sym))
    assert np.array_equal(bits(emb(Tensor(ids)).asnumpy()), expected)

    class Twice(nn.Cell):  # inside a larger graph, looked up twice
        def __init__(self, table):
            super().__init__()
            self.table = table

        def construct(self, a, b):
            return self.table(a) + self.table(b)

    net = Twice(emb)
    ids2 = rng.integers(0, num, (2, 9)).astype(np.int32)
    ref = oracle_rows(w, ids, bs, qt, dq, sym) + oracle_rows(w, ids2, bs, qt, dq, sym)
    assert np.array_equal(bits(net(Tensor(ids), Tensor(ids2)).asnumpy()), bits(ref))
    ms.set_context(mode=ms.PYNATIVE_MODE)

    @ms.jit
    def lookup(i):
        return emb(i)

    assert np.array_equal(bits(lookup(Tensor(ids)).asnumpy()), expected)


def test_embedding8bit_rows_equal_the_oracle(ms_cpu, graph_mode):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((50, 24)) * rng.uniform(0.01, 3, (50, 1))).astype(np.float32)
    w[4] = 0.0  # an all-zero row: SCB 0, rows of zeros
    emb = Embedding8bit(50, 24, weight=w)
    cb, scb = fm.int8_vectorwise_quant(w)
    assert np.array_equal(emb.weight.asnumpy(), cb) and np.array_equal(emb.SCB.asnumpy(), scb)
    ids = rng.integers(0, 50, (4, 6))
    ids[0, 0] = 4
    for dtype in (np.int32, np.int64):
        y = emb(Tensor(ids.astype(dtype))).asnumpy()
        ref = fm.int8_vectorwise_dequant(cb[ids.reshape(-1)], scb[ids.reshape(-1)]).reshape(4, 6, 24)
        assert y.shape == (4, 6, 24) and np.array_equal(bits(y), bits(ref))
    assert not y[0, 0].any()  # the all-zero row
    rel = np.linalg.norm(emb.dequantized_weight() - w) / np.linalg.norm(w)
    assert rel < 0.5 / 127 * np.sqrt(24)  # per element at most half a step of absmax / 127


def test_from_embedding_names_and_quantizes_each_float_table_class(ms_cpu):
    rng = np.random.default_rng(5)
    table = rng.standard_normal((40, 64)).astype(np.float32)
    ours = Embedding(WeightSource(), "model.embed_tokens", 40, 64)
    ours.weight.set_data(Tensor(table))
    ours.weight.name = "model.embed_tokens.weight"
    ms_emb = nn.Embedding(40, 64, embedding_table=Tensor(table))
    ms_emb.embedding_table.name = "encoder.word_embeddings.embedding_table"
    ids = Tensor(np.array([[0, 39, 7]], np.int32))
    ref = oracle_rows(table, np.array([[0, 39, 7]]), 64, "nf4", False, True)
    for cell, prefix in ((ours, "model.embed_tokens."), (ms_emb, "encoder.word_embeddings.")):
        q = EmbeddingNF4.from_embedding(cell)
        assert type(q) is EmbeddingNF4 and q.quant_type == "nf4"
        assert np.array_equal(bits(q(ids).asnumpy()), bits(ref))
        assert sorted(p.name for p in q.get_parameters()) == [
            f"{prefix}weight",
            f"{prefix}weight_absmax",
            f"{prefix}weight_quant_map",
        ]
        assert q.layer_name == prefix.rstrip(".")
    q8 = Embedding8bit.from_embedding(ms_emb)
    assert sorted(p.name for p in q8.get_parameters()) == [
        "encoder.word_embeddings.SCB",
        "encoder.word_embeddings.weight",
    ]
    fp4 = EmbeddingFP4.from_embedding(ours, blocksize=32, compress_statistics=True)
    assert (fp4.quant_type, fp4.blocksize, fp4.quant_state.nested) == ("fp4", 32, True)
    # bits per weight: 4 + 32 / blocksize for NF4 without double quant (+ the 16-entry code table)
    assert q.parameter_nbytes() == 40 * 64 // 2 + 4 * 40 + 4 * 16


def test_state_dict_is_bitsandbytes_layout_and_round_trips_byte_for_byte(ms_cpu):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((33, 40)).astype(np.float32)
    for dq in (False, True):
        emb = Embedding4bit(33, 40, "nf4", 32, dq, weight=w)
        sd = emb.bnb_state_dict("emb.")
        lin = Linear4bit(40, 33, bias=False, quant_type="nf4", blocksize=32, compress_statistics=dq, weight=w)
        lin_sd = lin.bnb_state_dict("emb.")
        assert sorted(sd) == sorted(lin_sd)  # bitsandbytes' Embedding4bit saves a Linear4bit weight's keys
        expected = {
            "emb.weight",
            "emb.weight.absmax",
            "emb.weight.quant_map",
            "emb.weight.quant_state.bitsandbytes__nf4",
        }
        if dq:
            expected |= {"emb.weight.nested_absmax", "emb.weight.nested_quant_map"}
        assert set(sd) == expected
        packed, qs = fm.quantize_4bit(w, 32, "nf4", dq)
        assert sd["emb.weight"].tobytes() == packed.tobytes()
        meta = bytes(sd["emb.weight.quant_state.bitsandbytes__nf4"]).decode()
        assert '"shape": [33, 40]' in meta and '"blocksize": 32' in meta
        back = Embedding4bit.from_bnb_state_dict(sd, "emb.")
        sd2 = back.bnb_state_dict("emb.")
        assert all(sd2[k].tobytes() == sd[k].tobytes() and sd2[k].dtype == sd[k].dtype for k in sd)
        ids = Tensor(np.arange(33, dtype=np.int32))
        assert np.array_equal(back(ids).asnumpy(), emb(ids).asnumpy())
        assert type(EmbeddingNF4.from_bnb_state_dict(sd, "emb.")) is EmbeddingNF4
    with pytest.raises(CheckpointError, match=r"^'emb.weight' is quantized as nf4, EmbeddingFP4 holds fp4$"):
        EmbeddingFP4.from_bnb_state_dict(sd, "emb.")
    e8 = Embedding8bit(10, 16, weight=rng.standard_normal((10, 16)).astype(np.float32))
    sd8 = e8.bnb_state_dict("t.")
    assert sorted(sd8) == ["t.SCB", "t.weight"] and sd8["t.weight"].dtype == np.int8
    back8 = Embedding8bit.from_bnb_state_dict(sd8, "t.")
    assert all(back8.bnb_state_dict("t.")[k].tobytes() == sd8[k].tobytes() for k in sd8)
    bad = dict(sd8, **{"t.SCB": np.array([1.0] * 9 + [np.nan], np.float32)})
    with pytest.raises(CheckpointError, match=r"^'t.SCB' holds an invalid row absmax at index 9: .*finite and >= 0$"):
        Embedding8bit.from_bnb_state_dict(bad, "t.")


def test_bad_arguments_and_ids(ms_cpu):
    w = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    with pytest.raises(
        ValueError, match=r"^Embedding4bit: quant_type must be one of \('nf4', 'fp4', 'int4'\), got 'nf3'$"
    ):
        Embedding4bit(6, 64, "nf3", weight=w)
    with pytest.raises(
        ValueError, match=r"^Embedding4bit: symmetric=False is only defined for quant_type='int4', got 'nf4'$"
    ):
        Embedding4bit(6, 64, "nf4", symmetric=False, weight=w)
    with pytest.raises(ValueError, match=r"^Embedding4bit: num_embeddings must be a positive integer, got 0$"):
        Embedding4bit(0, 64)
    with pytest.raises(ValueError, match=r"^Embedding8bit: weight must have shape \(6, 32\), got \(6, 64\)$"):
        Embedding8bit(6, 32, weight=w)
    with pytest.raises(TypeError, match=r"^EmbeddingNF4 is nf4; use Embedding4bit to choose quant_type$"):
        EmbeddingNF4(6, 64, quant_type="fp4")
    with pytest.raises(
        TypeError,
        match=r"^from_embedding expects a msbnb_pass.models Embedding, .* got mindspore.nn.layer.basic.Dense$",
    ):
        Embedding4bit.from_embedding(nn.Dense(4, 4))
    emb = Embedding4bit(6, 64, weight=w)
    with pytest.raises(TypeError, match=r"^Embedding4bit: ids must be int32 or int64, got Float32$"):
        emb(Tensor(np.zeros((1, 2), np.float32)))
    # ids beyond the table: MindSpore's Gather range check (negative ids count from the end, as in its Gather)
    for table in (emb, Embedding8bit(6, 64, weight=w)):
        with pytest.raises(
            RuntimeError, match=r"For 'Gather', the 'input_indices' should be in the range \[0, 6\), but got 6"
        ):
            table(Tensor(np.array([[1, 6]], np.int32))).asnumpy()
    assert np.array_equal(
        emb(Tensor(np.array([-1], np.int32))).asnumpy(), emb(Tensor(np.array([5], np.int32))).asnumpy()
    )
