"""AFCache: per block (or unit of blocks) and per step, a strategy chosen from its measured stability.

This project's definition (no paper exists; ../shared/reference/cache-methods.md gives only the intent).
The cached unit is each block's residual, output - input (a double block: image and text streams; a single
block: the joint sequence), kept as Newton differences up to `order` (TaylorFeature), updated whenever the
block runs. Predictors p = 0 (reuse, FORA), 1 and 2 (Taylor forecasts) up to `order`.

Stability s[b, p]: an EMA (0.9 old + 0.1 new, starting at 0.5) of the cosine similarity between block b's
fresh residual and predictor p's forecast of it from the block's earlier runs, per unit span. A forecast's
error is its Newton remainder, proportional to the span prod_{i<=p} (step - s_i) over the steps s_0 > s_1 > ...
the block last ran at (for reuse: the block's age); the cosine measured at span W is stored as cos(arccos(c) / W),
and read back at this step's span W' as cos(min(pi, W' * arccos(s))): a block that has not run for a while is
predicted less stable, and runs again (without the span, a stable block was frozen until the next refresh).
The EMA is read without its start value's share (divided by 1 - 0.9^updates, as Adam corrects its moments), so
blocks that ran more often are not favoured. It is updated on the steps where the block runs and p has the
history it needs, and kept across the steps of one call only (reset per call, one state per CFG branch). A
block's best predictor is the one with the highest predicted cosine at this step.

Per step, decided before any block runs, from the stabilities so far:
- warm-up steps and every `interval`-th step after them run every block (a global refresh that also
  updates every block's stability);
- threshold mode: a block runs when its best predicted cosine is below `threshold` (1 runs everything);
- budget mode: the k blocks with the lowest best predicted cosine run, k chosen on the host so that the blocks
  run over the whole call come to `budget` of an uncached call (as close as the refresh steps allow);
- a block that does not run adds its best predictor's forecast to its input.
Each block's run is a tensor `if`: a block that does not run costs its forecast only.

Units (group_size > 1): the decision is made for `group_size` consecutive blocks of the same kind at once (the
double blocks and the single blocks are cut apart; a kind's last unit may be shorter): one residual (the
unit's output - input), one stability, one tensor `if` per unit. On CPU every `if` is a kernel graph of its
own (README: AFCache), so this cuts the control flow and the bookkeeping by the unit size. "Block" above then
reads "unit"; the budget still counts blocks: the units run in order of stability, least stable first, while
each brings the step's count of blocks nearer to k (the first that does not ends the list).
The per-step strategy of every unit (0 ran, 1 + p forecast by predictor p) is returned as the signal and
kept per block in the statistics (CacheStats.strategies), with the units' stabilities after each step
(CacheStats.stability: the EMAs as stored, per unit span, start value included).
"""
import math

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from fbcache_ms.base import EPS, CachePolicy
from fbcache_ms.state import NewtonClock, TaylorFeature, _buffer

EMA_KEEP = 0.9
START = 0.5


def units(n, size):
    """(start, stop) of `n` blocks cut into runs of `size` (the last one may be shorter)."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def stack_units(num_double, num_single, size):
    """(first, stop) of every unit over the whole stack, double blocks first, single blocks numbered after them:
    the two kinds are cut apart."""
    return units(num_double, size) + [(num_double + a, num_double + b) for a, b in units(num_single, size)]


class AFCache(CachePolicy):
    def __init__(self, transformer, batch, image_tokens, text_tokens, order, group_size=1):
        super().__init__(transformer)
        cfg, dtype = transformer.config, transformer.dtype
        dim = cfg.dim
        self.order = order
        self.n_blocks = transformer.num_blocks
        self.double_units = units(cfg.num_layers, group_size)
        self.single_units = units(cfg.num_single_layers, group_size)
        self.sizes = [b - a for a, b in self.double_units + self.single_units]  # blocks per unit
        self.n_units = len(self.sizes)
        img, txt = (batch, image_tokens, dim), (batch, text_tokens, dim)
        joint = (batch, text_tokens + image_tokens, dim)
        n_double, n_single = len(self.double_units), len(self.single_units)
        self.res_h = nn.CellList([TaylorFeature(img, dtype, order, f"af_h{i}") for i in range(n_double)])
        self.res_e = nn.CellList([TaylorFeature(txt, dtype, order, f"af_e{i}") for i in range(n_double)])
        self.res_x = nn.CellList([TaylorFeature(joint, dtype, order, f"af_x{i}") for i in range(n_single)])
        # one clock per unit, advanced on the steps its unit ran, kept as vectors over the units
        self.clock = NewtonClock(order, "af_clock", groups=self.n_units)
        # stability - START, so that the in-place reset (zeros) starts every unit at START
        self.stability = _buffer((self.n_units, order + 1), ms.float32, "af_stability")
        # the EMA's weight on measured cosines, 1 - 0.9^updates: its start value's share is 1 - this
        self.measured = _buffer((self.n_units, order + 1), ms.float32, "af_measured")
        self.unit_sizes = ms.Tensor(np.array(self.sizes, np.int32))
        self.gram = ops.MatMul(transpose_b=True)
        self.eye = ms.Tensor(np.eye(order + 2, dtype=np.float32))
        self.predictors = ms.Tensor(np.arange(order + 1, dtype=np.int32))
        self.no_gram = ms.Tensor(np.zeros((order + 2, order + 2), np.float32))

    # ---------------------------------------------------------------- host side
    def step_inputs(self, cache, i, num_steps):
        full = cache.is_full_step(i)
        if cache.budget is None:
            threshold, k = cache.threshold, 0
        else:
            threshold, k = -2.0, self.blocks_per_step(cache, num_steps)
        return (ms.Tensor(float(i), ms.float32), ms.Tensor(full), ms.Tensor(threshold, ms.float32),
                ms.Tensor(k, ms.int32))

    def blocks_per_step(self, cache, num_steps):
        """Blocks to run on each step that is not a full one, so that the call runs `budget` of its blocks."""
        full = sum(cache.is_full_step(i) for i in range(num_steps))
        rest = num_steps - full
        if rest == 0:
            return self.n_blocks
        k = (cache.budget * num_steps - full) * self.n_blocks / rest
        return int(min(self.n_blocks, max(0, math.floor(k + 0.5))))

    def record(self, stats, branch, i, computed, signal):
        codes = [int(c) for c, size in zip(signal.asnumpy().reshape(-1), self.sizes) for _ in range(size)]
        ran = sum(c == 0 for c in codes)
        stats.record(branch, ran == len(codes), ran)
        stats.strategies.setdefault(branch, []).append(codes)
        stats.stability.setdefault(branch, []).append((self.stability.asnumpy() + START).tolist())

    # ---------------------------------------------------------------- graph
    def _spans(self, step):
        """[units, order + 1]: predictor p's Newton remainder factor at `step`, prod_{i<=p} (step - s_i) over the
        steps s_0 > s_1 > ... its unit last ran at (reuse: the unit's age), and whether p has that history."""
        spans = ops.stack(self.clock.spans(step, self.order + 1), axis=1)
        valid = self.clock.count[:, None] > self.predictors[None, :]
        return ops.select(valid, spans, ops.ones_like(spans)), valid

    def _decide(self, full, threshold, k, spans, valid):
        """-> (run [units] bool, best predictor [units] float) from the stabilities so far, each extrapolated to
        this step's span: the predicted cosine is cos(span * angle), the angle per unit span arccos(stability)."""
        measured = self.measured > 0
        mean = self.stability / ops.select(measured, self.measured, ops.ones_like(self.measured)) + START
        angle = ops.acos(ops.clamp(mean, -1.0, 1.0)) * spans
        s = ops.select(ops.logical_and(valid, measured), ops.cos(ops.minimum(angle, math.pi)),
                       ops.full_like(angle, -2.0))
        best_s = s[:, 0]
        best_p = ops.zeros_like(best_s)
        for p in range(1, self.order + 1):
            better = s[:, p] > best_s
            best_s = ops.select(better, s[:, p], best_s)
            best_p = ops.select(better, ops.full_like(best_p, float(p)), best_p)
        # the units ranked before each one by stability, lowest first (ties: lower index first)
        index = ops.arange(self.n_units)
        before = ops.logical_or(best_s[None, :] < best_s[:, None],
                                ops.logical_and(best_s[None, :] == best_s[:, None], index[None, :] < index[:, None]))
        # blocks in the units up to and including this one; a unit runs while that comes nearer to k
        # (units of one block: its rank < k)
        upto = (before.astype(ms.int32) * self.unit_sizes[None, :]).sum(1) + self.unit_sizes
        run = ops.logical_or(best_s < threshold, 2 * upto - self.unit_sizes < 2 * k)
        run = ops.logical_or(run, ops.logical_or(full, threshold >= 1.0))
        return run, best_p

    def _gram(self, fresh, states, weights):
        """Gram matrix of [forecast 0, ..., forecast order, fresh residual] of one unit (its streams count as
        one vector): every dot product the stability update needs, one stack and one matmul per stream."""
        gram = None
        for state, r in zip(states, fresh):
            f = state.forecast(weights, 0)
            rows = [f]
            for p in range(1, self.order + 1):
                f = f + state.term(weights, p)  # predictor p's forecast is predictor p-1's plus one Newton term
                rows.append(f)
            rows.append(r)
            a = ops.stack([x.astype(ms.float32).reshape(-1) for x in rows])
            g = self.gram(a, a)
            gram = g if gram is None else gram + g
        return gram

    def _stability_update(self, grams, run, spans, valid):
        """EMA of cos(fresh, predictor p's forecast) for every unit that ran and every p with enough history,
        all units at once from their Gram matrices [units, order + 2, order + 2]."""
        last = self.order + 1
        norms = (grams * self.eye).sum(2)
        cosine = grams[:, :last, last] / (ops.sqrt(norms[:, :last] * norms[:, last:]) + EPS)
        # the cosine per unit span: the angle measured at this step's span, divided by it
        per_span = ops.cos(ops.acos(ops.clamp(cosine, -1.0, 1.0)) / spans)
        valid = ops.logical_and(valid, run[:, None])
        old = self.stability
        ops.assign(self.stability, ops.select(valid, EMA_KEEP * old + (1 - EMA_KEEP) * (per_span - START), old))
        w = self.measured
        ops.assign(self.measured, ops.select(valid, EMA_KEEP * w + (1 - EMA_KEEP), w))

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance, step, full, threshold, k):
        t = self.transformer
        h, e, temb, cos, sin = t.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                       img_ids, txt_ids, guidance)
        spans, valid = self._spans(step)
        run, best_p = self._decide(full, threshold, k, spans, valid)
        # every unit's Newton coefficients at once ([units] each); a unit reads its own entries
        weights = self.clock.forecast_weights(step)
        scales = self.clock.update_scales(step)
        used = [w * (best_p >= p).astype(ms.float32) for p, w in enumerate(weights, 1)]  # best predictor's terms
        grams = []
        u = 0
        for (first, stop), state_h, state_e in zip(self.double_units, self.res_h, self.res_e):
            if run[u]:
                h_new, e_new = t.run_blocks(h, e, temb, cos, sin, first, stop)
                r_h, r_e = h_new - h, e_new - e
                gram = self._gram((r_h, r_e), (state_h, state_e), [w[u] for w in weights])
                s_u = [s[u] for s in scales]
                state_h.update(r_h, s_u)
                state_e.update(r_e, s_u)
                h, e = h_new, e_new  # not h + r_h: all blocks running must be the uncached model exactly
            else:
                u_u = [w[u] for w in used]
                h = h + state_h.forecast(u_u)
                e = e + state_e.forecast(u_u)
                gram = self.no_gram
            grams.append(gram)
            u += 1
        txt_len = e.shape[1]
        x = ops.cat([e, h], axis=1)
        for (first, stop), state_x in zip(self.single_units, self.res_x):
            if run[u]:
                x_new = x
                for i in range(first, stop):
                    x_new = t.single_transformer_blocks[i](x_new, temb, cos, sin)[0]
                r_x = x_new - x
                gram = self._gram((r_x,), (state_x,), [w[u] for w in weights])
                state_x.update(r_x, [s[u] for s in scales])
                x = x_new
            else:
                x = x + state_x.forecast([w[u] for w in used])
                gram = self.no_gram
            grams.append(gram)
            u += 1
        self._stability_update(ops.stack(grams), run, spans, valid)  # spans, valid: read before the clocks advance
        self.clock.advance(step, run)
        codes = ops.select(run, ops.zeros_like(best_p), best_p + 1)
        return t.head(x[:, txt_len:], temb), run.all(), codes
