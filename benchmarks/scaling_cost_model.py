"""The cost model of docs/scaling.md: parameters, bytes and FLOPs of the CPU side (reference BF16, FP32 truth,
envelope, replay) for a Llama-3-70B and a DeepSeek-V3 (671B) shape, whole-model and layer-streamed, per worker
when the prompts are split over N workers. Arithmetic from the published model configs; nothing here is measured.

    .venv/bin/python benchmarks/scaling_cost_model.py            # prints the tables docs/scaling.md quotes

tests/test_scaling_doc.py checks that the document quotes exactly these tables and that the parameter counts
reproduce the totals the model authors publish (70.6B; 671B with 36.6B activated for DeepSeek-V3).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
TB = 1e12
PFLOP = 1e15
BF16, FP32 = 2, 4
"""Bytes per element."""


@dataclass(frozen=True)
class Moe:
    first_dense: int
    """Decoder layers before the first MoE layer (dense FFN)."""
    routed: int
    shared: int
    active: int
    """Routed experts per token."""
    expert_intermediate: int


@dataclass(frozen=True)
class Mla:
    q_rank: int
    kv_rank: int
    rope_dim: int


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    qk_head_dim: int
    """Per-head query/key width (MLA: the no-rope part plus the rope part)."""
    v_head_dim: int
    intermediate: int
    """Dense FFN width."""
    tied: bool
    moe: Moe | None = None
    mla: Mla | None = None
    linear_bytes: float = BF16
    """Checkpoint bytes per decoder-layer linear weight (FP8 with 128x128 block scales: 1 + 4/16384)."""

    # -- parameters -------------------------------------------------------------------------------------------------
    def attention(self) -> int:
        d, h = self.hidden, self.heads
        if self.mla is None:
            return d * h * self.qk_head_dim + 2 * d * self.kv_heads * self.qk_head_dim + h * self.v_head_dim * d
        m, nope = self.mla, self.qk_head_dim - self.mla.rope_dim
        return (d * m.q_rank + m.q_rank * h * self.qk_head_dim          # q down, q up
                + d * (m.kv_rank + m.rope_dim)                           # kv down (+ shared rope key)
                + m.kv_rank * h * (nope + self.v_head_dim)               # kv up
                + h * self.v_head_dim * d + m.q_rank + m.kv_rank)        # output; the two low-rank norms

    def mlp(self, width: int) -> int:
        return 3 * self.hidden * width  # gate, up, down (SwiGLU)

    def ffn(self, layer: int) -> tuple[int, int]:
        """(all, active per token) FFN parameters of decoder layer ``layer``."""
        if self.moe is None or layer < self.moe.first_dense:
            dense = self.mlp(self.intermediate)
            return dense, dense
        e, router = self.mlp(self.moe.expert_intermediate), self.hidden * self.moe.routed
        return (self.moe.routed + self.moe.shared) * e + router, (self.moe.active + self.moe.shared) * e + router

    def layer(self, layer: int) -> tuple[int, int]:
        ffn_all, ffn_active = self.ffn(layer)
        norms = 2 * self.hidden
        return self.attention() + ffn_all + norms, self.attention() + ffn_active + norms

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    def totals(self) -> tuple[int, int]:
        """(all, activated per token) parameters: embedding, decoder layers, final norm, lm_head."""
        head = 0 if self.tied else self.embedding
        layers = [self.layer(i) for i in range(self.layers)]
        extra = self.embedding + self.hidden + head
        return sum(a for a, _ in layers) + extra, sum(b for _, b in layers) + extra

    @property
    def matmul_params(self) -> int:
        """Parameters each token multiplies (activated, without the embedding table, which is a row lookup)."""
        return self.totals()[1] - self.embedding

    def largest_step(self) -> int:
        """Parameters of the largest step a layer-streamed run holds: one decoder layer, or the embedding / lm_head."""
        return max(max(self.layer(i)[0] for i in range(self.layers)), self.embedding)

    def checkpoint_bytes(self) -> float:
        decoder = sum(self.layer(i)[0] for i in range(self.layers))
        rest = self.totals()[0] - decoder
        return decoder * self.linear_bytes + rest * BF16

    # -- per token and per sequence -----------------------------------------------------------------------------------
    @property
    def capture_row(self) -> int:
        """Elements captured per position: embed, every layer, final_norm (hidden each) and the logits (vocab)."""
        return (self.layers + 2) * self.hidden + self.vocab

    def kv_cache(self, tokens: int, dtype: int) -> int:
        """Bytes of transformers' KV cache for one sequence (MLA: the decompressed per-head keys and values)."""
        if self.mla is None:
            return 2 * self.layers * tokens * self.kv_heads * self.qk_head_dim * dtype
        return self.layers * tokens * self.heads * (self.qk_head_dim + self.v_head_dim) * dtype

    def forward_flops(self, tokens: int, sum_squares: int) -> float:
        """One forward pass over sequences of ``tokens`` positions in all (sum of squared lengths ``sum_squares``):
        2 FLOPs per multiply-add of every activated weight and token, plus causal attention, t^2/2 scores of width
        d_qk and t^2/2 weighted values of width d_v per head and layer: L * heads * (d_qk + d_v) * t^2."""
        return 2 * self.matmul_params * tokens + self.layers * self.heads * (self.qk_head_dim + self.v_head_dim) * sum_squares


LLAMA3_70B = Shape("Llama-3-70B", layers=80, hidden=8192, vocab=128256, heads=64, kv_heads=8, qk_head_dim=128, v_head_dim=128,
                   intermediate=28672, tied=False)
DEEPSEEK_V3 = Shape("DeepSeek-V3 (671B)", layers=61, hidden=7168, vocab=129280, heads=128, kv_heads=128, qk_head_dim=192, v_head_dim=128,
                    intermediate=18432, tied=False, moe=Moe(first_dense=3, routed=256, shared=1, active=8, expert_intermediate=2048),
                    mla=Mla(q_rank=1536, kv_rank=512, rope_dim=64), linear_bytes=1 + 4 / (128 * 128))


@dataclass(frozen=True)
class Workload:
    prompts: int = 64
    tokens: int = 1024
    """Teacher-forced length of every prompt (prompt plus continuation)."""
    workers: int = 8
    members: int = 8
    """Envelope members (implementation variants of the reference)."""
    group_bytes: float = 2 ** 30
    """precision.backends.layerwise.GROUP_BYTES: captured bytes a streamed group holds (at least one prompt)."""

    @property
    def total_tokens(self) -> int:
        return self.prompts * self.tokens

    @property
    def sum_squares(self) -> int:
        return self.prompts * self.tokens ** 2


WORKLOAD = Workload()


def _size(value: float) -> str:
    return f"{value / TB:.2f} TB" if value >= TB else f"{value / GB:.1f} GB" if value >= 0.1 * GB else f"{value / 1e6:.0f} MB"


def model_table(shapes=(LLAMA3_70B, DEEPSEEK_V3)) -> str:
    rows = ["| | " + " | ".join(s.name for s in shapes) + " |", "|---|" + "---|" * len(shapes)]

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(s) for s in shapes) + " |")

    row("parameters P (all)", lambda s: f"{s.totals()[0] / 1e9:.2f} B")
    row("multiplied per token, P_mm (activated, without the embedding lookup)", lambda s: f"{s.matmul_params / 1e9:.2f} B")
    row("checkpoint on disk", lambda s: _size(s.checkpoint_bytes()) + (" (FP8 + block scales)" if s.linear_bytes < BF16 else " (BF16)"))
    row("whole model in BF16 / FP32", lambda s: f"{_size(BF16 * s.totals()[0])} / {_size(FP32 * s.totals()[0])}")
    row("largest step (a decoder layer, or the embedding / lm_head) in BF16 / FP32", lambda s: f"{_size(BF16 * s.largest_step())} / {_size(FP32 * s.largest_step())}")
    row("one layer's attention / one routed expert, BF16",
        lambda s: f"{_size(BF16 * s.attention())} / " + (_size(BF16 * s.mlp(s.moe.expert_intermediate)) if s.moe else "(dense)"))
    row("captured elements per position, (L+2)·d + V", lambda s: f"{s.capture_row:,}")
    row("capture bytes per position, BF16 / FP32", lambda s: f"{s.capture_row * BF16 / 1e6:.2f} / {s.capture_row * FP32 / 1e6:.2f} MB")
    row("KV cache of one 1,024-token prompt, BF16 / FP32", lambda s: f"{_size(s.kv_cache(1024, BF16))} / {_size(s.kv_cache(1024, FP32))}")
    return "\n".join(rows)


STAGES = (
    # name, dtype of the weights, passes with hf (whole model), passes with hf-streamed, captures written
    ("reference BF16", BF16, 2, 2, 1),
    ("FP32 truth", FP32, 2, 1, 1),
    ("envelope (8 members)", BF16, 2 * WORKLOAD.members, WORKLOAD.members, WORKLOAD.members),
    ("replay (target + 8 members BF16, target FP32)", None, 1 + WORKLOAD.members + 1, 1 + WORKLOAD.members + 1, 0),
)


def stage_table(shape: Shape, work: Workload = WORKLOAD) -> str:
    n = work.workers
    forward = shape.forward_flops(work.total_tokens, work.sum_squares)
    prompt_capture = work.tokens * shape.capture_row
    per_group = max(1, int(work.group_bytes // (prompt_capture * BF16)))
    groups_per_worker = -(-work.prompts // n // per_group)
    worker_prompts = -(-work.prompts // n)
    ckpt = shape.checkpoint_bytes()
    rows = ["| stage | PFLOP, all workers, whole / streamed | capture written per worker | memory per worker, whole model | memory per worker, "
            "layer-streamed | checkpoint read per worker, whole / streamed |", "|---|---|---|---|---|---|"]
    for name, dtype, passes_whole, passes_streamed, captures in STAGES:
        held_dtype = dtype or BF16
        written = captures * worker_prompts * prompt_capture * held_dtype
        if dtype is None:  # replay: the BF16 model resident, one step at a time in FP32 beside it
            whole = BF16 * shape.totals()[0] + FP32 * shape.largest_step()
            streamed = (BF16 + FP32) * shape.largest_step()
            flops = f"{(passes_whole - 1) * forward / PFLOP:,.0f} + {forward / PFLOP:,.0f} (FP32)"
        else:
            whole = dtype * shape.totals()[0] + shape.kv_cache(work.tokens, dtype) + prompt_capture * dtype
            streamed = dtype * shape.largest_step() + per_group * (shape.kv_cache(work.tokens, dtype) + prompt_capture * dtype)
            flops = f"{passes_whole * forward / PFLOP:,.0f} / {passes_streamed * forward / PFLOP:,.0f}"
        # Each capture loads the model once (whole) or reads every step once per group (streamed); the replay
        # makes one pass over the steps for all its captures.
        reads_whole, reads_streamed = (captures, captures * groups_per_worker) if captures else (1, 1)
        rows.append(f"| {name} | {flops} | {_size(written) if written else '-'} | {_size(whole)} | {_size(streamed)} | "
                    f"{_size(reads_whole * ckpt)} / {_size(reads_streamed * ckpt)} |")
    return "\n".join(rows)


def workload_line(work: Workload = WORKLOAD) -> str:
    return (f"{work.prompts} prompts x {work.tokens:,} teacher-forced tokens = {work.total_tokens:,} tokens, over N = {work.workers} "
            f"workers ({-(-work.prompts // work.workers)} prompts each)")


def forward_line(shape: Shape, work: Workload = WORKLOAD) -> str:
    matmul = 2 * shape.matmul_params * work.total_tokens
    attention = shape.forward_flops(work.total_tokens, work.sum_squares) - matmul
    return (f"{shape.name}: one forward pass over the workload = 2 · {shape.matmul_params / 1e9:.2f}e9 · {work.total_tokens:,} "
            f"+ {shape.layers} · {shape.heads} · {shape.qk_head_dim + shape.v_head_dim} · {work.prompts} · {work.tokens:,}² "
            f"= {matmul / PFLOP:.1f} + {attention / PFLOP:.1f} = {(matmul + attention) / PFLOP:.1f} PFLOP")


def boundary_line(shape: Shape, work: Workload = WORKLOAD) -> str:
    """What a layer-range split over hosts moves instead of weights: the residual stream at a range boundary."""
    moved = work.total_tokens * shape.hidden * BF16
    return (f"{shape.name}: hidden states crossing one layer-range boundary = {work.total_tokens:,} · {shape.hidden:,} · 2 bytes = "
            f"{_size(moved)} (BF16), against {_size(shape.checkpoint_bytes())} of checkpoint")


def document_tables() -> list[str]:
    """Every table and worked line docs/scaling.md quotes, in order."""
    return [workload_line(), model_table(), forward_line(LLAMA3_70B), forward_line(DEEPSEEK_V3),
            stage_table(LLAMA3_70B), stage_table(DEEPSEEK_V3), boundary_line(LLAMA3_70B), boundary_line(DEEPSEEK_V3)]


if __name__ == "__main__":
    print("\n\n".join(document_tables()))
