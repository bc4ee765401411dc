"""Runs inside vLLM's worker for serving-configuration parity (mixed in via ``worker_extension_cls``).

The capture worker (precision.backends.vllm_worker) insists on one eager step holding exactly one prompt. A
serving configuration breaks that on purpose, so this worker keeps rows by *request and position* instead:

- every forward step, the rows of the step's flattened [num_tokens, width] tensors are split by request
  (vllm_compat.step_request_rows: the runner's query_start_loc and request states, read while the forward runs);
- a request takes part when its prompt is a prefix of the armed sequence (the sequence itself, or a warm-up
  request that filled the prefix cache); unrelated co-batched requests are skipped;
- each row is stored under its absolute position (the decoder layers' ``positions`` input), so chunked prefill
  (several steps), co-batching (part of a step) and a prefix-cache hit (positions computed by an earlier request,
  the rest now) all assemble into one row per position; which request computed each position is recorded;
- a position computed again (a preempted request recomputed from scratch, or a warm request recomputing the tail
  of a block the cold one computed) keeps its LAST computation, the one the request's output derives from, and the
  recomputation is recorded: rows computed again per site, whether each was bitwise the earlier computation (and
  the largest absolute difference), and the restarts seen (the same request's rows starting again at or below a
  position it had already computed: vLLM recomputes a preempted request from position 0).

Two levels of detail come out of the same hooks: where the decoder layers' Python hooks fire (eager modes),
every site; where the model body runs as a compiled graph (torch.compile: the layers' hooks never fire), only the
outer model's output, the final-norm states of every position, from which ``compute_logits`` (Python, outside the
graph) gives the full-vocabulary logits. Call counts of both kinds of hook, and vLLM's compilation counters, are
returned as the evidence of which one ran.
"""

from __future__ import annotations

from typing import Any

from precision.backends import vllm_compat
from precision.backends.vllm_platform import engine_identity
from precision.errors import BackendError
from precision.names import DETAIL_LAYERS, DETAIL_LOGITS, EMBED, FINAL_NORM, LAYER_PREFIX, LOGITS, POSITIONS, layer_site

OUTER = "outer_model"
"""The outer model's forward (LlamaForCausalLM & co.): it runs in Python in every mode; its output is the
final-norm state of every row, whether the body ran eagerly or as a compiled graph."""


COMPILED_GRAPH = "compiled_graph"
"""Entries into the decoder body's compiled graph while armed (vllm_compat.count_compiled_graph_calls): the proof
that a captured forward ran the graph, beside the compilation counters that show it was built."""


class ServingWorkerExtension:
    """Mixed into vLLM's Worker: ``self`` is the worker. State lives under ``_parity_*`` names, apart from the capture
    worker's (vLLM refuses an extension whose names the worker class already has, and one process may run both)."""

    def parity_install_hooks(self) -> dict[str, Any]:
        model = vllm_compat.worker_model(self)
        embed_tokens, layers, norm = vllm_compat.decoder_modules(model)
        self._parity_armed = False
        self._parity_reset([], None)
        handles = [embed_tokens.register_forward_hook(self._parity_hook(EMBED, lambda out: out, None))]
        for index, layer in enumerate(layers):
            # A decoder layer's first input is the positions of the step's rows.
            handles.append(layer.register_forward_hook(self._parity_hook(layer_site(index), vllm_compat.layer_residual_stream, 0)))
        handles.append(norm.register_forward_hook(self._parity_hook(FINAL_NORM, vllm_compat.final_norm_output, None)))
        handles.append(model.register_forward_hook(self._parity_outer_hook, with_kwargs=True))
        self._parity_handles = handles
        self._parity_uncount = vllm_compat.count_compiled_graph_calls(model, self._parity_compiled_call)
        return {"num_layers": len(layers), "model_class": type(model).__name__, "compiled_graph_counted": self._parity_uncount is not None}

    def _parity_compiled_call(self) -> None:
        if self._parity_armed:
            self._parity_calls[COMPILED_GRAPH] = self._parity_calls.get(COMPILED_GRAPH, 0) + 1

    def _parity_reset(self, sequence: list[int], path: str | None) -> None:
        self._parity_sequence = list(sequence)
        self._parity_path = path
        self._parity_rows: dict[str, dict[int, Any]] = {}
        self._parity_source: dict[int, str] = {}
        self._parity_calls: dict[str, int] = {}
        self._parity_pending: list[tuple[str, Any]] = []
        self._parity_errors: list[str] = []
        self._parity_requests: list[str] = []
        self._parity_steps: list[list[list]] = []
        self._parity_recomputed: dict[str, dict[str, Any]] = {}
        self._parity_highest: dict[str, int] = {}
        self._parity_restarts = 0

    def _parity_matching(self) -> list[tuple[str, int, int, int]]:
        """(request id, prompt length, first row, end row) of this step's requests whose prompt is a prefix of
        the armed sequence."""
        sequence = self._parity_sequence
        found = []
        for req_id, prompt, start, end in vllm_compat.step_request_rows(self):
            if prompt is not None and len(prompt) <= len(sequence) and list(prompt) == sequence[:len(prompt)] and end > start:
                found.append((req_id, len(prompt), start, end))
        return found

    def _parity_store(self, name: str, tensor: Any, positions: Any) -> None:
        store = self._parity_rows.setdefault(name, {})
        for req_id, prompt_length, start, end in self._parity_matching():
            if req_id not in self._parity_requests:
                self._parity_requests.append(req_id)
            if name == OUTER:
                self._parity_note_restart(req_id, [int(positions[row]) for row in range(start, end)])
            for row in range(start, end):
                position = int(positions[row])
                if position < prompt_length:  # a decode step's row holds a token the engine chose, not the sequence's
                    value = tensor[row].detach().to("cpu").clone()
                    if position in store:
                        self._parity_note_recomputed(name, position, store[position], value)
                    store[position] = value
                    if name == OUTER:
                        self._parity_source[position] = req_id

    def _parity_note_restart(self, req_id: str, step_positions: list[int]) -> None:
        """A request whose rows start at or below a position it computed before was restarted (preempted, then
        readmitted: vLLM resets its computed tokens to 0)."""
        if not step_positions:
            return
        highest = self._parity_highest.get(req_id)
        restarted = highest is not None and min(step_positions) <= highest
        self._parity_restarts += int(restarted)
        self._parity_highest[req_id] = max(step_positions) if highest is None or restarted else max(highest, *step_positions)

    def _parity_note_recomputed(self, name: str, position: int, earlier: Any, now: Any) -> None:
        """Bitwise equality of a position's new computation with its earlier one (chained over several recomputations,
        so all equal means all equal the first) and the largest absolute difference, in float64."""
        import torch

        entry = self._parity_recomputed.setdefault(name, {"rows": 0, "positions": set(), "bitwise_equal": True, "max_abs_difference": 0.0})
        entry["rows"] += 1
        entry["positions"].add(position)
        if not torch.equal(earlier, now):
            entry["bitwise_equal"] = False
            difference = (now.to(torch.float64) - earlier.to(torch.float64)).abs().max().item()
            entry["max_abs_difference"] = max(entry["max_abs_difference"], float(difference))

    def _parity_hook(self, name: str, site_tensor, positions_arg: int | None):
        def hook(_module, inputs, output):
            if not self._parity_armed:
                return
            self._parity_calls[name] = self._parity_calls.get(name, 0) + 1
            try:
                tensor = site_tensor(output)
                if positions_arg is None:
                    # The embedding and the final norm are not given the positions: kept until the outer model's
                    # hook, which is, stores them (a new tensor: fused kernels reuse these buffers).
                    self._parity_pending.append((name, tensor.detach().clone()))
                    return
                self._parity_store(name, tensor, inputs[positions_arg])
            except BackendError as exc:
                self._parity_errors.append(str(exc))

        return hook

    def _parity_outer_hook(self, _module, args, kwargs, output):
        if not self._parity_armed:
            return
        self._parity_calls[OUTER] = self._parity_calls.get(OUTER, 0) + 1
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if positions is None or not hasattr(output, "shape"):
            self._parity_errors.append("the outer model's forward was called without positions, or returned no tensor")
            return
        try:
            if self._parity_matching():
                # The step's composition: rows of every request in it, the sequence's own marked with its id.
                self._parity_steps.append([[req_id, end - start] for req_id, _prompt, start, end in vllm_compat.step_request_rows(self)])
            self._parity_store(OUTER, output, positions)
            for name, tensor in self._parity_pending:
                self._parity_store(name, tensor, positions)
        except BackendError as exc:
            self._parity_errors.append(str(exc))
        finally:
            self._parity_pending = []

    def parity_arm(self, sequence: list[int], path: str) -> bool:
        self._parity_reset(sequence, path)
        self._parity_counters_before = vllm_compat.compilation_counters()
        self._parity_armed = True
        return True

    def parity_collect(self, keep: list[int], layers: list[int] | None) -> dict[str, Any]:
        """Assemble one row per position of the armed sequence, write the capture file (rank 0), and report the
        evidence: hook calls per site, which request computed each position, vLLM's compilation counters."""
        import torch

        from precision.safetensors_io import write_tensors

        self._parity_armed = False
        length = len(self._parity_sequence)
        rows = self._parity_rows
        layer_names = [name for name in rows if name.startswith(LAYER_PREFIX)]
        complete = {name: sorted(store) == list(range(length)) for name, store in rows.items()}
        hidden_sites = [EMBED, *layer_names, FINAL_NORM]
        if all(complete.get(name) for name in hidden_sites if name != EMBED) and layer_names:
            level = DETAIL_LAYERS
            wanted = [layer_site(i) for i in layers] if layers is not None else layer_names
            sites = [name for name in [EMBED, *wanted, FINAL_NORM] if complete.get(name)]
            tensors = {name: torch.stack([rows[name][p] for p in keep]) for name in sites}
        elif complete.get(OUTER):
            level = DETAIL_LOGITS
            tensors = {FINAL_NORM: torch.stack([rows[OUTER][p] for p in keep])}
        else:
            level = None
            tensors = {}
        after = vllm_compat.compilation_counters()
        source = self._parity_source
        final_request = source.get(length - 1)
        result = {
            "rank": vllm_compat.worker_rank(self), "level": level, "path": None, "errors": list(self._parity_errors),
            "calls": dict(self._parity_calls), "requests": list(self._parity_requests),
            "steps": [{"requests": len(step), "rows": sum(n for _, n in step),
                       "own_rows": sum(n for r, n in step if r in self._parity_requests)} for step in self._parity_steps],
            "positions_from_earlier_requests": sorted(p for p, r in source.items() if r != final_request),
            "missing_positions": {name: length - len(store) for name, store in rows.items() if len(store) != length},
            "recomputation": self._parity_recomputation(),
            "compilation_counters": {"now": after, "during_capture": {k: after[k] - self._parity_counters_before.get(k, 0) for k in after}},
        }
        if level is not None and not result["errors"]:
            model = vllm_compat.worker_model(self)
            with torch.inference_mode():
                logits = vllm_compat.compute_logits(model, tensors[FINAL_NORM])
            if result["rank"] == 0 and logits is not None:
                tensors[LOGITS] = logits.detach().to("cpu").contiguous()
                tensors[POSITIONS] = torch.tensor(keep, dtype=torch.int64)
                write_tensors(self._parity_path, {name: t.contiguous() for name, t in tensors.items()})
                result["path"] = self._parity_path
        self._parity_reset([], None)
        return result

    def _parity_recomputation(self) -> dict[str, Any]:
        """Positions of the sequence computed more than once (at any site), the restarts seen, and per site the
        rows computed again and whether every recomputation was bitwise the earlier computation."""
        recomputed = self._parity_recomputed
        positions = set().union(*(entry["positions"] for entry in recomputed.values()))
        return {"positions": len(positions), "restarts": self._parity_restarts, "recomputed_positions": sorted(positions),
                "rows": {name: entry["rows"] for name, entry in recomputed.items()},
                "bitwise_equal": {name: entry["bitwise_equal"] for name, entry in recomputed.items()},
                "max_abs_difference": {name: entry["max_abs_difference"] for name, entry in recomputed.items()}}

    def parity_counters(self) -> dict[str, int]:
        return vllm_compat.compilation_counters()

    def parity_remove_hooks(self) -> dict:
        for handle in getattr(self, "_parity_handles", []):
            handle.remove()
        self._parity_handles = []
        if getattr(self, "_parity_uncount", None) is not None:
            self._parity_uncount()
            self._parity_uncount = None
        self._parity_armed = False
        return {"engine_identity": engine_identity()}  # its shared memory is removed after shutdown
