"""The seed's converter API (shared/seeds/000: 模型转换, API 参考 -> 模型转换, 场景 3), as written."""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn

from msbnb_pass import Linear4bit, Linear8bit

from . import zoo
from .bounds import assert_network_close

# encoder (64) -> decoder (128) -> classifier (64) + the sum of lm_head's 96 outputs (64 + 96 terms)
MODEL_CHAIN = 64 + 128 + 64 + 96


class Model(nn.Cell):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.encoder = zoo._dense(rng, 64, 128)
        self.decoder = zoo._dense(rng, 128, 64)
        self.classifier = zoo._dense(rng, 64, 3)
        self.lm_head = zoo._dense(rng, 64, 96)

    def construct(self, x):
        h = self.decoder(self.encoder(x))
        return self.classifier(h) + self.lm_head(h).sum()


def test_convert_to_quantized_model_as_in_the_seed(ms_cpu):
    from msbnb_pass import Int8Config, convert_to_quantized_model

    model = Model()
    config = Int8Config()
    quant_model = convert_to_quantized_model(model, config)
    assert quant_model is model and isinstance(model.encoder, Linear8bit) and isinstance(model.classifier, Linear8bit)
    assert isinstance(model.lm_head, nn.Dense)

    model = Model()
    config = Int8Config(symmetric=True, per_channel=True)
    quant_model = convert_to_quantized_model(model, config=config, modules_to_not_convert=["lm_head", "classifier"])
    assert isinstance(model.classifier, nn.Dense) and isinstance(model.encoder, Linear8bit)


def test_scenario_3_model_compression(ms_cpu):
    from msbnb_pass import Int4Config, convert_to_quantized_model

    model = Model()
    x = Tensor(np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32))
    y0 = model(x).asnumpy()
    config = Int4Config(group_size=128)
    quant_model = convert_to_quantized_model(model, config)
    assert isinstance(quant_model.decoder, Linear4bit) and quant_model.decoder.quant_type == "int4"
    assert quant_model.decoder.blocksize == 128 and quant_model.decoder.quant_state.nested
    y1 = quant_model(x).asnumpy()
    assert (y0 * y1).sum() / np.linalg.norm(y0) / np.linalg.norm(y1) > 0.98


def test_replace_quantize_and_sizes_as_in_the_api_reference(ms_cpu):
    from msbnb_pass import compare_model_sizes, get_model_size, quantize_model_weights, replace_linear_layers

    fp_model = Model()
    model = Model()
    model = replace_linear_layers(model, Linear8bit)
    assert isinstance(model.encoder, Linear8bit) and model.encoder.has_fp16_weights  # training mode
    assert_network_close(
        model(Tensor(np.ones((2, 64), np.float32))).asnumpy(),
        fp_model(Tensor(np.ones((2, 64), np.float32))).asnumpy(),
        n_terms=MODEL_CHAIN,
        what="training-mode Linear8bit vs the float model",
    )
    model = quantize_model_weights(model)
    assert not model.encoder.has_fp16_weights
    size_info = get_model_size(model)
    comparison = compare_model_sizes(fp_model, model)
    fp = get_model_size(fp_model)
    assert fp["num_params"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 3 + 3 + 64 * 96 + 96
    assert size_info["quantized_layers"] == 3
    # three int8 layers + their scales, the head in float32
    expected = (64 * 128 + 128 * 64 + 64 * 3) + 4 * (128 + 64 + 3) + 4 * (128 + 64 + 3) + 4 * (64 * 96 + 96)
    assert size_info["total_bytes"] == expected
    assert comparison["compression_ratio"] == fp["total_bytes"] / expected
    assert 0 < comparison["memory_saving"] < 1 and comparison["quantized_layers"] == 3
    four = replace_linear_layers(Model(), Linear4bit, group_size=64, quant_type="nf4")
    assert isinstance(four.encoder, Linear4bit) and four.encoder.blocksize == 64
