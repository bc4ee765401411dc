"""Local versus inherited error: replay each reference step on a capture's own input.

For every step s (decoder layer i, the final norm, the lm_head), with x_in the capture's input to the step (its
previous site) and x_out its output, the reference model is run once in its dtype (BF16) and once in FP32 on
x_in:
    local error       ‖x_out − ref16(x_in)‖ / ‖ref16(x_in)‖   what the step itself adds
    inherited error   ‖ref16(x_in) − e_out‖ / ‖e_out‖          what the reference step would output from the
                                                                capture's (already different) input, against the
                                                                reference's own output e_out
    input error       ‖x_in − e_in‖ / ‖e_in‖
    amplification     inherited / input error                   how the step grows the error it is handed
    local R           ‖x_out − ref32(x_in)‖ / max(‖ref16(x_in) − ref32(x_in)‖, f ‖ref32(x_in)‖)
                      how far the step is from FP32 truth, relative to the reference's own BF16 rounding, with
                      f = theory.rounding_floor (one rounding, u/sqrt(3)): where the reference's replay happens
                      to be (nearly) exact, a target off by one rounding would otherwise get an unbounded R
    local gain        <x_out − ref16, u> / <u, u> with u = ref16(x_in) − x_in, the update of a decoder layer: a
                      systematic error along what the layer computes (a scaled weight, a wrong constant) shows as
                      a gain; rounding noise, uncorrelated with the update, does not. Decoder layers only: the
                      final norm's output minus its input is no update (it rescales), and the lm_head's has
                      another shape
    rounding gain     |<ref16 − ref32, u>| / <u, u>: the gain the reference's own BF16 rounding shows against FP32
                      (decoder layers); a target off by rounding alone can show about this much
    rounding floor    f above, recorded with each step (the envelope ratios use it too, see envelope.py)
Replaying the reference capture itself must give local error 0 (checked by the tests): the replay is exact.
Needs captures of every position and every layer (attention needs the whole sequence).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass


from precision.analysis.compare import ratio
from precision import names
from precision.analysis.theory import rounding_floor
from precision.capture import sites as site_names
from precision.capture.reader import CaptureReader
from precision.metrics.elementwise import _dot, ulp_histogram

log = logging.getLogger(__name__)


def replay_steps(num_layers: int) -> list[tuple[str, str]]:
    """(input site, output site) of every replayable step, in model order."""
    steps = [(site_names.EMBED, site_names.layer_site(0))]
    steps += [(site_names.layer_site(i - 1), site_names.layer_site(i)) for i in range(1, num_layers)]
    steps += [(site_names.layer_site(num_layers - 1), site_names.FINAL_NORM), (site_names.FINAL_NORM, site_names.LOGITS)]
    return steps


def replayable(capture: CaptureReader) -> str | None:
    """None when the capture can be replayed, else the reason it cannot."""
    selection = capture.manifest["selection"]
    if selection["positions"] != "all":
        return f"positions {selection['positions']!r} were kept; replay needs every position"
    if selection["layers"] != "all":
        return "only some layers were kept; replay needs every layer"
    return None


@dataclass
class _Accumulator:
    """Sums of squares pooled over prompts, per step."""

    local_num: float = 0.0
    local_den: float = 0.0
    truth_num: float = 0.0
    truth_den: float = 0.0
    truth_norm: float = 0.0
    inherited_num: float = 0.0
    out_den: float = 0.0
    input_num: float = 0.0
    input_den: float = 0.0
    ulp_weighted: dict | None = None
    elements: int = 0
    gain_num: float = 0.0
    rounding_gain_num: float = 0.0
    update_den: float = 0.0
    with_truth: bool = False
    lean: bool = False

    def add(self, x_in, x_out, r16, r32, e_in, e_out, *, has_update: bool) -> None:
        sq = lambda v: _dot(v.ravel(), v.ravel())  # noqa: E731
        self.local_num += sq(x_out - r16)
        self.local_den += sq(r16)
        if r32 is not None:
            self.with_truth = True
            self.truth_num += sq(x_out - r32)
            self.truth_den += sq(r16 - r32)
            self.truth_norm += sq(r32)
        self.inherited_num += sq(r16 - e_out)
        self.out_den += sq(e_out)
        self.input_num += sq(x_in - e_in)
        self.input_den += sq(e_in)
        if has_update:  # a decoder layer: its update is r16 - x_in (added to the residual stream)
            update = r16 - x_in
            self.gain_num += _dot((x_out - r16).ravel(), update.ravel())
            if r32 is not None:
                self.rounding_gain_num += _dot((r16 - r32).ravel(), update.ravel())
            self.update_den += sq(update)
        shares = ulp_histogram(r16, x_out)
        n = x_out.size
        self.ulp_weighted = {k: (self.ulp_weighted or {}).get(k, 0.0) + v * n for k, v in shares.items()}
        self.elements += n

    def add_local(self, x_in, x_out, r16, *, has_update: bool) -> None:
        """Only what the local envelope reads of an envelope member's step: its local error and gain."""
        difference = (x_out - r16).ravel()
        self.local_num += _dot(difference, difference)
        self.local_den += _dot(r16.ravel(), r16.ravel())
        if has_update:
            update = (r16 - x_in).ravel()
            self.gain_num += _dot(difference, update)
            self.update_den += _dot(update, update)
        self.lean = True

    def result(self, step_in: str, step_out: str, floor: float) -> dict:
        if self.lean:
            return {"site": step_out, "input_site": step_in, names.LOCAL_ERROR: ratio(math.sqrt(self.local_num), math.sqrt(self.local_den)),
                    names.LOCAL_GAIN: self.gain_num / self.update_den if self.update_den > 0 else None, "local_R": None}
        local = ratio(math.sqrt(self.local_num), math.sqrt(self.local_den))
        inherited = ratio(math.sqrt(self.inherited_num), math.sqrt(self.out_den))
        input_err = ratio(math.sqrt(self.input_num), math.sqrt(self.input_den))
        return {
            "site": step_out,
            "input_site": step_in,
            names.LOCAL_ERROR: local,
            "inherited": inherited,
            "input": input_err,
            "amplification": ratio(inherited, input_err) if input_err > 0 else None,
            "local_R": (ratio(math.sqrt(self.truth_num), max(math.sqrt(self.truth_den), floor * math.sqrt(self.truth_norm)))
                        if self.with_truth else None),
            "rounding_floor": floor,
            # Least-squares gain of the local difference along the step's own update: a layer that computes
            # (1 + g) times its update has gain g; rounding noise has none (see the gain rule in verdict.py).
            names.LOCAL_GAIN: self.gain_num / self.update_den if self.update_den > 0 else None,
            # The same gain of the reference's own BF16 rounding against FP32: BF16 rounding of a layer's output
            # is not free of correlation with its update, and a target in a wider dtype, close to FP32, shows
            # this much gain against the reference with no fault at all.
            "rounding_gain": abs(self.rounding_gain_num) / self.update_den if self.update_den > 0 and self.with_truth else None,
            "local_ulp_shares": {k: v / self.elements for k, v in (self.ulp_weighted or {}).items()},
        }


class Replayer:
    """The reference model, kept to replay several captures; one pass over its steps serves all of them.

    Memory is one model: the model in its dtype (or, ``streamed``, one step's weights read from the checkpoint at a
    time) and, while a step is replayed, that one step's FP32 copy. The FP32 replay (local R) runs only for the
    captures that need it: a target's, not an envelope member's (the local envelope reads a member's local error
    and gain, never its distance from FP32)."""

    def __init__(self, model_path: str, dtype_name: str = "bfloat16", *, streamed: bool = False) -> None:
        import torch

        from precision.backends.model_steps import ModelSteps

        self.steps = ModelSteps(model_path, dtype_name, streamed=streamed)
        self.dtype = getattr(torch, dtype_name)
        self.floor = rounding_floor(dtype_name)
        self._done: dict[tuple[str, str, bool], list[dict]] = {}

    def replay(self, capture: CaptureReader, reference: CaptureReader) -> list[dict]:
        """Per step, pooled over prompts (see the module docstring)."""
        return self.replay_all(reference, {"capture": capture})["capture"]

    def replay_all(self, reference: CaptureReader, captures: dict[str, CaptureReader], *, without_truth: tuple[str, ...] = ()) -> dict[str, list[dict]]:
        """Each capture's steps, replayed in one pass over the model's steps (the captures named in
        ``without_truth`` get no FP32 replay: their local R is None). Results are kept per capture manifest, so the
        envelope members are replayed once when several targets are judged against them (selftest)."""
        keys = {name: (c.manifest_sha256(), reference.manifest_sha256(), name not in without_truth) for name, c in captures.items()}
        todo = {name: c for name, c in captures.items() if keys[name] not in self._done}
        if todo:
            results = self._replay(reference, todo, set(todo) - set(without_truth))
            for name, steps in results.items():
                self._done[keys[name]] = steps
        return {name: self._done[keys[name]] for name in captures}

    def _run(self, module, step_out: str, x):
        if site_names.layer_index(step_out) is not None:
            return self.steps.run_layer(module, x)
        return module(x)

    def _replay(self, reference: CaptureReader, captures: dict[str, CaptureReader], with_truth: set[str]) -> dict[str, list[dict]]:
        import torch

        for capture in (reference, *captures.values()):
            reason = replayable(capture)
            if reason:
                raise ValueError(reason)
        steps = replay_steps(reference.num_layers)
        pooled = {name: {out: _Accumulator() for _, out in steps} for name in captures}
        pairs = {name: list(zip(c.prompts, reference.records([r.id for r in c.prompts]))) for name, c in captures.items()}
        with torch.inference_mode():
            for step_in, step_out in steps:
                with contextlib.ExitStack() as held:
                    low = held.enter_context(self.steps.step(step_out))
                    high = held.enter_context(self.steps.step(step_out, torch.float32)) if with_truth else None
                    for name in with_truth:
                        self._replay_target(captures[name], reference, pairs[name], step_in, step_out, low, high, pooled[name][step_out])
                    alone = [(name, x_rec, e_rec) for name in captures if name not in with_truth for x_rec, e_rec in pairs[name]]
                    for batch in _batches(alone, step_out, reference):
                        self._replay_batch(captures, reference, batch, step_in, step_out, low, pooled)
        return {name: [pooled[name][out].result(step_in, out, self.floor) for step_in, out in steps] for name in captures}

    def _replay_target(self, capture, reference, pairs, step_in, step_out, low, high, into: "_Accumulator") -> None:
        """Every prompt through the BF16 step alone, as the capture ran it (so that replaying the reference itself
        gives exactly 0), and through the FP32 step in batches: FP32's last bits are ~1e-7 of a value, far below the
        BF16 differences local R measures against them."""
        import torch

        from precision.backends.layerwise import pad_rows

        for batch in _batches([(None, x_rec, e_rec) for x_rec, e_rec in pairs], step_out, reference):
            with contextlib.ExitStack() as files:
                handles = [(files.enter_context(capture.open_tensors(x_rec)), files.enter_context(reference.open_tensors(e_rec)))
                           for _, x_rec, e_rec in batch]
                inputs = [xh.get_tensor(step_in) for xh, _ in handles]
                wide = self._run(high, step_out, pad_rows([x.to(torch.float32) for x in inputs]))
                for (xh, eh), x_in, r32 in zip(handles, inputs, wide):
                    r16 = self._run(low, step_out, x_in.to(self.dtype).unsqueeze(0))[0]
                    into.add(_f64(x_in), _f64(xh.get_tensor(step_out)), _f64(r16), _f64(r32[:x_in.shape[0]]),
                             _f64(eh.get_tensor(step_in)), _f64(eh.get_tensor(step_out)), has_update=site_names.layer_index(step_out) is not None)

    def _replay_batch(self, captures, reference, batch, step_in, step_out, low, pooled) -> None:
        """Several prompts (of envelope members) through the BF16 step as one right-padded batch: one read of the
        step's weights for all of them. The batched step may differ from the step run alone in its last bits:
        replayed this way, stories260K's reference shows a local error of up to 3.2e-4 at a layer where alone it
        shows 0, against members' own local errors of about one rounding (2.3e-3), so a member's local error is
        barely larger for it (the target is replayed alone, exactly). Only the local error and gain are kept."""
        from precision.backends.layerwise import pad_rows

        with contextlib.ExitStack() as files:
            handles = [files.enter_context(captures[name].open_tensors(x_rec)) for name, x_rec, _ in batch]
            inputs = [xh.get_tensor(step_in) for xh in handles]
            outputs = self._run(low, step_out, pad_rows([x.to(self.dtype) for x in inputs]))
            for (name, _, _), xh, x_in, r16 in zip(batch, handles, inputs, outputs):
                pooled[name][step_out].add_local(_f64(x_in), _f64(xh.get_tensor(step_out)), _f64(r16[:x_in.shape[0]]),
                                                 has_update=site_names.layer_index(step_out) is not None)


BATCH_OUTPUT_BYTES = 1 << 28
"""Output bytes of one batched replay call at most (the lm_head's rows are a vocabulary wide)."""


def _batches(items: list, step_out: str, reference: CaptureReader) -> list[list]:
    """``items`` (name, capture record, reference record) cut into batches of similar lengths (precision.backends.
    layerwise.length_groups) whose step output fits BATCH_OUTPUT_BYTES."""
    from precision.backends.layerwise import length_groups

    width = reference.manifest["model"]["vocab_size"] if step_out == site_names.LOGITS else reference.manifest["model"]["hidden_size"]
    lengths = [len(item[1].prompt_ids) + len(item[1].continuation_ids) for item in items]
    return [[items[j] for j in group] for group in length_groups(lengths, BATCH_OUTPUT_BYTES // (width * 4))]


def _f64(tensor):
    import torch

    return tensor.to(torch.float64).numpy()
