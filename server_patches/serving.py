"""Serving patches: what the weight-sync sidecar needs from SGLang 0.5.15 (rows of ``table.py``).

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
