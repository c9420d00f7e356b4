"""Cache state as fixed-shape Parameters: allocated once per shape, updated inside the compiled graph,
reset in place before every pipeline call (a fresh state object would be ignored by a compiled graph)."""
import mindspore as ms
from mindspore import nn, ops


def _buffer(shape, dtype, name):
    return ms.Parameter(ops.zeros(shape, dtype), name=name, requires_grad=False)


class CacheState(nn.Cell):
    """Base of all state cells: `reset()` zeroes every Parameter in place (called from PyNative).

    Parameters under a child named in `not_state` (e.g. the model a policy runs) are left alone."""

    not_state = ()

    def reset(self):
        for name, param in self.parameters_and_names():
            if not name.startswith(tuple(f"{child}." for child in self.not_state)):
                ops.assign(param, ops.zeros_like(param))


class Feature(CacheState):
    """One cached tensor, e.g. the residual of the block stack at the last full step."""

    def __init__(self, shape, dtype, name="feature"):
        super().__init__()
        self.value = _buffer(shape, dtype, name)

    def store(self, x):
        ops.assign(self.value, x)
        return x


class TaylorFeature(CacheState):
    """TaylorSeer's forecast of one feature from its values at past full steps.

    Keeps the Newton divided differences f[s_n], f[s_n, s_n-1], ..., up to `order`, and the positions of
    the last full steps. With step distance d between the last two full steps this is, for order 1,
    exactly TaylorSeer's `F + (F - F_prev) / d * k`; unlike a Taylor sum of backward differences with
    k^i / i! it stays exact for features that are polynomials of degree <= order in the step index,
    whatever the spacing of the full steps. Only the differences that have enough history are used
    (a count of valid terms, not a sentinel value).
    """

    def __init__(self, shape, dtype, order, name="taylor"):
        super().__init__()
        self.order = order
        self.diffs = ms.ParameterTuple([_buffer(shape, dtype, f"{name}_d{i}") for i in range(order + 1)])
        self.positions = _buffer((order + 1,), ms.float32, f"{name}_pos")  # s_n, s_n-1, ...
        self.count = _buffer((), ms.int32, f"{name}_count")  # valid differences

    def update(self, x, step):
        """A full step computed `x` at `step` (0-d float32 tensor)."""
        new = [x]
        for i in range(self.order):
            # difference i+1 exists only where the older difference i did; elsewhere it is zero
            valid = (self.count > i).astype(ms.float32)
            span = valid * (step - self.positions[i]) + (1 - valid)
            new.append(((new[i] - self.diffs[i]).astype(ms.float32) * (valid / span)).astype(x.dtype))
        for i in range(self.order + 1):
            ops.assign(self.diffs[i], new[i])
        if self.order > 0:
            ops.assign(self.positions, ops.cat([step.reshape(1), self.positions[:self.order]]))
        else:
            ops.assign(self.positions, step.reshape(1))
        ops.assign(self.count, ops.minimum(self.count + 1, self.order + 1))
        return x

    def term(self, step, p):
        """The order-p term of the forecast at `step` (zero while difference p lacks its history)."""
        weight = ms.Tensor(1.0, ms.float32)
        for i in range(p):
            weight = weight * (step - self.positions[i])
        valid = (self.count > p).astype(ms.float32)
        return (self.diffs[p].astype(ms.float32) * (weight * valid)).astype(self.diffs[p].dtype)

    def forecast(self, step, order=None):
        """Newton forecast at `step` with the terms up to `order` (default: all this feature keeps)."""
        order = self.order if order is None else min(order, self.order)
        out = self.diffs[0]
        for i in range(1, order + 1):
            out = out + self.term(step, i)
        return out
