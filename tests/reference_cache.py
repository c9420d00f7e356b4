"""Plain-numpy reference formulas of the cache methods, written independently of fbcache_ms."""
import math

import numpy as np


def newton_forecast(history, step, order):
    """Newton divided-difference forecast at `step` from [(step, value), ...] (oldest first), using the
    last order + 1 points: exact for polynomials of degree <= order."""
    points = history[-(order + 1):]
    xs = [float(s) for s, _ in points]
    table = [np.asarray(v, np.float64) for _, v in points]
    coefs = [table[-1]]
    for level in range(1, len(points)):
        table = [(table[j + 1] - table[j]) / (xs[j + level] - xs[j]) for j in range(len(table) - 1)]
        coefs.append(table[-1])
    out, weight = coefs[0].copy(), 1.0
    for i in range(1, len(coefs)):
        weight *= step - xs[-i]
        out = out + coefs[i] * weight
    return out


def taylor_factorial_forecast(history, step, order):
    """The published TaylorSeer rule: backward differences over the last step distance d, then
    sum_i F_i k^i / i!. Equal to `newton_forecast` for order <= 1, not exact beyond."""
    factors, last = [], None
    for s, value in history:
        new = [np.asarray(value, np.float64)]
        if last is not None:
            for i in range(min(order, len(factors))):
                new.append((new[i] - factors[i]) / (s - last))
        factors, last = new, s
    k = step - last
    return sum(f * k ** i / math.factorial(i) for i, f in enumerate(factors))


def fbcache_relative_diff(prev_r1, r1, eps=1e-12):
    """ParaAttention's rule: mean|prev - now| / mean|prev|."""
    prev_r1, r1 = np.asarray(prev_r1, np.float64), np.asarray(r1, np.float64)
    return np.abs(prev_r1 - r1).mean() / max(np.abs(prev_r1).mean(), eps)


# ---- the cache methods on the PyTorch diffusers transformer, for parity tests -------------------------

import torch  # noqa: E402


class TorchFlux:
    """diffusers' FluxTransformer2DModel split into the steps the cache methods need (torch, no grad)."""

    def __init__(self, model):
        self.m = model

    def embed(self, x, enc, pooled, timestep, img_ids, txt_ids, guidance):
        m = self.m
        h = m.x_embedder(x)
        t = timestep.to(h.dtype) * 1000
        if m.config.guidance_embeds:
            temb = m.time_text_embed(t, guidance.to(h.dtype) * 1000, pooled)
        else:
            temb = m.time_text_embed(t, pooled)
        rope = m.pos_embed(torch.cat([txt_ids, img_ids], 0))
        return h, m.context_embedder(enc), temb, rope

    def block(self, i, h, e, temb, rope):
        e, h = self.m.transformer_blocks[i](hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
        return h, e

    @property
    def num_blocks(self):
        return len(self.m.transformer_blocks) + len(self.m.single_transformer_blocks)

    def blocks(self, start, stop, h, e, temb, rope):
        """Blocks start..stop-1, numbered over the double blocks, then the single ones."""
        n_double = len(self.m.transformer_blocks)
        for i in range(start, stop):
            if i < n_double:
                h, e = self.block(i, h, e, temb, rope)
            else:
                e, h = self.m.single_transformer_blocks[i - n_double](
                    hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
        return h, e

    def blocks_from(self, first, h, e, temb, rope):
        return self.blocks(first, self.num_blocks, h, e, temb, rope)

    def modulated_input(self, h, temb):
        """TeaCache's signal: block 0's norm1 output LN(h)(1 + scale_msa) + shift_msa."""
        return self.m.transformer_blocks[0].norm1(h, emb=temb)[0]

    def head(self, h, temb):
        return self.m.proj_out(self.m.norm_out(h, temb))

    def per_module_stack(self, h, e, temb, rope, outputs):
        """The block stack where `outputs(key, compute)` gives each module's pre-gate output: `compute()`
        on a full step, a forecast otherwise. Keys: ("attn", i), ("attn_ctx", i), ("ff", i), ("ff_ctx", i),
        ("single", j)."""
        for i, b in enumerate(self.m.transformer_blocks):
            nh, g_msa, sh_mlp, sc_mlp, g_mlp = b.norm1(h, emb=temb)
            ne, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp = b.norm1_context(e, emb=temb)
            pair = {}

            def attention():
                if "attn" not in pair:
                    pair["attn"] = b.attn(hidden_states=nh, encoder_hidden_states=ne, image_rotary_emb=rope)
                return pair["attn"]
            a_h = outputs(("attn", i), lambda: attention()[0])
            a_e = outputs(("attn_ctx", i), lambda: attention()[1])
            h = h + g_msa.unsqueeze(1) * a_h
            e = e + c_g_msa.unsqueeze(1) * a_e
            f_h = outputs(("ff", i), lambda: b.ff(b.norm2(h) * (1 + sc_mlp[:, None]) + sh_mlp[:, None]))
            f_e = outputs(("ff_ctx", i), lambda: b.ff_context(
                b.norm2_context(e) * (1 + c_sc_mlp[:, None]) + c_sh_mlp[:, None]))
            h = h + g_mlp.unsqueeze(1) * f_h
            e = e + c_g_mlp.unsqueeze(1) * f_e
        txt = e.shape[1]
        x = torch.cat([e, h], 1)
        for j, b in enumerate(self.m.single_transformer_blocks):
            nx, gate = b.norm(x, emb=temb)
            out = outputs(("single", j), lambda: b.proj_out(torch.cat(
                [b.attn(hidden_states=nx, image_rotary_emb=rope), b.act_mlp(b.proj_mlp(nx))], dim=2)))
            x = x + gate.unsqueeze(1) * out
        return x[:, txt:]


class ReferenceCache:
    """One CFG branch's cache state and decisions, written from the specification in plain torch/numpy."""

    def __init__(self, method, threshold=0.0, order=1, interval=5, warmup=3, variant="per_module", fn=1, bn=0,
                 steps=None, coefficients=None, ratios=None, max_skip=3, retention=0.2, fourier_ratio=1.0, grid=None,
                 alpha=0.05, motion_ratio=1.0, budget=None, low_band=None, group_size=1, static_map=None):
        self.method, self.threshold, self.order = method, threshold, order
        self.low_band = low_band  # FreqCa
        self.fourier_ratio, self.grid = fourier_ratio, grid
        self.alpha, self.motion_ratio, self.prev_h = alpha, motion_ratio, None
        # FastCache's static-token map [3D + 3, D] (numpy) and each token's anchor: the step it last ran
        self.static_map, self.anchor_h, self.anchor_p = static_map, None, None
        self.interval, self.warmup, self.variant = interval, warmup, variant
        self.fn, self.bn, self.steps = fn, bn, steps
        self.coefficients, self.ratios, self.max_skip, self.retention = coefficients, ratios, max_skip, retention
        self.accumulated, self.ratio, self.error, self.skipped = 0.0, 1.0, 0.0, 0
        self.prev_input = None
        self.prev_r1 = None
        self.residual = None
        self.history = {}  # key -> [(step, value)] of full steps
        self.changes = []  # FBCache's relative change at each step that had a reference
        self.budget, self.stability, self.strategies = budget, None, []  # AFCache
        self.group_size = group_size
        self.stability_trace = []  # AFCache: per step, after it

    def _remember(self, key, step, value):
        self.history.setdefault(key, []).append((step, value.double().numpy()))

    def _forecast(self, key, step, like):
        value = newton_forecast(self.history[key], step, self.order)
        return torch.from_numpy(value).to(like.dtype)

    def _lowpass(self, x, ratio=None):
        """Fourier storage: what survives of an image-token tensor [B, h*w, D] when only the low-frequency block
        of its rFFT2 over the token grid is kept (the forecast is linear, so low-passing it equals forecasting
        from low-passed factors). FreqCa: its low band, `ratio` = low_band."""
        ratio = self.fourier_ratio if ratio is None else ratio
        if ratio >= 1:
            return x
        h, w = self.grid
        ku, kv = int(ratio * h / 2), int(ratio * w / 2)
        spectrum = torch.fft.rfft2(x.double().reshape(x.shape[0], h, w, -1), dim=(1, 2))
        u = torch.arange(h)
        keep = (torch.minimum(u, h - u) <= ku)[:, None] & (torch.arange(w // 2 + 1) <= kv)[None, :]
        out = torch.fft.irfft2(spectrum * keep[None, :, :, None], s=(h, w), dim=(1, 2))
        return out.reshape(x.shape).to(x.dtype)

    def is_full(self, step):
        return step < self.warmup or (step - self.warmup) % self.interval == 0

    def _skip_whole_stack(self, flux, step, h, e, temb, rope):
        """TeaCache's and MagCache's decision (True: reuse the stack's residual); updates their state."""
        if self.method == "teacache":
            m = flux.modulated_input(h, temb)
            if step == 0 or step == self.steps - 1:
                skip, self.accumulated = False, 0.0
            else:
                self.accumulated += float(np.polyval(self.coefficients,
                                                     fbcache_relative_diff(self.prev_input.numpy(), m.numpy())))
                self.changes.append(self.accumulated)
                skip = self.accumulated < self.threshold
                if not skip:
                    self.accumulated = 0.0
            self.prev_input = m
            return skip
        if step == 0 or step < int(self.retention * self.steps + 0.5):
            return False
        self.ratio *= self.ratios[step]
        self.error += abs(1.0 - self.ratio)
        self.skipped += 1
        self.changes.append(self.error)
        if self.error <= self.threshold and self.skipped <= self.max_skip:
            return True
        self.ratio, self.error, self.skipped = 1.0, 0.0, 0
        return False

    def _static_residual(self, h, p):
        """FastCache's static tokens with a map: the anchor's residual plus W applied to [h - h_a, r_a, 1, p,
        p - p_a, r_a (p - p_a)] (p = step / steps; fastcache.py's docstring), per token, in float64."""
        r0 = self.residual.double()
        dp = p - self.anchor_p[None, :, None]
        one = torch.ones_like(r0[..., :1])
        features = torch.cat([h.double() - self.anchor_h, r0, one, one * p, one * dp, r0 * dp], dim=-1)
        return (r0 + features @ torch.from_numpy(self.static_map).double()).to(h.dtype)

    def _fastcache(self, flux, step, h, e, temb, rope):
        """FastCache as fbcache_ms/fastcache.py states it: chi-square skip at level alpha with the adaptive
        scale tau (exact chi-square quantile here), top-k motion tokens with their RoPE rows, the rest reusing
        (with a static map: their anchor's residual corrected by it)."""
        from scipy.stats import chi2
        x = h.double()
        n_tok = x.shape[1]
        p = step / self.steps if self.static_map is not None else None
        if self.prev_h is not None and step > 0:
            change = x - self.prev_h
            delta = float(torch.sqrt((change ** 2).sum() / (self.prev_h ** 2).sum()))
            per_token = torch.sqrt((change ** 2).sum(-1) / (self.prev_h ** 2).sum(-1))
            tau = max(self.threshold + 0.5 * float(per_token.var(unbiased=False)) - 0.002 * step + 5e-5 * step ** 2, 0.0)
            self.changes.append(delta)
            if delta ** 2 <= tau ** 2 * chi2.ppf(1 - self.alpha, n_tok) / n_tok:
                return flux.head(h + self.residual, temb), False
            if self.motion_ratio < 1:
                k = max(1, math.ceil(self.motion_ratio * n_tok))
                idx = torch.topk((change ** 2).sum(-1).sum(0), k).indices
                txt = e.shape[1]
                rope_k = tuple(torch.cat([r[:txt], r[txt:][idx]]) for r in rope)
                hf, _ = flux.blocks_from(0, h[:, idx], e, temb, rope_k)
                used = self.residual.clone() if self.static_map is None else self._static_residual(h, p)
                used[:, idx] = hf - h[:, idx]
                self.residual = self.residual.clone()
                self.residual[:, idx] = hf - h[:, idx]
                if self.static_map is not None:
                    self.anchor_h, self.anchor_p = self.anchor_h.clone(), self.anchor_p.clone()
                    self.anchor_h[:, idx], self.anchor_p[idx] = x[:, idx], p
                self.prev_h = x
                return flux.head(h + used, temb), True
        hf, _ = flux.blocks_from(0, h, e, temb, rope)
        self.residual, self.prev_h = hf - h, x
        self.anchor_h, self.anchor_p = x, torch.full((n_tok,), step / (self.steps or 1), dtype=torch.float64)
        return flux.head(hf, temb), True

    def _afcache_spans(self, u, step):
        """Per predictor p of unit u: prod over the last p + 1 steps it ran of (step - that step), or None."""
        ran = [s for s, _ in self.history.get(("h", u), [])][::-1]  # newest first
        return [math.prod(step - s for s in ran[:p + 1]) if len(ran) > p else None for p in range(self.order + 1)]

    def _afcache_runs(self, step, sizes):
        """Which units run at `step`, and each unit's best predictor: the stabilities so far, read as cosines per
        unit span and extrapolated to this step's spans."""
        n = len(sizes)
        predicted = np.full((n, self.order + 1), -2.0)
        for u in range(n):
            for p, span in enumerate(self._afcache_spans(u, step)):
                w = 1 - 0.9 ** self.updates[u, p]  # the EMA's weight on measured cosines
                if span is not None and w > 0:
                    mean = (self.stability[u, p] - 0.5 * (1 - w)) / w
                    angle = math.acos(min(1.0, max(-1.0, mean))) * span
                    predicted[u, p] = math.cos(min(angle, math.pi))
        best_p = np.argmax(predicted, 1)  # the first of equal predictions: the lower order
        best_s = predicted[np.arange(n), best_p]
        if self.is_full(step) or (self.budget is None and self.threshold >= 1):
            return np.ones(n, bool), best_p
        if self.budget is None:
            return best_s < self.threshold, best_p
        full = sum(self.is_full(i) for i in range(self.steps))
        blocks = sum(sizes)
        k = int(min(blocks, max(0, math.floor((self.budget * self.steps - full) * blocks / (self.steps - full) + 0.5))))
        run, ran = np.zeros(n, bool), 0
        for u in np.lexsort((np.arange(n), best_s)):  # least stable first, lower index first on ties
            if abs(ran + sizes[u] - k) >= abs(ran - k):  # the units' blocks come no nearer to k
                break
            run[u], ran = True, ran + sizes[u]
        return run, best_p

    def _afcache(self, flux, step, h, e, temb, rope):
        n_double = len(flux.m.transformer_blocks)
        g = self.group_size
        units = [(a, min(a + g, n_double)) for a in range(0, n_double, g)]
        units += [(a, min(a + g, flux.num_blocks)) for a in range(n_double, flux.num_blocks, g)]
        sizes = [b - a for a, b in units]
        if self.stability is None:
            self.stability = np.full((len(units), self.order + 1), 0.5)
            self.updates = np.zeros((len(units), self.order + 1), int)
        run, best_p = self._afcache_runs(step, sizes)
        for u, (first, stop) in enumerate(units):
            keys = (("h", u), ("e", u))
            if run[u]:
                new_h, new_e = flux.blocks(first, stop, h, e, temb, rope)
                fresh = (new_h - h, new_e - e)
                for p, span in enumerate(self._afcache_spans(u, step)):
                    if span is not None:
                        pairs = [(newton_forecast(self.history[k], step, p), r.double().numpy())
                                 for k, r in zip(keys, fresh)]
                        dot = sum((f * r).sum() for f, r in pairs)
                        norms = sum((f * f).sum() for f, _ in pairs) * sum((r * r).sum() for _, r in pairs)
                        per_span = math.cos(math.acos(min(1.0, max(-1.0, dot / math.sqrt(norms)))) / span)
                        self.stability[u, p] = 0.9 * self.stability[u, p] + 0.1 * per_span
                        self.updates[u, p] += 1
                for k, r in zip(keys, fresh):
                    self._remember(k, step, r)
                h, e = new_h, new_e
            else:
                h = h + torch.from_numpy(newton_forecast(self.history[keys[0]], step, best_p[u])).to(h.dtype)
                e = e + torch.from_numpy(newton_forecast(self.history[keys[1]], step, best_p[u])).to(e.dtype)
        self.strategies.append([0 if r else 1 + int(p) for r, p, size in zip(run, best_p, sizes) for _ in range(size)])
        self.stability_trace.append(self.stability.copy())
        return flux.head(h, temb), bool(run.all())

    def step(self, flux, step, *inputs):
        """-> (velocity, computed)."""
        h, e, temb, rope = flux.embed(*inputs)
        if self.method == "afcache":
            return self._afcache(flux, step, h, e, temb, rope)
        if self.method == "fastcache":
            return self._fastcache(flux, step, h, e, temb, rope)
        if self.method in ("teacache", "magcache"):
            if self._skip_whole_stack(flux, step, h, e, temb, rope):
                return flux.head(h + self.residual, temb), False
            hf, _ = flux.blocks_from(0, h, e, temb, rope)
            self.residual = hf - h
            return flux.head(hf, temb), True
        if self.method in ("fbcache", "fbcache_taylorseer"):
            mid_stop = flux.num_blocks - self.bn
            h0, e0 = flux.blocks(0, self.fn, h, e, temb, rope)
            r1 = h0 - h
            hit = False
            if self.prev_r1 is not None and step > 0:
                self.changes.append(fbcache_relative_diff(self.prev_r1.numpy(), r1.numpy()))
                hit = self.changes[-1] < self.threshold
            if hit:
                taylor = self.method == "fbcache_taylorseer"
                hm = h0 + self._lowpass(self._forecast("res", step, h0) if taylor else self.residual)
                em = e0 + (self._forecast("res_e", step, e0) if taylor else self.residual_e)
                hf, _ = flux.blocks(mid_stop, flux.num_blocks, hm, em, temb, rope)
                return flux.head(hf, temb), False
            self.prev_r1 = r1
            hm, em = flux.blocks(self.fn, mid_stop, h0, e0, temb, rope)
            self.residual, self.residual_e = hm - h0, em - e0
            self._remember("res", step, self.residual)
            self._remember("res_e", step, self.residual_e)
            hf, _ = flux.blocks(mid_stop, flux.num_blocks, hm, em, temb, rope)
            return flux.head(hf, temb), True
        full = self.is_full(step)
        if self.variant == "residual" or self.method == "freqca":
            if full:
                hf, _ = flux.blocks_from(0, h, e, temb, rope)
                self._remember("res", step, hf - h)
            elif self.method == "freqca":  # the last residual's low band, the forecast's high band
                last = torch.from_numpy(self.history["res"][-1][1])
                forecast = torch.from_numpy(newton_forecast(self.history["res"], step, self.order))
                low = self._lowpass(last, self.low_band)
                high = forecast - self._lowpass(forecast, self.low_band)
                hf = h + (low + high).to(h.dtype)
            else:
                hf = h + self._lowpass(self._forecast("res", step, h))
            return flux.head(hf, temb), full

        def outputs(key, compute):
            if full:
                value = compute()
                self._remember(key, step, value)
                return value
            return self._forecast(key, step, h)
        return flux.head(flux.per_module_stack(h, e, temb, rope, outputs), temb), full
