"""Serving patches: what the weight-sync sidecar needs from SGLang 0.5.15 (rows of ``table.py``):
``flush_cache_while_paused`` (below) and ``weight_version_per_token`` (further down).

``flush_cache_while_paused`` (AROUND ``sglang.srt.managers.scheduler.Scheduler.flush_cache``,
signature ``(self, empty_cache=True)``).

Why: an update is applied with generation paused in ``retract`` mode, which moves every running
request back to the waiting queue with its KV cache freed. SGLang then refuses to flush the prefix
(radix) cache because ``is_fully_idle()`` counts waiting requests, so the cache keeps KV computed
with the *old* weights, and later requests that hit it get logprobs that are neither version's
(measured: requests with ``cached_tokens > 0`` after an update under load differ from the trainer).

What it does: when generation is paused, nothing runs (running batch, chunked request, last /
current batch all empty: what ``retract`` leaves) and no waiting request holds a request-pool slot,
it runs SGLang's own ``flush_cache`` with the waiting queue set aside, then puts the queue back.
Waiting requests hold no KV and no tree lock (``Req.reset_for_retract``; never-scheduled ones have
none); their prefix is matched again when they are scheduled (``init_next_round_input``), so they
are recomputed with the new weights. In every other case SGLang's behaviour is unchanged.

Drop when: SGLang flushes the prefix cache while paused with only waiting requests.
"""

from __future__ import annotations


def _waiting_hold_nothing(waiting) -> bool:
    return all(getattr(req, "req_pool_idx", None) is None for req in waiting)


def flush_cache_while_paused(original, self, empty_cache: bool = True):
    waiting = self.waiting_queue
    if not (getattr(self, "_engine_paused", False) and waiting and _waiting_hold_nothing(waiting)):
        return original(self, empty_cache)
    self.waiting_queue = []
    try:
        return original(self, empty_cache)  # still refuses if anything runs
    finally:
        self.waiting_queue = waiting + self.waiting_queue


# ----------------------------------------------------------------------------------------------------
# weight_version_per_token: the version of the weights that computed each output token
# ----------------------------------------------------------------------------------------------------
# SGLang 0.5.15 tags every streamed chunk with ``TokenizerManager.server_args.weight_version`` read
# when the tokenizer manager *processes* the chunk (tokenizer_manager.py:1893), not when the scheduler
# computed it. Outputs travel scheduler -> detokenizer -> tokenizer manager, while the reply to a
# weight update goes straight back from the scheduler: under load a token computed just before the
# pause arrives after the new version was set and carries the new tag (measured: 3 of 32 streams in
# one CI run). The scheduler, which computes the tokens, is the one place that knows the answer.
#
# What it does: the scheduler keeps the version of the weights it serves (set when an update with a
# ``weight_version`` succeeds: from tensors, from disk, from a distributed group or over IPC). Every
# batch it runs gets that version as a ``customized_info`` entry per request, SGLang's own channel
# for per-token values: the batch result processor appends one entry per output token to the
# request, the output streamer slices it with the tokens, the detokenizer passes it on unchanged and
# the tokenizer manager returns it, accumulated, as ``meta_info["output_weight_versions"]``: one
# version per output token, computed at the forward that sampled it. A retracted request keeps its
# output tokens and their versions (``Req.reset_for_retract`` keeps ``customized_info``).

WEIGHT_VERSION_KEY = "output_weight_versions"
_SERVED_VERSION_ATTR = "_truepolicy_served_weight_version"


def served_weight_version(scheduler) -> str:
    """The version of the weights ``scheduler`` runs (SGLang's startup ``--weight-version`` until an
    update sets one)."""
    return getattr(scheduler, _SERVED_VERSION_ATTR, scheduler.server_args.weight_version)


def record_weight_version(result, self, recv_req):
    """AFTER ``SchedulerWeightUpdaterManager.update_weights_from_*``: a successful update that names a
    version makes it the served version (the tokenizer manager sets its own copy on the same rule)."""
    version = getattr(recv_req, "weight_version", None)
    if result.success and version is not None and self.scheduler is not None:
        setattr(self.scheduler, _SERVED_VERSION_ATTR, version)
    return result


def stamp_weight_version(result, self, batch, pp_proxy_tensors=None):
    """AFTER ``Scheduler.run_batch``: tag the batch's outputs with the version that computed them."""
    logits_output = getattr(result, "logits_output", None)
    if logits_output is None:  # embedding batches, pipeline-parallel middle ranks: no tokens
        return result
    info = dict(logits_output.customized_info or {})
    info[WEIGHT_VERSION_KEY] = [served_weight_version(self)] * len(batch.reqs)
    logits_output.customized_info = info
    return result
