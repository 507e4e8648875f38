"""Continuous batching (transformers ≥ 5: `generate_batch`, `init_continuous_batching`) for a
patched model: one route per request, per-token adapter ids over the flattened batch.

Each step the engine runs one forward over `input_ids` (1, T): prefill chunks and decode tokens
of many requests side by side. A request's route is forced (`prism_route=`), or decided by the
gate after layer 0 at the token that ends its prompt (only the chunk holding it decides), then
held for all its decode steps. Until then its tokens run closed (base KV). A request decided open
whose earlier tokens ran closed (an earlier chunk, or prefix blocks shared from the cache) is
restarted under its route before any token of it is emitted; one decided closed never is.

Hook points, all on the instances the patched model creates (other models are untouched):
  model.init_continuous_batching → manager: add_request(s) take prism_route(s)=, outputs carry
    `prism_route`; its batch processor: model_runner.compute_batch (per-token ids of this
    forward, from requests_in_batch), update_batch (read the decided routes: one host read per
    deciding prefill, after the engine's own), cache.search_prefix_match / mark_complete_blocks
    (block hashes salted per route: an open request never shares blocks computed under another
    route; closed requests and the base model share theirs), scheduler.clear_cancelled_requests.
"""

from __future__ import annotations

import functools

from prism_fast.flat_batch import SALT_SHIFT, FlatBatch, RouteBook, salted

# The engine internals batching.py hooks (ContinuousBatchingConfig(page_size=…), the batch
# processor's model_runner / update_batch, the cache's prefix search) are those of
# transformers 5.25; 5.17 names and arranges them otherwise. Tested on 5.25 only.
MIN_TRANSFORMERS = (5, 25)


def engine_supported() -> bool:
    """Whether the installed transformers has the continuous-batching engine prism_fast hooks."""
    import transformers

    parts = transformers.__version__.split(".")[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts) >= MIN_TRANSFORMERS


def check_engine() -> None:
    """A clear error where the engine is older than the one prism_fast hooks."""
    if not engine_supported():
        import transformers

        raise RuntimeError(
            f"continuous batching: prism_fast needs transformers >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))} (the engine internals it hooks), found "
            f"{transformers.__version__}; upgrade transformers, or use model.generate")


def install(model, root, routing, overrides) -> None:
    """patch_model: init_continuous_batching / generate_batch of the transformers model hook the
    managers they create (a PeftModel reaches them through its base model); overrides.remove()
    (unpatch_model) takes them off. Partials of module-level functions, no closures: a deep
    copy or a pickle of the model carries overrides bound to its own routing."""
    pending: dict[str, list | None] = {"routes": None}
    for obj in dict.fromkeys([model, root]):
        if hasattr(type(obj), "init_continuous_batching"):
            overrides.set(obj, "init_continuous_batching",
                          functools.partial(_init_continuous_batching, obj, routing, pending))
            overrides.set(obj, "generate_batch", functools.partial(_generate_batch, obj, pending))


def _generate_batch(model, pending: dict, inputs, *args, prism_routes=None, **kwargs):
    """generate_batch(…, prism_routes=[r, …]): one route per input (-1 = base)."""
    if prism_routes is not None and len(prism_routes) != len(inputs):
        raise ValueError(f"prism_routes: expected one route per input ({len(inputs)}), got "
                         f"{len(prism_routes)}")
    pending["routes"] = None if prism_routes is None else list(prism_routes)
    try:
        return type(model).generate_batch(model, inputs, *args, **kwargs)
    finally:
        pending["routes"] = None


def _init_continuous_batching(model, routing, pending: dict, generation_config=None,
                              continuous_batching_config=None, workload_hints=None):
    check_engine()
    from transformers import ContinuousBatchingConfig

    if routing.fixed is not None:
        raise ValueError("routes: set_routes fixes routes per row of a static batch; under "
                         "continuous batching give one per request (prism_route= in "
                         "add_request, prism_routes= in generate_batch); call "
                         "set_routes(model, None) first")
    cfg = continuous_batching_config
    if cfg is None and generation_config is not None:
        cfg = getattr(generation_config, "continuous_batching_config", None)
    cfg = ContinuousBatchingConfig() if cfg is None else cfg
    if cfg.use_async_batching:
        raise ValueError("continuous_batching_config: use_async_batching=True is not supported "
                         "by prism_fast yet (routes are read between steps); use False")
    cfg.use_async_batching = False
    manager = type(model).init_continuous_batching(model, generation_config, cfg, workload_hints)
    if getattr(manager, "prism_routes", None) is None:
        _hook_manager(manager, routing, pending)
    return manager


def _hook_manager(manager, routing, pending: dict) -> None:
    book = RouteBook(routing.n_adapters, None if routing.gate is not None else 0)
    manager.prism_routes = book
    add_request, create = manager.add_request, manager._create_batch_processor

    def add_request_routed(input_ids, request_id=None, *args, prism_route=None, **kwargs):
        if prism_route is not None:
            route = book.check(prism_route)
            if request_id is None:
                with manager._request_lock:
                    request_id = f"req_{manager._request_counter}"
                    manager._request_counter += 1
            book.set(request_id, route)
        return add_request(input_ids, request_id, *args, **kwargs)

    def add_requests(inputs, max_new_tokens=None, streaming=False, record_timestamps=False,
                     prism_routes=None, **kwargs):
        """As upstream's, with one route per input (forced before any is scheduled)."""
        routes = pending["routes"] if prism_routes is None else list(prism_routes)
        if routes is not None and len(routes) != len(inputs):
            raise ValueError(f"prism_routes: expected one route per input ({len(inputs)}), got "
                             f"{len(routes)}")
        routes = [book.check(r, "prism_routes") for r in routes] if routes else [None] * len(inputs)
        with manager._request_lock:
            start = manager._request_counter
            manager._request_counter += len(inputs)
        ids = [f"req_{start + i}" for i in range(len(inputs))]
        order = list(zip(ids, inputs, routes))
        if manager._use_prefix_sharing:          # upstream's order: longest shared prefixes first
            order.sort(key=lambda x: x[1], reverse=True)
        eos = manager.generation_config.eos_token_id
        eos = manager.model.config.eos_token_id if eos is None else eos
        for rid, input_ids, route in order:
            add_request_routed(input_ids, rid, max_new_tokens=max_new_tokens, streaming=streaming,
                               record_timestamps=record_timestamps,
                               eos_token_id=-1 if eos is None else eos, prism_route=route,
                               **kwargs)
        return ids

    def create_batch_processor():
        processor = create()
        if getattr(processor, "prism_flat", None) is None:
            _hook_processor(processor, routing, book)
        return processor

    manager.add_request, manager.add_requests = add_request_routed, add_requests
    manager._create_batch_processor = create_batch_processor
    _hook_outputs(manager.output_router, book)


def _hook_outputs(router, book: RouteBook) -> None:
    """Every output says the route its request took (None: not decided, e.g. failed before)."""
    deliver, deliver_batch = router.deliver, router.deliver_batch

    def tag(output) -> None:
        output.prism_route = book.get(output.request_id)
        if output.is_finished():
            book.forget_later(output.request_id)

    def deliver_one(output):
        tag(output)
        return deliver(output)

    def deliver_many(outputs):
        for output in outputs:
            tag(output)
        return deliver_batch(outputs)

    router.deliver, router.deliver_batch = deliver_one, deliver_many


def _hook_processor(processor, routing, book: RouteBook) -> None:
    runner, cache, scheduler = processor.model_runner, processor.cache, processor.scheduler
    vocab = getattr(processor.config, "vocab_size", 0) or 0
    if cache.use_prefix_sharing and vocab >= 1 << SALT_SHIFT:
        raise ValueError(f"model: vocab_size {vocab} ≥ 2**{SALT_SHIFT}: prefix hashes cannot be "
                         f"salted per route; set allow_block_sharing=False")
    flat = FlatBatch(routing, cache.max_batch_tokens, processor.cb_config.max_requests_per_batch,
                     static=runner.pad_inputs)
    processor.prism_flat = flat
    compute, update = runner.compute_batch, processor.update_batch
    search, mark = cache.search_prefix_match, cache.mark_complete_blocks
    clear = scheduler.clear_cancelled_requests

    def compute_batch(model, batch_data):
        io = runner.inputs_and_outputs
        flat.prepare(io.requests_in_batch, io.num_q_tokens, book)
        with routing.flat_forward(flat):
            return compute(model, batch_data)

    def update_batch():
        book.flush()
        restart = flat.collect(book)
        io = processor.inputs_and_outputs
        for fs in restart:                       # its token came from base history: dropped
            io.requests_in_batch[io.requests_in_batch.index(fs)] = _placeholder(fs)
        update()
        for fs in restart:
            _requeue(scheduler, fs.state)
        book.restarts += len(restart)

    def search_prefix_match(request_id, prompt_ids):
        route = book.get(request_id)
        n = search(request_id, salted(prompt_ids, route))
        key = -1 if route is None else route
        book.shared[key] = book.shared.get(key, 0) + n
        return n

    def mark_complete_blocks(state, complete_blocks):
        route = book.get(state.request_id)
        return mark(state if route is None or route < 0 else _Salted(state, route), complete_blocks)

    def clear_cancelled_requests():
        states = clear()
        for state in states:
            book.forget_later(state.request_id)
        return states

    runner.compute_batch, processor.update_batch = compute_batch, update_batch
    cache.search_prefix_match, cache.mark_complete_blocks = search_prefix_match, mark_complete_blocks
    scheduler.clear_cancelled_requests = clear_cancelled_requests


class _Salted:
    """What cache.mark_complete_blocks reads of a request, with its token ids salted."""

    def __init__(self, state, route: int):
        self.request_id, self.status = state.request_id, state.status
        self.initial_tokens = salted(state.initial_tokens, route)
        self.generated_tokens = salted(state.generated_tokens, route)


def _placeholder(fs):
    """Stands in for a restarted request in this step's update: takes its token, emits nothing."""
    from transformers.generation.continuous_batching.requests import (
        FutureRequestState,
        RequestState,
        RequestStatus,
    )

    state = RequestState(request_id=f"{fs.state.request_id}__prism_restart", initial_tokens=[0],
                         max_new_tokens=None)
    state._status = RequestStatus.DECODING
    return FutureRequestState(state, has_new_token=True, complete_blocks={},
                              query_length=fs.query_length)


def _requeue(scheduler, state) -> None:
    """Free the request's blocks and queue it first, to prefill again under its route."""
    scheduler.finish_request(state.request_id)
    fresh = state.create_equivalent_initial_request()
    fresh.created_time = state.created_time          # its latency counts from its arrival
    scheduler.add_waiting_request(fresh)
    scheduler.waiting_requests_order.remove(state.request_id)
    scheduler.waiting_requests_order.appendleft(state.request_id)
