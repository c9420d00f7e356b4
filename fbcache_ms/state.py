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


class NewtonClock(CacheState):
    """The full steps a group of TaylorFeatures was last updated at (they update together), and the scalar
    coefficients derived from them: computed once per step for the whole group, so that each feature's
    update and forecast is one or two tensor ops (on a graph of 114 features the per-feature scalar
    arithmetic cost more than the forecasts themselves).

    `groups`: that many independent clocks in one, each coefficient a [groups] vector (AFCache: one per unit of
    blocks, each advanced on the steps its unit ran), so that their arithmetic is a handful of vector ops per step."""

    def __init__(self, order, name="clock", groups=None):
        super().__init__()
        self.order = order
        lead = () if groups is None else (groups,)
        self.positions = _buffer(lead + (order + 1,), ms.float32, f"{name}_pos")  # s_n, s_n-1, ...
        self.count = _buffer(lead, ms.int32, f"{name}_count")  # updates so far, up to order + 1

    def _position(self, i):
        return self.positions[..., i]

    def update_scales(self, step):
        """1 / (step - s_i) for difference i+1, 0 where difference i has no history yet (then i+1 is 0)."""
        scales = []
        for i in range(self.order):
            valid = (self.count > i).astype(ms.float32)
            scales.append(valid / (valid * (step - self._position(i)) + (1 - valid)))
        return scales

    def advance(self, step, ran=None):
        """After every feature of the group took its update at `step` (of groups: those where `ran`)."""
        now = ops.broadcast_to(step.reshape(1), self.count.shape + (1,))
        positions = ops.cat([now, self.positions[..., :self.order]], axis=-1) if self.order > 0 else now
        count = ops.minimum(self.count + 1, self.order + 1)
        if ran is not None:
            positions = ops.select(ops.broadcast_to(ran[:, None], positions.shape), positions, self.positions)
            count = ops.select(ran, count, self.count)
        ops.assign(self.positions, positions)
        ops.assign(self.count, count)

    def spans(self, step, n):
        """prod_{i<p} (step - s_i) for p = 1..n (n <= order + 1), with no validity mask: the weight of the order-p
        term, and the size of the order-(p-1) forecast's Newton remainder."""
        out, w = [], None
        for p in range(n):
            d = step - self._position(p)
            w = d if w is None else w * d
            out.append(w)
        return out

    def forecast_weights(self, step):
        """Weight of the order-p term, p = 1..order: prod_{i<p} (step - s_i), 0 while difference p lacks its
        history."""
        return [w * (self.count > p).astype(ms.float32) for p, w in enumerate(self.spans(step, self.order), 1)]


class TaylorFeature(CacheState):
    """TaylorSeer's forecast of one feature from its values at past full steps.

    Keeps the Newton divided differences f[s_n], f[s_n, s_n-1], ..., up to `order`; the positions of the
    last full steps live in the group's NewtonClock. With step distance d between the last two full steps
    this is, for order 1, exactly TaylorSeer's `F + (F - F_prev) / d * k`; unlike a Taylor sum of backward
    differences with k^i / i! it stays exact for features that are polynomials of degree <= order in the
    step index, whatever the spacing of the full steps. Only the differences that have enough history are
    used (the clock's count of valid terms, not a sentinel value).
    """

    def __init__(self, shape, dtype, order, name="taylor"):
        super().__init__()
        self.order, self.dtype = order, dtype
        self.diffs = ms.ParameterTuple([_buffer(shape, dtype, f"{name}_d{i}") for i in range(order + 1)])

    def _scaled(self, x, c):
        """x * c with the float32 scalar c, in float32 (no casts when the storage already is)."""
        if self.dtype == ms.float32:
            return x * c
        return (x.astype(ms.float32) * c).astype(self.dtype)

    def update(self, x, scales):
        """A full step computed `x`; scales: the clock's update_scales(step)."""
        new = [x]
        for i in range(self.order):
            new.append(self._scaled(new[i] - self.diffs[i], scales[i]))
        for i in range(self.order + 1):
            ops.assign(self.diffs[i], new[i])
        return x

    def term(self, weights, p):
        """The order-p term of the forecast; weights: the clock's forecast_weights(step)."""
        return self._scaled(self.diffs[p], weights[p - 1])

    def change(self, weights):
        """The forecast minus the last value (its terms of order 1 and up); None at order 0."""
        out = None
        for p in range(1, self.order + 1):
            out = self.term(weights, p) if out is None else out + self.term(weights, p)
        return out

    def forecast(self, weights, order=None):
        """Newton forecast with the terms up to `order` (default: all this feature keeps)."""
        order = self.order if order is None else min(order, self.order)
        out = self.diffs[0]
        for i in range(1, order + 1):
            out = out + self.term(weights, i)
        return out
