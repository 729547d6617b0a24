"""Issue 12's weight-sync changes on the CPU: the client's ramped layout, its manifest reuse and its
zero-copy buckets; the sidecar's run-wise NaN/Inf checks (same refusals, same names) and how far
ahead it posts receives."""

from __future__ import annotations

import pytest
import torch

from weight_sync.client import WeightSyncClient
from weight_sync.sidecar import errors, pipeline
from weight_sync.sidecar.pipeline import allocate, receive
from weight_sync.sidecar.plan import layout_buckets, validate
from weight_sync.sidecar.served import ServedModel, TensorSpec
from weight_sync.sidecar.wire import ALIGN, WIRE_DTYPES, Quantization


def _specs(layers: int = 6, norm: int = 32) -> list[tuple[str, tuple[int, ...], str]]:
    """A small Llama-like list; ``norm=128`` makes every tensor a multiple of 256 bytes (no padding)."""
    specs = [("model.embed_tokens.weight", (96, 32), "bfloat16")]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (32, 32), "bfloat16"),
            (p + "mlp.up_proj.weight", (64, 32), "bfloat16"),
            (p + "mlp.down_proj.weight", (32, 64), "bfloat16"),
            (p + "input_layernorm.weight", (norm,), "bfloat16"),
        ]
    return [*specs, ("model.norm.weight", (norm,), "bfloat16"), ("lm_head.weight", (96, 32), "bfloat16")]


def _served(specs) -> ServedModel:
    return ServedModel("/ckpt", {n: TensorSpec(s, d) for n, s, d in specs})


def _fp8_served(specs) -> ServedModel:
    """What a block-FP8 server of ``specs`` serves (the policy's names, shapes and dtypes)."""
    from weight_sync.fp8 import Fp8BlockPolicy

    policy = Fp8BlockPolicy()
    return ServedModel(
        "/ckpt-fp8",
        {
            s.name: TensorSpec(tuple(s.shape), str(s.dtype).removeprefix("torch."))
            for name, shape, d in specs
            for s in policy.specs(name, shape, WIRE_DTYPES[d])
        },
    )


def _tensors(specs, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(WIRE_DTYPES[d]) for n, s, d in specs}


def _pack(manifest, tensors, fill: int = 0) -> list[torch.Tensor]:
    """The bytes the trainer broadcasts, one flat uint8 tensor per bucket (padding = ``fill``)."""
    buckets = [torch.full((size,), fill, dtype=torch.uint8) for size in manifest.buckets]
    for e in manifest.tensors:
        view = buckets[e.bucket][e.offset : e.offset + e.nbytes].view(WIRE_DTYPES[e.dtype]).view(e.shape)
        view.copy_(tensors[e.name])
    return buckets


def _same_tensors(manifest, sent: list[torch.Tensor], tensors) -> bool:
    """Every tensor's bytes are where the manifest says (padding is whatever the slot held)."""
    return len(sent) == len(manifest.buckets) and all(
        torch.equal(
            sent[e.bucket][e.offset : e.offset + e.nbytes].view(WIRE_DTYPES[e.dtype]).view(e.shape),
            tensors[e.name].to(WIRE_DTYPES[e.dtype]),
        )
        for e in manifest.tensors
    )


class _Done:
    def wait(self):
        return True


class _Poster:
    """A stand-in for the process group: post(dst) receives the next bucket; logs posts and waits."""

    def __init__(self, buckets):
        self.buckets = list(buckets)
        self.log: list[tuple[str, int]] = []

    def __call__(self, dst):
        k = sum(1 for what, _ in self.log if what == "post")
        dst.copy_(self.buckets[k])
        self.log.append(("post", k))
        log = self.log

        class Work:
            def wait(self):
                log.append(("wait", k))

        return Work()


# ---- the client's layout ----------------------------------------------------------------------
def test_ramped_layout_is_layout_buckets_up_to_the_ramp():
    specs = _specs()
    for bucket_bytes in (1_000, 8_192, 80_000):
        assert layout_buckets(specs, bucket_bytes, ramp_bytes=80_000) == layout_buckets(specs, bucket_bytes)


def test_ramped_layout_ramps_both_ends_and_validates():
    specs = [(f"model.layers.{i}.mlp.up_proj.weight", (64, 64), "bfloat16") for i in range(64)]  # 8 KiB each
    ramp, bucket_bytes = 8 << 10, 128 << 10
    m = layout_buckets(specs, bucket_bytes, ramp_bytes=ramp)
    sizes = m.buckets
    assert sizes[0] == ramp and sizes[-1] == ramp  # one tensor at each end
    assert max(sizes) == bucket_bytes and len(sizes) > len(layout_buckets(specs, bucket_bytes).buckets)
    for prev, size in zip(sizes, sizes[1:], strict=False):
        assert size <= max(ramp, 2 * prev)  # every bucket overlaps with the one before
    remaining = m.total_bytes
    for size in sizes:
        assert size <= max(ramp, remaining // 2) or size == remaining  # the tail halves
        remaining -= size
    assert [e.name for e in m.tensors] == [n for n, _, _ in specs]
    assert all(e.offset % ALIGN == 0 for e in m.tensors)
    plan = validate(m, _served(specs))
    assert plan.total_bytes == 64 * 8192


def test_ramped_layout_gives_a_big_tensor_its_own_bucket():
    specs = _specs()  # embed and lm_head (6 KiB) larger than the 2 KiB ramp
    m = layout_buckets(specs, 4 << 10, ramp_bytes=2 << 10)
    first = [e for e in m.tensors if e.bucket == 0]
    last = [e for e in m.tensors if e.bucket == len(m.buckets) - 1]
    assert [e.name for e in first] == ["model.embed_tokens.weight"]
    assert [e.name for e in last] == ["lm_head.weight"]
    assert all(s <= 4 << 10 for s in m.buckets[1:-1])
    validate(m, _served(specs))


def test_client_reuses_its_manifest_while_nothing_changed():
    client = WeightSyncClient(["http://127.0.0.1:9"], token="x", bucket_bytes=4096)
    try:
        tensors = list(_tensors(_specs(2)).items())
        m = client.manifest(tensors)
        assert client.manifest(tensors) is m
        assert client.manifest(list(tensors)) is m  # equal specs, another list
        client.bucket_bytes = 8192
        assert client.manifest(tensors) is not m
        m8 = client.manifest(tensors)
        client.quantization = Quantization(method="fp8_block")
        assert client.manifest(tensors).quantization.method == "fp8_block"
        client.quantization = Quantization()
        changed = [(n, t[:-1] if n == "lm_head.weight" else t) for n, t in tensors]
        assert client.manifest(changed) is not m8
        assert client.manifest(tensors, dtype=torch.float16).tensors[0].dtype == "float16"
    finally:
        client.close()


# ---- the client's stream ----------------------------------------------------------------------
class _Group:
    def __init__(self):
        self.sent: list[torch.Tensor] = []
        self.ptrs: list[int] = []

    def broadcast(self, tensor):
        self.sent.append(tensor.clone())
        self.ptrs.append(tensor.data_ptr())
        return _Done()


def test_stream_sends_a_whole_tensor_bucket_from_the_tensor_itself():
    specs = _specs(2)
    tensors = _tensors(specs)
    client = WeightSyncClient(["http://127.0.0.1:9"], token="x", bucket_bytes=2048, backend="gloo")
    group = _Group()
    client._group = group
    try:
        m = client.manifest(list(tensors.items()))
        stream_s, _, error = client._stream(m, tensors, None)
        assert error is None and stream_s >= 0
        assert _same_tensors(m, group.sent, tensors)
        members: dict[int, list[str]] = {}
        for e in m.tensors:
            members.setdefault(e.bucket, []).append(e.name)
        single = [k for k in range(len(m.buckets)) if len(members[k]) == 1]
        assert {0, len(m.buckets) - 1} <= set(single) and len(single) < len(m.buckets)
        for k in range(len(m.buckets)):
            own = tensors[members[k][0]].data_ptr() == group.ptrs[k]
            assert own == (k in single), k  # sent from the tensor itself exactly when it is alone
        # The slots hold the largest packed bucket, not the 6 KiB embedding.
        packed = max(size for k, size in enumerate(m.buckets) if k not in single)
        assert client._slots[0].numel() == packed < tensors["model.embed_tokens.weight"].numel() * 2
        # Cast on the fly (fp32 master weights -> bf16 on the wire): everything is packed.
        group.sent.clear(), group.ptrs.clear()
        master = {n: t.float() for n, t in tensors.items()}
        mb = client.manifest(list(master.items()), dtype=torch.bfloat16)
        assert mb == m
        _, _, error = client._stream(mb, master, None)
        assert error is None
        assert _same_tensors(mb, group.sent, tensors)
        assert master["model.embed_tokens.weight"].data_ptr() not in group.ptrs
    finally:
        client._group = None
        client.close()


def test_pushed_buckets_round_trip_through_the_receive_pipeline():
    specs = _specs(4)
    tensors = _tensors(specs, seed=3)
    client = WeightSyncClient(["http://127.0.0.1:9"], token="x", bucket_bytes=4096, backend="gloo")
    group = _Group()
    client._group = group
    try:
        m = client.manifest(list(tensors.items()))
        assert client._stream(m, tensors, None)[2] is None
    finally:
        client._group = None
        client.close()
    plan = validate(m, _served(specs))
    staging = allocate(plan.staging_nbytes, "cpu", shared=False)
    receive(plan, staging, None, _Poster(group.sent))
    for st in plan.staged:
        got = staging[st.start : st.end].view(st.dtype).view(st.shape)
        assert torch.equal(got, tensors[st.name]), st.name


# ---- the sidecar's checks ---------------------------------------------------------------------
def test_runs_join_adjacent_same_dtype_tensors_only(monkeypatch):
    specs = [
        ("a", (128,), "bfloat16"),  # 256 bytes: b follows with no gap
        ("b", (64,), "bfloat16"),  # 128 bytes: c starts after 128 bytes of padding
        ("c", (128,), "bfloat16"),
        ("d", (64,), "float32"),  # another dtype: a run of its own
        ("e", (64,), "int32"),  # not floating: not checked
        ("f", (0,), "bfloat16"),  # empty: not checked
        ("g", (128,), "float32"),
    ]
    m = layout_buckets(specs, 1 << 20)
    (bucket,) = validate(m, _served(specs)).buckets
    runs = pipeline._runs(bucket.entries)
    assert [names for *_, names in runs] == [("a", "b"), ("c",), ("d",), ("g",)]
    a, b = (e for e in m.tensors if e.name in "ab")
    assert runs[0][:3] == (a.offset, b.offset + b.nbytes, torch.bfloat16)
    monkeypatch.setattr(pipeline, "RUN_BYTES", 256)
    assert [names for *_, names in pipeline._runs(bucket.entries)][:2] == [("a",), ("b",)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_run_refuses_any_non_finite_value_and_names_the_tensor(bad):
    specs = _specs(3, norm=128)
    tensors = _tensors(specs)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][5, 7] = bad
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")  # a later bucket's is not named
    m = layout_buckets(specs, 1 << 20)  # everything in one bucket: one run
    plan = validate(m, _served(specs))
    assert len(plan.buckets) == 1 and len(pipeline._runs(plan.buckets[0].entries)) == 1
    poster = _Poster(_pack(m, tensors))
    with pytest.raises(errors.NonFinite) as info:
        receive(plan, allocate(plan.staging_nbytes, "cpu", shared=False), None, poster)
    assert info.value.tensor == name and info.value.bucket == 0 and name in info.value.message
    # Over several buckets: the first bad tensor of the first bad bucket, every bucket received.
    m = layout_buckets(specs, 8 << 10)
    plan = validate(m, _served(specs))
    poster = _Poster(_pack(m, tensors))
    with pytest.raises(errors.NonFinite) as info:
        receive(plan, allocate(plan.staging_nbytes, "cpu", shared=False), None, poster)
    k = next(e.bucket for e in m.tensors if e.name == name)
    assert info.value.tensor == name and info.value.bucket == k
    assert [k for what, k in poster.log if what == "wait"] == list(range(len(m.buckets)))


def test_padding_between_tensors_is_never_checked():
    specs = [("x", (3,), "bfloat16"), ("y", (5,), "bfloat16"), ("z", (7, 3), "float32")]
    tensors = _tensors(specs)
    m = layout_buckets(specs, 1 << 20)
    plan = validate(m, _served(specs))
    poster = _Poster(_pack(m, tensors, fill=0xFF))  # 0xFFFF is a bf16 NaN; 0xFFFFFFFF an fp32 NaN
    receive(plan, allocate(plan.staging_nbytes, "cpu", shared=False), None, poster)


def test_direct_receives_are_all_posted_before_the_first_wait_and_the_ring_keeps_two():
    specs = _specs(3)
    tensors = _tensors(specs)
    m = layout_buckets(specs, 4 << 10)
    n = len(m.buckets)
    assert n > 3
    poster = _Poster(_pack(m, tensors))
    plan = validate(m, _served(specs))
    receive(plan, allocate(plan.staging_nbytes, "cpu", shared=False), None, poster)
    assert poster.log == [("post", k) for k in range(n)] + [("wait", k) for k in range(n)]

    specs = [("model.embed_tokens.weight", (64, 32), "bfloat16")]
    for i in range(3):
        specs += [
            (f"model.layers.{i}.self_attn.q_proj.weight", (256, 128), "bfloat16"),
            (f"model.layers.{i}.mlp.down_proj.weight", (128, 256), "bfloat16"),
            (f"model.layers.{i}.input_layernorm.weight", (32,), "bfloat16"),
        ]
    specs.append(("lm_head.weight", (64, 32), "bfloat16"))
    tensors = _tensors(specs)
    served = _fp8_served(specs)
    m = layout_buckets(specs, 64 << 10, quantization=Quantization(method="fp8_block"))
    n = len(m.buckets)
    assert n > 3
    plan = validate(m, served)
    poster = _Poster(_pack(m, tensors))
    ring = [allocate(plan.ring_bytes, "cpu", shared=False) for _ in range(2)]
    receive(plan, allocate(plan.staging_nbytes, "cpu", shared=True), ring, poster)
    expected = [("post", 0), ("post", 1)]
    for k in range(n):
        expected.append(("wait", k))
        if k + 2 < n:
            expected.append(("post", k + 2))
    assert poster.log == expected


def _fp8_setup(layers: int = 3):
    """An FP8 transfer where each layer's two norms lie back to back (a run of kept tensors)."""
    specs = [("model.embed_tokens.weight", (64, 128), "bfloat16")]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (256, 128), "bfloat16"),
            (p + "self_attn.k_proj.weight", (128, 200), "bfloat16"),  # K % 128 != 0: its own launch
            (p + "mlp.down_proj.weight", (130, 256), "bfloat16"),
            (p + "input_layernorm.weight", (128,), "bfloat16"),
            (p + "post_attention_layernorm.weight", (128,), "bfloat16"),
        ]
    specs.append(("lm_head.weight", (64, 128), "bfloat16"))
    served = _fp8_served(specs)
    return specs, served


@pytest.mark.parametrize(
    "bad_names",
    [
        ["model.layers.1.mlp.down_proj.weight"],  # the grouped launch's flag
        ["model.layers.1.self_attn.k_proj.weight"],  # a single launch's flag
        ["model.layers.1.post_attention_layernorm.weight"],  # the second tensor of a kept run
        # several in one bucket: the first in the bucket's order, whatever check caught it
        ["model.layers.1.post_attention_layernorm.weight", "model.layers.1.mlp.down_proj.weight"],
    ],
)
def test_fp8_staging_refuses_non_finite_values_and_names_the_first_tensor(bad_names):
    specs, served = _fp8_setup()
    tensors = _tensors(specs)
    for i, name in enumerate(bad_names):
        tensors[name].view(-1)[-1 - i] = (float("nan"), float("-inf"))[i % 2]
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("inf")  # a later bucket's: not named
    m = layout_buckets(specs, 256 << 10, quantization=Quantization(method="fp8_block"))
    plan = validate(m, served)
    k = next(e.bucket for e in m.tensors if e.name == bad_names[0])
    assert k != next(e.bucket for e in m.tensors if e.name == "model.layers.2.mlp.down_proj.weight")
    assert {e.bucket for e in m.tensors if e.name in bad_names} == {k}
    poster = _Poster(_pack(m, tensors))
    ring = [allocate(plan.ring_bytes, "cpu", shared=False) for _ in range(2)]
    with pytest.raises(errors.NonFinite) as info:
        receive(plan, allocate(plan.staging_nbytes, "cpu", shared=False), ring, poster)
    first = min(bad_names, key=lambda n: next(e.offset for e in m.tensors if e.name == n))
    assert info.value.tensor == first and info.value.bucket == k, (info.value.tensor, info.value.bucket)
    assert [j for what, j in poster.log if what == "wait"] == list(range(len(m.buckets)))


def test_fp8_staging_plans_one_grouped_launch_per_bucket():
    specs, served = _fp8_setup()
    m = layout_buckets(specs, 256 << 10, quantization=Quantization(method="fp8_block"))
    plan = validate(m, served)
    for b in plan.buckets:
        fill = b.fp8_fill
        grouped = {w.name for g in fill.grouped for w in g.weights}
        assert len(fill.grouped) <= 1
        assert grouped == {
            e.name for e in b.entries if e.name.endswith(("q_proj.weight", "down_proj.weight"))
        }
        assert {q.source for q in fill.single} == {e.name for e in b.entries if "k_proj" in e.name}
        assert {e.source for _, e in fill.copies} == {
            e.name
            for e in b.entries
            if e.name.endswith(("layernorm.weight", "embed_tokens.weight", "lm_head.weight"))
        }


def _fp8_big_ends():
    """An FP8 transfer whose embedding and lm_head are each larger than a bucket (as Llama-3-8B's)."""
    specs = [("model.embed_tokens.weight", (1024, 128), "bfloat16")]  # 256 KiB
    for i in range(2):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (128, 128), "bfloat16"),
            (p + "input_layernorm.weight", (128,), "bfloat16"),
            (p + "mlp.down_proj.weight", (130, 256), "bfloat16"),
        ]
    specs.append(("lm_head.weight", (1024, 128), "bfloat16"))
    m = layout_buckets(specs, 64 << 10, quantization=Quantization(method="fp8_block"))
    return specs, m, validate(m, _fp8_served(specs))


def test_fp8_buckets_of_kept_tensors_are_received_in_place_and_staged_unchanged():
    from weight_sync.fp8 import fp8_block_quant

    specs, m, plan = _fp8_big_ends()
    tensors = _tensors(specs, seed=5)
    kept = {n for n, *_ in specs if n.endswith(("embed_tokens.weight", "lm_head.weight", "layernorm.weight"))}
    in_place = [b for b in plan.buckets if b.staging_base is not None]
    assert {e.name for b in in_place for e in b.entries} >= {"model.embed_tokens.weight", "lm_head.weight"}
    for b in plan.buckets:  # in place exactly when every tensor of the bucket is kept as sent
        assert (b.staging_base is not None) == all(e.name in kept for e in b.entries), b.index
        assert (b.fp8_fill is None) == (b.staging_base is not None), b.index
    assert plan.ring_bytes == max(b.nbytes for b in plan.buckets if b.staging_base is None)
    assert plan.ring_bytes < 1024 * 128 * 2  # the ring no longer holds the embedding's bucket

    ring = [torch.full((plan.ring_bytes,), 0xFF, dtype=torch.uint8) for _ in range(2)]  # NaN bytes
    staging = torch.full((plan.staging_nbytes,), 0xFF, dtype=torch.uint8)
    receive(plan, staging, ring, _Poster(_pack(m, tensors)))
    staged = {st.name: staging[st.start : st.end].view(st.dtype).view(st.shape) for st in plan.staged}
    for name, *_ in specs:
        if name in kept:
            assert torch.equal(staged[name], tensors[name]), name
        else:
            q, scale = fp8_block_quant(tensors[name], name=name)
            scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
            assert torch.equal(staged[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(staged[scale_name], scale), scale_name


def test_fp8_in_place_bucket_refuses_a_non_finite_value_and_names_it():
    specs, m, plan = _fp8_big_ends()
    tensors = _tensors(specs)
    tensors["lm_head.weight"][7, 3] = float("nan")
    ring = [allocate(plan.ring_bytes, "cpu", shared=False) for _ in range(2)]
    with pytest.raises(errors.NonFinite) as info:
        receive(plan, allocate(plan.staging_nbytes, "cpu", shared=False), ring, _Poster(_pack(m, tensors)))
    assert info.value.tensor == "lm_head.weight" and info.value.bucket == len(m.buckets) - 1
