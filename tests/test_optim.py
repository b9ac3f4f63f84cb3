"""8-bit Adam/AdamW against a float32 reference, with the bounds bitsandbytes' optimizer tests hold."""

from __future__ import annotations

import numpy as np
import pytest

# bitsandbytes' test_optimizer8bit protocol (float32 parameters, 1024 x {32, 1024, 4097}, p ~ 0.1 randn,
# g ~ 0.01 randn): after every step the reference (torch's fp32 Adam there, float64 numpy here) is reset to
# the 8-bit optimizer's parameters and dequantized states, so each step's error is measured from the same
# start; per step |p8 - p32| mean < 1.2e-4 and its mean relative error < 1.2e-3, and fewer than 20 state
# elements outside isclose(atol=3e-3, rtol=1e-3).
P_ERR, P_RELERR = 1.2e-4, 1.2e-3
S_ATOL, S_RTOL, S_MAX_BAD = 3e-3, 1e-3, 20


def _reference_step(p, g, m, v, t, lr, b1, b2, eps, wd, decoupled):
    p, g = p.astype(np.float64), g.astype(np.float64)
    if not decoupled:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    upd = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    if decoupled:
        p = p * (1 - lr * wd)
    return (p - lr * upd).astype(np.float32), m, v


@pytest.mark.parametrize("cls_name", ["AdamW8bit", "Adam8bit"])
def test_8bit_adam_matches_fp32(ms_cpu, cls_name):
    import mindspore as ms
    from mindspore import Parameter, Tensor

    import msbnb_pass

    cls = getattr(msbnb_pass, cls_name)
    rng = np.random.default_rng(0)
    shapes = [(256, 1024), (300, 37), (32,)]  # full blocks, a partial last block, a small (fp32-state) tensor
    p0 = [(0.1 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    params = [Parameter(Tensor(a.copy()), name=f"p{i}") for i, a in enumerate(p0)]
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.995, 1e-8, 1e-2
    opt = cls(params, learning_rate=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    assert opt.is8 == (True, True, False)

    @ms.jit
    def step(g0, g1, g2):  # separate Tensor arguments: a tuple argument would recompile on every call
        return opt((g0, g1, g2))

    ref = [a.copy() for a in p0]
    ms_, vs_ = [np.zeros(s) for s in shapes], [np.zeros(s) for s in shapes]
    for t in range(1, 31):
        grads = [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
        step(*(Tensor(g) for g in grads))
        for i in range(len(shapes)):
            ref[i], ms_[i], vs_[i] = _reference_step(
                ref[i], grads[i], ms_[i], vs_[i], t, lr, b1, b2, eps, wd, cls_name == "AdamW8bit"
            )
            got = params[i].asnumpy()
            err = np.abs(got - ref[i])
            relerr = (err / (np.abs(ref[i]) + 1e-9)).mean()
            assert err.mean() < P_ERR and relerr < P_RELERR, (t, i, err.mean(), relerr)
            m8, v8 = opt.dequantized_states(i)
            for s8, s32 in ((m8, ms_[i]), (v8, vs_[i])):
                bad = ~np.isclose(s8, s32, atol=S_ATOL, rtol=S_RTOL)
                assert bad.sum() < S_MAX_BAD, (t, i, int(bad.sum()))
            ref[i], ms_[i], vs_[i] = got.copy(), m8.astype(np.float64), v8.astype(np.float64)


def test_state_memory_is_a_quarter_of_fp32_adamw(ms_cpu):
    from mindspore import Parameter, Tensor, nn

    from msbnb_pass import AdamW8bit

    params = [Parameter(Tensor(np.zeros((512, 1024), np.float32)), name="w")]
    opt8 = AdamW8bit(params)
    fp32 = nn.AdamWeightDecay(params)
    fp32_bytes = sum(int(p.size * p.itemsize) for p in (*fp32.moments1, *fp32.moments2))
    ratio = opt8.state_nbytes() / fp32_bytes
    assert fp32_bytes == 8 * 512 * 1024
    assert 0.25 <= ratio <= 0.2506, ratio  # 2 bytes of codes + 8 bytes of absmax per 2048 elements


def test_bad_arguments():
    from mindspore import Parameter, Tensor

    from msbnb_pass import AdamW8bit, MsbnbError

    p = [Parameter(Tensor(np.zeros(8, np.float32)), name="w")]
    with pytest.raises(MsbnbError, match=r"betas\[1\] must be a number in \[0.0, 1.0\), got 1.5"):
        AdamW8bit(p, betas=(0.9, 1.5))
    with pytest.raises(MsbnbError, match="eps"):
        AdamW8bit(p, eps=0)
    with pytest.raises(MsbnbError, match="weight_decay"):
        AdamW8bit(p, weight_decay=-1)
    with pytest.raises(MsbnbError, match="block_size"):
        AdamW8bit(p, block_size=100)
    with pytest.raises(MsbnbError, match="params is empty"):
        AdamW8bit([])


def test_qlora_train_step_with_adamw8bit(ms_cpu):
    from functools import partial

    from msbnb_pass import AdamW8bit, LoraConfig, get_qlora_model
    from tests.test_lora import _base_bytes, _llama, _train

    net = get_qlora_model(_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    before = _base_bytes(net)
    losses = _train(net, 30, 1e-2, optimizer=partial(AdamW8bit, min_8bit_size=0, weight_decay=0.0))
    assert _base_bytes(net) == before
    assert losses[-1] < 0.5 * losses[0], losses
