"""The plumbing every cache method shares: a policy cell that runs one denoising step of the FLUX
transformer with its cache, its state kept in fixed-shape Parameters of its own (one instance per CFG
branch and input shape), reset in place before every call.

A method is one subclass in its own file. It defines
- `step_inputs(cache, i, num_steps)`: the per-step tensors its construct takes after the model inputs
  (step index, thresholds, schedule flags, calibration values), decided on the host; every value that
  changes between steps or runs is a tensor, so nothing recompiles when it changes;
- `construct(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
  *step_inputs) -> (velocity, computed, signal)`: computed is True when the full stack ran; signal is the
  method's decision value at this step (-1 where it has none), recorded in the statistics.
The skip is a tensor `if`, which graph mode compiles to real control flow: a skipped branch costs nothing.
"""
import mindspore as ms
from mindspore import ops

from fbcache_ms.state import CacheState, Feature

EPS = 1e-8


def relative_l1(previous, current):
    """mean|previous - current| / mean|previous| over the whole tensor (one decision per batch, as the
    references make it), in float32."""
    prev = previous.astype(ms.float32)
    return ops.abs(prev - current.astype(ms.float32)).mean() / (ops.abs(prev).mean() + EPS)


def no_signal():
    return ms.Tensor(-1.0, ms.float32)


def signal_where(has_signal, value):
    """The step's signal where it exists, -1 (recorded as none) elsewhere."""
    return ops.select(has_signal, value, ops.full_like(value, -1.0))


class CachePolicy(CacheState):
    not_state = ("transformer",)  # shared, not copied: its weights are not state
    blocks_on_reuse = 0  # transformer blocks a reused step runs

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def state_bytes(self):
        """Bytes of cache state this policy holds (its Parameters, the model's excluded)."""
        skip = tuple(f"{child}." for child in self.not_state)
        return sum(p.size * p.itemsize for name, p in self.parameters_and_names() if not name.startswith(skip))

    def tokens_run(self, computed, step=0):
        """Image tokens that ran through the block stack at a step, for methods that reduce tokens (else None)."""
        return None

    def blocks_run(self, computed, step=0):
        """Transformer blocks that ran at a step, from the step's `computed` flag."""
        return self.transformer.num_blocks if computed else self.blocks_on_reuse

    def step_inputs(self, cache, i, num_steps):
        raise NotImplementedError

    def load(self, cache):
        """Put what the config brings beside tensors per step (FastCache: its calibrated map) into the policy's
        Parameters, after reset(): policies are shared by configs of one structure."""

    def record(self, stats, branch, i, computed, signal):
        """Put one step's outputs (computed flag, signal) into the statistics."""
        computed = bool(computed.asnumpy())
        stats.record(branch, computed, self.blocks_run(computed, i), float(signal.asnumpy()),
                     self.tokens_run(computed, i))


class WholeStackCache(CachePolicy):
    """Step skippers that reuse the image residual of the whole block stack (TeaCache, MagCache): a reused step
    runs no block."""

    def __init__(self, transformer, batch, image_tokens):
        super().__init__(transformer)
        self.residual = Feature((batch, image_tokens, transformer.config.dim), transformer.dtype, "residual")

    def stack_or_reuse(self, skip, h, e, temb, cos, sin):
        """The stack's image output: h + the stored residual when `skip`, else computed (and its residual stored)."""
        if skip:
            h_out = h + self.residual.value
        else:
            h_out = self.transformer.run_blocks(h, e, temb, cos, sin)[0]
            self.residual.store(h_out - h)
        return h_out
