"""Per-step cache statistics of one pipeline call: which steps computed, which reused, blocks run."""
from dataclasses import dataclass, field


@dataclass
class CacheStats:
    method: str
    total_blocks: int  # blocks of a full step
    computed: dict = field(default_factory=dict)  # branch -> [bool per step]
    blocks_run: dict = field(default_factory=dict)  # branch -> [blocks per step; fractional: token-reduced steps]
    changes: dict = field(default_factory=dict)  # branch -> [FBCache relative change per step, None if none]
    state_bytes: int = 0  # bytes of cache state held (all branches, the whole batch)
    tokens: dict = field(default_factory=dict)  # branch -> [image tokens through the stack per step] (FastCache)
    strategies: dict = field(default_factory=dict)  # branch -> [per step: per block 0 ran, 1 + p forecast] (AFCache)
    stability: dict = field(default_factory=dict)  # branch -> [per step: per unit, per predictor, after it] (AFCache)

    def record(self, branch, computed, blocks, change=None, tokens=None):
        self.computed.setdefault(branch, []).append(bool(computed))
        self.blocks_run.setdefault(branch, []).append(float(blocks))
        self.changes.setdefault(branch, []).append(None if change is None or change < 0 else float(change))
        if tokens is not None:
            self.tokens.setdefault(branch, []).append(int(tokens))

    def pattern(self, branch="cond"):
        """'C' for a computed step, '.' for a reused one, e.g. 'CCC.C..C'."""
        return "".join("C" if c else "." for c in self.computed.get(branch, []))

    def hits(self, branch="cond"):
        return sum(not c for c in self.computed.get(branch, []))

    def block_fraction(self):
        """Blocks run / blocks of an uncached run, over all branches and steps: 1 / (ideal speedup)."""
        run = sum(sum(v) for v in self.blocks_run.values())
        full = sum(len(v) for v in self.blocks_run.values()) * self.total_blocks
        return run / full if full else 1.0

    def summary(self):
        lines = [f"{branch}: {self.pattern(branch)}  {self.hits(branch)}/{len(flags)} steps reused"
                 for branch, flags in self.computed.items()]
        lines += [f"{branch}: image tokens run per step {counts}" for branch, counts in self.tokens.items()]
        lines.append(f"blocks run: {self.block_fraction():.1%} of uncached")
        lines.append(f"cache state: {self.state_bytes / 2 ** 20:.2f} MiB")
        return "; ".join(lines)
