"""Weights written from Python after a function was compiled with ``ms.jit`` must reach that function.

MindSpore 2.10's ``Parameter.set_data`` swaps the tensor object and compiled functions keep the old one; loading,
EMA swaps, LoRA scale/merge and resume therefore write in place (``ldm.models.layers.assign_array``). Each check
compiles first, then writes, then calls again.
"""

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn

from ldm.io.loading import load_state_dict_into
from ldm.lora import inject_lora, set_lora_scale
from ldm.models.layers import Linear, assign_array
from ldm.train.ema import EMA


class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.to_q = Linear(4, 4, bias=False)

    def construct(self, x):
        return self.to_q(x)


X = Tensor(np.ones((1, 4), np.float32))


class Scale(nn.Cell):
    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(1.0, ms.float32), name="w")

    def construct(self, x):
        return x * self.w


def test_assign_array_reaches_compiled_function():
    cell = Scale()
    f = ms.jit(cell.construct)
    x = Tensor(3.0, ms.float32)
    assert float(f(x).asnumpy()) == 3.0
    assign_array(cell.w, 2.0)
    assert float(f(x).asnumpy()) == 6.0 and float(cell.w.asnumpy()) == 2.0


def test_loading_ema_swap_and_lora_scale_after_compile():
    net = Net()
    f = ms.jit(net.construct)
    f(X)
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    load_state_dict_into(net, {"to_q.weight": w})
    np.testing.assert_allclose(f(X).asnumpy(), w.sum(1, keepdims=True).T)

    ema = EMA(list(net.get_parameters()), decay=0.5, warmup_steps=0)
    assign_array(ema.ema_params[0], np.zeros((4, 4), np.float32))
    ema.swap_in()
    assert np.abs(f(X).asnumpy()).max() == 0.0
    ema.swap_out()
    np.testing.assert_allclose(f(X).asnumpy(), w.sum(1, keepdims=True).T)

    lora_net = Net()
    inject_lora(lora_net, targets=("to_q",), rank=2)
    g = ms.jit(lora_net.construct)
    base = g(X).asnumpy()
    up = [p for p in lora_net.get_parameters() if ".lora_up." in p.name][0]
    assign_array(up, np.ones(up.shape, np.float32))
    with_lora = g(X).asnumpy()
    assert np.abs(with_lora - base).max() > 1e-3
    set_lora_scale(lora_net, 0.0)
    np.testing.assert_allclose(g(X).asnumpy(), base, rtol=1e-6, atol=1e-6)
