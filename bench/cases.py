"""What the benchmark measures: the headline set, the full set and the scaling sweep (BENCHMARK.md).

A *case* is one (shape, configuration, input set). For each case the suite times the whole SSA op and each
branch; the dense baselines are timed once per (shape, heads), because they do not depend on the block sizes
or on how the compressed keys were made (v1.1 and v1.0 share theirs).

The scaling sweep runs shells of other resolutions at ``tau = 1.8`` (the thickness of shell-1024 and shell-2048),
from about 13k to about 1M tokens; at R = 128 and R = 256 the sweep *is* shell-1024 and shell-2048, so those two
points are not measured twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ssa_kernels.shapes import CONFIGS, SHAPES, SSAConfig, shape_coords, shell_coords
from ssa_kernels.layout import layout_order

#: The two input sets of BENCHMARK.md: k_cmp = mean(k) * sqrt(count) (headline) or the plain mean.
INPUTS_SCALED = "scaled"
INPUTS_PLAIN = "plain-mean"
INPUT_SETS = (INPUTS_SCALED, INPUTS_PLAIN)

#: The headline configuration and shape (BENCHMARK.md, in bold there).
HEADLINE_CONFIG = "v1.1"
HEADLINE_SHAPE = "shell-1024"

#: SSA components: the whole op and each branch. ``scoring_topk`` has no backward (no gradient flows through the
#: choice); ``flex_selection`` is FlexAttention running SSA's selection as a block mask (full set only).
COMPONENT_OP = "op"
COMPONENT_COMPRESSION = "compression"
COMPONENT_SCORING = "scoring_topk"
COMPONENT_SELECTION = "selection"
COMPONENT_WINDOW = "window"
COMPONENT_FLEX_SELECTION = "flex_selection"
SSA_COMPONENTS = (COMPONENT_OP, COMPONENT_COMPRESSION, COMPONENT_SCORING, COMPONENT_SELECTION, COMPONENT_WINDOW)
#: Components whose work depends on how k_cmp is scaled; the others are the same work on both input sets, so the
#: plain-mean set measures only these.
INPUT_SENSITIVE_COMPONENTS = (COMPONENT_OP, COMPONENT_SCORING, COMPONENT_SELECTION)
FORWARD_ONLY_COMPONENTS = (COMPONENT_SCORING,)

#: Passes that are measured. The backward is derived: (fwd+bwd) - fwd, both medians from the same process.
PASS_FWD = "fwd"
PASS_FWDBWD = "fwdbwd"
MEASURED_PASSES = (PASS_FWD, PASS_FWDBWD)

#: Dense baselines: FlashAttention-2, cuDNN attention, FlashAttention-3/4 and FlexAttention (compiled, full).
DENSE_IMPLS = ("fa2", "cudnn", "fa3", "fa4", "flex")

#: Scaling sweep: (resolution R, tau) of extra shells, named ``sweep-R<R>``. R = 128 / 256 reuse shell-1024 / 2048.
SWEEP_TAU = 1.8
SWEEP_RESOLUTIONS = (40, 64, 96, 128, 192, 256, 352)
_SWEEP_REUSE = {128: "shell-1024", 256: "shell-2048"}


@dataclass(frozen=True)
class Case:
    """One SSA case: a token set, a configuration and an input set, with the components to time."""

    shape: str
    config: str
    inputs: str
    components: tuple[str, ...]
    full_only: bool = False

    @property
    def cfg(self) -> SSAConfig:
        return CONFIGS[self.config]

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.config}-{self.inputs}"


@dataclass(frozen=True)
class DenseCase:
    """One dense-baseline case: a token set and head configuration (k/v repeated to Hq where needed)."""

    shape: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    configs: tuple[str, ...]  # the configurations of this run that share these heads
    full_only: bool = False

    @property
    def heads(self) -> str:
        return heads_label(self.num_q_heads, self.num_kv_heads, self.head_dim)

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.heads}"


def heads_label(hq: int, hkv: int, d: int) -> str:
    """``h32kv2d32`` for 32 query heads, 2 kv heads, head dim 32."""
    return f"h{hq}kv{hkv}d{d}"


def config_heads(name: str) -> str:
    c = CONFIGS[name]
    return heads_label(c.num_q_heads, c.num_kv_heads, c.head_dim)


def sweep_shape_names() -> list[str]:
    """Shape names of the sweep, smallest first (two of them are the named shells)."""
    return [_SWEEP_REUSE.get(r, f"sweep-R{r}") for r in SWEEP_RESOLUTIONS]


def _sweep_resolution(name: str) -> int:
    prefix = "sweep-R"
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)} and {sweep_shape_names()}")
    return int(name[len(prefix):])


def shape_description(name: str) -> str:
    """How a shape is made, for reports: ``shell R=128 tau=1.8``."""
    if name in SHAPES:
        s = SHAPES[name]
        return f"shell R={s.resolution} tau={s.tau}"
    return f"shell R={_sweep_resolution(name)} tau={SWEEP_TAU}"


@lru_cache(maxsize=None)
def _coords_cached(name: str, compression_block: int, selection_block: int) -> torch.Tensor:
    if name in SHAPES:
        return shape_coords(name, compression_block=compression_block, selection_block=selection_block)
    coords = shell_coords(_sweep_resolution(name), SWEEP_TAU)
    perm = layout_order(coords, compression_block=compression_block, selection_block=selection_block)
    return coords[perm].contiguous()


def case_coords(name: str, *, compression_block: int, selection_block: int, max_tokens: int | None = None):
    """Coordinates ``[N, 4]`` int32 (CPU) of a named or sweep shape in layout order.

    ``max_tokens`` keeps a prefix (still in layout order): the dry run uses it to stay tiny.
    """
    coords = _coords_cached(name, compression_block, selection_block)
    return coords[:max_tokens] if max_tokens is not None else coords


def headline_cases() -> list[Case]:
    """shell-1024 with v1.1, v1.0, d64 and d128, shell-512 and shell-2048 with v1.1; scaled inputs; every
    component."""
    pairs = (("shell-1024", "v1.1"), ("shell-1024", "v1.0"), ("shell-1024", "d64"), ("shell-1024", "d128"),
             ("shell-512", "v1.1"), ("shell-2048", "v1.1"))
    return [Case(s, c, INPUTS_SCALED, SSA_COMPONENTS) for s, c in pairs]


def full_cases() -> list[Case]:
    """The headline cases first, then every shape x configuration x input set and the sweep (v1.1, scaled, op)."""
    cases = headline_cases()
    seen = {(c.shape, c.config, c.inputs) for c in cases}
    for shape in SHAPES:
        for config in CONFIGS:
            for inputs in INPUT_SETS:
                if (shape, config, inputs) in seen:
                    continue
                comps = SSA_COMPONENTS if inputs == INPUTS_SCALED else INPUT_SENSITIVE_COMPONENTS
                cases.append(Case(shape, config, inputs, comps, full_only=True))
                seen.add((shape, config, inputs))
    for shape in sweep_shape_names():
        if (shape, HEADLINE_CONFIG, INPUTS_SCALED) not in seen:
            cases.append(Case(shape, HEADLINE_CONFIG, INPUTS_SCALED, (COMPONENT_OP,), full_only=True))
            seen.add((shape, HEADLINE_CONFIG, INPUTS_SCALED))
    # FlexAttention running the selection as a block mask: on the named shapes, scaled inputs (full set only).
    flex = [Case(c.shape, c.config, c.inputs, (COMPONENT_FLEX_SELECTION,), full_only=True)
            for c in cases if c.shape in SHAPES and c.inputs == INPUTS_SCALED]
    return cases + flex


def dense_cases(cases: list[Case]) -> list[DenseCase]:
    """One dense case per (shape, heads) of the SSA cases, in first-appearance order."""
    out: dict[tuple[str, str], DenseCase] = {}
    for c in cases:
        cfg = c.cfg
        key = (c.shape, config_heads(c.config))
        if key in out:
            d = out[key]
            configs = d.configs if c.config in d.configs else d.configs + (c.config,)
            out[key] = DenseCase(d.shape, d.num_q_heads, d.num_kv_heads, d.head_dim, configs,
                                 d.full_only and c.full_only)
        else:
            out[key] = DenseCase(c.shape, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, (c.config,), c.full_only)
    return list(out.values())


# ------------------------------------------------------------------------------------------------------------------
# Benchmark items (what bench/conftest.py parametrises) and the order they run in
# ------------------------------------------------------------------------------------------------------------------

#: Dense baselines up to this many tokens are timed early (right after the SSA whole op); larger ones late.
EARLY_DENSE_TOKENS = 200_000
#: Dense baselines that are the reference of every speedup (the others are extras, timed last).
PRIMARY_BASELINES = ("fa2", "cudnn")
#: Order tiers (lower runs first); full-only items get FULL_TIER_OFFSET added.
(TIER_CPU, TIER_CEILING, TIER_SSA_OP, TIER_DENSE_EARLY, TIER_BRANCHES, TIER_DENSE_LATE, TIER_EXTRAS,
 TIER_EXTRAS_OTHER) = range(-1, 7)
FULL_TIER_OFFSET = 10


@dataclass(frozen=True)
class Item:
    """One benchmark item: ``kind`` is ``ssa`` (a component of a case), ``layout``, ``dense`` or ``ceiling``."""

    kind: str
    tier: int
    case: Case | None = None
    dcase: DenseCase | None = None
    what: str | None = None  # SSA component or dense implementation
    passname: str | None = None
    full_only: bool = False

    @property
    def shape(self):
        return self.case.shape if self.case else self.dcase.shape if self.dcase else None

    @property
    def id(self) -> str:
        base = self.case.id if self.case else self.dcase.id if self.dcase else self.kind
        return "-".join(x for x in (base, self.what, self.passname) if x)

    @property
    def cost_key(self):
        return (self.kind, self.what, self.passname)


def _approx_tokens(shape: str) -> int:
    """Token count for ordering: exact for the named shapes; a shell's area scales like R^2 for the sweep."""
    if shape in SHAPES:
        return SHAPES[shape].tokens
    ref = SHAPES[HEADLINE_SHAPE]
    return int(ref.tokens * (_sweep_resolution(shape) / ref.resolution) ** 2)


def build_items(full: bool, baselines: tuple[str, ...]) -> dict[str, list[Item]]:
    """The parametrisation of each GPU test function, with the order tier of every item."""
    cases = full_cases() if full else headline_cases()
    ssa, layout, dense = [], [], []
    for c in cases:
        off = FULL_TIER_OFFSET if c.full_only else 0
        for comp in c.components:
            tier = (TIER_SSA_OP if comp == COMPONENT_OP else TIER_BRANCHES) + off
            passes = MEASURED_PASSES[:1] if comp in FORWARD_ONLY_COMPONENTS else MEASURED_PASSES
            ssa += [Item("ssa", tier, case=c, what=comp, passname=p, full_only=c.full_only) for p in passes]
    seen_layout = set()
    for c in cases:
        key = (c.shape, c.config)
        if key not in seen_layout:
            seen_layout.add(key)
            layout.append(Item("layout", TIER_BRANCHES + (FULL_TIER_OFFSET if c.full_only else 0), case=c,
                               what="build", full_only=c.full_only))
    for dc in dense_cases(cases):
        off = FULL_TIER_OFFSET if dc.full_only else 0
        early = _approx_tokens(dc.shape) <= EARLY_DENSE_TOKENS
        for impl in baselines:
            if impl in PRIMARY_BASELINES:
                tier = TIER_DENSE_EARLY if early else TIER_DENSE_LATE
            else:  # extras last, the headline shape's first
                tier = TIER_EXTRAS if dc.shape == HEADLINE_SHAPE else TIER_EXTRAS_OTHER
            dense += [Item("dense", tier + off, dcase=dc, what=impl, passname=p, full_only=dc.full_only)
                      for p in MEASURED_PASSES]
    return {"ssa_item": ssa, "layout_item": layout, "dense_item": dense,
            "ceiling_item": [Item("ceiling", TIER_CEILING, what="matmul")]}
