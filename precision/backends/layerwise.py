"""The transformers model run one step at a time, every prompt through step i before step i+1 (CPU only).

A step is the embedding, one decoder layer, the final norm or the lm_head, handed out by
precision.backends.model_steps.ModelSteps (resident or streamed from the checkpoint).

The backends here (``hf-layers`` resident, ``hf-streamed`` streamed) capture exactly what the transformers backend
``hf`` captures, bit for bit (tested): each prompt runs alone through each layer, with the mask and rotary
embedding the model's own forward builds, so the order of prompts and layers changes no arithmetic. Runs with
implementation variants (the envelope's members) are not held to any other run's bits: they run their prompts as
one padded batch, reading each step's weights once for all of them. Generation
without a given continuation is greedy with a KV cache per prompt, as transformers' generate() does. When the plan
gives the continuation (teacher forcing: the truth, the envelope members, a target), ``generated_ids`` are the
argmax of the logits at each forced position: what greedy decoding picks given the reference's prefix, which equals
free generation up to the first token where the two differ (recorded in the manifest as the generation mode).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from precision.backends import transformers_compat
from precision.backends.base import Backend
from precision.capture.sites import CaptureSelection
from precision.backends.model_steps import ModelSteps
from precision.errors import BackendError
from precision.names import EMBED, FINAL_NORM, LOGITS, POSITIONS, layer_site
from precision.safetensors_io import write_tensors

log = logging.getLogger(__name__)

GROUP_BYTES = 1 << 30
"""Captured bytes held at most for one group of prompts pushed through the model together (a streamed model is read
once per group, so larger groups read less; the hidden states of the group are held too)."""


def teacher_forced(steps: ModelSteps, sequences: list[Sequence[int]], keep: list[list[int]], *, dtype=None,
                   variants: Sequence[str] = (), layers: set[int] | None = None, batched: bool = False) -> list[dict]:
    """One forward pass per sequence, step by step over all of them: per sequence, the kept rows (``keep``) of every
    site (layers limited to ``layers`` when given) and the logits of those rows, as the transformers backend
    captures them. ``batched``: the sequences run as one batch, right-padded to the longest (causal attention never
    lets a position see the padding after it): one read of each step's weights for all of them instead of one per
    sequence, and products with more rows; the arithmetic of a row may then differ from the unbatched one in its
    last bits, so only variant runs (the envelope's members) are batched, never a reference or a truth."""
    import torch

    kept = [torch.tensor(rows) for rows in keep]
    groups = length_groups([len(s) for s in sequences]) if batched else [[j] for j in range(len(sequences))]
    captured: list[dict] = [{} for _ in sequences]
    with torch.inference_mode():
        hidden = [pad_rows([steps.embed(sequences[j], dtype)[0] for j in group]) for group in groups]
        _keep(captured, EMBED, hidden, groups, sequences, kept)
        for index in range(steps.num_layers):
            with steps.step(layer_site(index), dtype, variants) as layer:
                hidden = [steps.run_layer(layer, h) for h in hidden]
            if layers is None or index in layers:
                _keep(captured, layer_site(index), hidden, groups, sequences, kept)
        with steps.step(FINAL_NORM, dtype, variants) as norm:
            hidden = [norm(h) for h in hidden]
        _keep(captured, FINAL_NORM, hidden, groups, sequences, kept)
        del hidden
        with steps.step(LOGITS, dtype, variants) as head:
            for record in captured:
                record[LOGITS] = head(record[FINAL_NORM])
    return captured


PADDING_SHARE = 0.25
"""A batch pads its sequences to its longest by at most this share of its real tokens: attention costs the square of
the padded length, so one long prompt in a batch of short ones would multiply the batch's cost."""


def length_groups(lengths: list[int], row_budget: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` grouped for padded batches, shortest first: within a group the padding stays under
    PADDING_SHARE of the real tokens, and the padded rows under ``row_budget`` when given."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        longest = lengths[index]  # sorted: the newcomer is the longest
        real = sum(lengths[j] for j in current) + longest
        padded = longest * (len(current) + 1)
        if current and (padded - real > PADDING_SHARE * real or (row_budget is not None and padded > row_budget)):
            groups.append(current)
            current = []
        current.append(index)
    return groups + ([current] if current else [])


def pad_rows(rows: list):
    """[positions, width] tensors as one [batch, longest, width] tensor, zero rows after each."""
    if len(rows) == 1:
        return rows[0].unsqueeze(0)
    batch = rows[0].new_zeros((len(rows), max(r.shape[0] for r in rows), rows[0].shape[1]))
    for k, r in enumerate(rows):
        batch[k, :r.shape[0]] = r
    return batch


def _keep(captured: list[dict], site: str, hidden: list, groups: list[list[int]], sequences: list, kept: list) -> None:
    for batch, group in zip(hidden, groups):
        for k, j in enumerate(group):
            captured[j][site] = batch[k, :len(sequences[j])].index_select(0, kept[j]).clone()


def greedy(steps: ModelSteps, prompts: list[Sequence[int]], max_new_tokens: list[int], stop_ids: Sequence[int]) -> list[list[int]]:
    """Greedy continuations of every prompt (at most ``max_new_tokens`` of its own, stopping after a stop token, which is kept),
    computed as transformers' generate() computes them: a prefill, then one token at a time against a KV cache, the
    next token the argmax of the last position's logits."""
    import torch

    stop = set(stop_ids)
    caches = [transformers_compat.kv_cache(steps.model) for _ in prompts]
    inputs = [list(p) for p in prompts]
    starts = [0 for _ in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    active = [j for j in range(len(prompts)) if max_new_tokens[j] > 0]
    with torch.inference_mode():
        while active:
            hidden = {j: steps.embed(inputs[j]) for j in active}
            config = steps.model.config
            kinds = [transformers_compat.attention_kind(config, index) for index in range(steps.num_layers)]
            masks = {(j, kind): transformers_compat.attention_mask(config, h, caches[j], starts[j], kind) for j, h in hidden.items() for kind in set(kinds)}
            for index in range(steps.num_layers):
                with steps.step(layer_site(index)) as layer:
                    hidden = {j: steps.run_layer(layer, h, cache=caches[j], start=starts[j], mask=masks[j, kinds[index]]) for j, h in hidden.items()}
            with steps.step(FINAL_NORM) as norm, steps.step(LOGITS) as head:
                for j, h in hidden.items():
                    token = int(head(norm(h)[:, -1:, :])[0, -1].float().argmax())
                    generated[j].append(token)
                    starts[j] += len(inputs[j])
                    inputs[j] = [token]
            active = [j for j in active if generated[j][-1] not in stop and len(generated[j]) < max_new_tokens[j]]
    return generated


_LENT: list[ModelSteps] = []


@contextlib.contextmanager
def lending(steps: ModelSteps) -> Iterator[ModelSteps]:
    """Inside the block, a layer-by-layer backend of the same model, dtype and mode uses ``steps`` instead of
    loading its own: the envelope's members, run one after another, share one loaded model."""
    _LENT.append(steps)
    try:
        yield steps
    finally:
        _LENT.remove(steps)


class LayerwiseBackend(Backend):
    """``hf-layers``: the transformers model resident, run step by step over a group of prompts."""

    name = "hf-layers"
    streamed = False

    def validate(self) -> None:
        super().validate()
        if self.spec.device not in (None, "cpu"):
            raise BackendError(f"{self.spec}: the layer-by-layer backends run on the CPU only; use hf:{self.spec.device} for a device")
        from precision.backends.variants import parse_variant

        for text in self.options.variants:
            if parse_variant(text).fault:
                raise BackendError(f"{self.spec}: faults apply to the transformers backend (hf); {text!r} is one")

    def _activate_impl(self) -> None:
        import torch

        self.validate()
        dtype = getattr(torch, self.spec.torch_dtype_name)
        lent = [s for s in _LENT if (s.path, s.dtype, s.streamed) == (self.model.path, dtype, self.streamed)]
        self._steps = lent[-1] if lent else ModelSteps(self.model.path, self.spec.torch_dtype_name, streamed=self.streamed,
                                                       trust_remote_code=self.options.trust_remote_code)
        self._planned: list[tuple[tuple[int, ...], tuple[int, ...] | None, int]] = []
        self._selection = CaptureSelection()
        self._done: set[tuple[int, ...]] = set()
        self._generated: dict[tuple[int, ...], list[int]] = {}
        self._captured: dict[tuple[int, ...], dict] = {}

    def _deactivate_impl(self) -> None:
        self._steps = None
        self._generated, self._captured = {}, {}

    def prepare(self, planned: list[tuple[Sequence[int], Sequence[int] | None, int]], selection: CaptureSelection) -> None:
        """The prompts about to be captured, in order: (prompt ids, the continuation to force or None, max new
        tokens), and what is kept of them. Groups of them are then computed together, each step once per group."""
        self._planned = [(tuple(p), None if c is None else tuple(c), n) for p, c, n in planned]
        self._selection = selection

    def _group_from(self, prompt_ids: tuple[int, ...], max_new_tokens: int) -> list[tuple[tuple[int, ...], tuple[int, ...] | None, int]]:
        """The planned prompts from ``prompt_ids`` on whose captures fit in GROUP_BYTES (at least that one); a
        prompt asked for again (a repeat) or not planned is a group of its own."""
        start = next((i for i, planned in enumerate(self._planned) if planned[0] == prompt_ids), None)
        if start is None or prompt_ids in self._done:
            return [(prompt_ids, None, max_new_tokens)]
        width = self.model.hidden_size * (self.model.num_layers + 2) + self.model.vocab_size
        group, total = [], 0
        for planned in self._planned[start:]:
            tokens = len(planned[0]) + (len(planned[1]) if planned[1] is not None else planned[2])
            total += tokens * width * self._steps.dtype.itemsize
            if group and total > GROUP_BYTES:
                break
            group.append(planned)
        return group

    def _generate_impl(self, token_ids: list[int], max_new_tokens: int) -> Sequence[int]:
        key = tuple(token_ids)
        if key not in self._generated:
            self._compute(self._group_from(key, max_new_tokens))
        return self._generated.pop(key)

    def _compute(self, group: list[tuple[tuple[int, ...], tuple[int, ...] | None, int]]) -> None:
        """Generate what the group does not force, then one teacher-forced pass over every sequence of the group;
        kept for the generate and capture calls that follow."""
        free = [(prompt, limit) for prompt, continuation, limit in group if continuation is None]
        sequences = [(prompt, continuation, True) for prompt, continuation, _ in group if continuation is not None]
        if free:
            tokens = greedy(self._steps, [p for p, _ in free], [n for _, n in free], list(self.model.stop_token_ids))
            sequences += [(prompt, tuple(generated), False) for (prompt, _), generated in zip(free, tokens)]
        whole = [prompt + continuation for prompt, continuation, _ in sequences]
        results = teacher_forced(self._steps, whole, [self._selection.position_indices(len(s)) for s in whole],
                                 variants=self.options.variants, layers=set(self._selection.layer_indices(self._steps.num_layers)),
                                 batched=bool(self.options.variants))
        for (prompt, continuation, forced), sequence, result in zip(sequences, whole, results):
            self._generated[prompt] = list(continuation) if not forced else self._picks(result, len(prompt), len(sequence))
            self._captured[sequence] = result
            self._done.add(prompt)

    def _picks(self, result: dict, prompt_length: int, length: int) -> list[int]:
        """The argmax of the logits at each forced position (the greedy pick given the forced prefix)."""
        positions = self._selection.position_indices(length)
        wanted = range(prompt_length - 1, length - 1)
        if not set(wanted) <= set(positions):
            return []  # the logits of those positions were not kept: no pick to report
        rows = [positions.index(p) for p in wanted]
        return result[LOGITS][rows].float().argmax(-1).tolist()

    def _capture_impl(self, token_ids: list[int], selection: CaptureSelection, path: Path) -> None:
        import torch

        sequence = tuple(token_ids)
        if selection != self._selection:
            self._selection = selection
            self._captured.clear()
        captured = self._captured.pop(sequence, None)
        if captured is None:
            captured = teacher_forced(self._steps, [sequence], [selection.position_indices(len(sequence))], variants=self.options.variants,
                                      layers=set(selection.layer_indices(self._steps.num_layers)))[0]
        captured[POSITIONS] = torch.tensor(selection.position_indices(len(sequence)), dtype=torch.int64)
        write_tensors(path, captured)

    def _describe_impl(self) -> dict[str, Any]:
        return {
            "engine": "transformers",
            "execution": "layer-streamed" if self.streamed else "layer-by-layer",
            "dtype": self.spec.torch_dtype_name,
            "attn_implementation": transformers_compat.attn_implementation(self._steps.model),
            "settings": {"trust_remote_code": self.options.trust_remote_code, "seed": self.options.seed},
            "variants": list(self.options.variants),
            "generation": "greedy with a KV cache when free; argmax at each forced position when teacher-forced",
            "device": "cpu",
            "torch_threads": _threads(),
        }


class StreamedBackend(LayerwiseBackend):
    """``hf-streamed``: one step's weights resident at a time, read from the checkpoint (see the module docstring)."""

    name = "hf-streamed"
    streamed = True


def _threads() -> int:
    import torch

    return torch.get_num_threads()
