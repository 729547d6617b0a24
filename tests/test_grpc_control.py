"""The sidecar's gRPC control transport: proto <-> wire models, and the one error table."""

from __future__ import annotations

import grpc
import pytest

from truepolicy.v1 import weight_sync_pb2 as pb
from weight_sync.sidecar import errors
from weight_sync.sidecar.grpc_control import _DTYPES, _QUANTIZATION, connect_from_proto, update_from_proto
from weight_sync.sidecar.plan import layout_buckets
from weight_sync.sidecar.wire import WIRE_DTYPES, Quantization, UpdateWeightsRequest


def _to_proto(req: UpdateWeightsRequest) -> pb.UpdateWeightsRequest:
    dtype_enum = {name: value for value, name in _DTYPES.items()}
    method_enum = {"none": pb.QUANTIZATION_METHOD_NONE, "fp8_block": pb.QUANTIZATION_METHOD_FP8_BLOCK}
    m = req.manifest
    return pb.UpdateWeightsRequest(
        version=req.version,
        group_id=req.group_id,
        manifest=pb.Manifest(
            tensors=[
                pb.TensorEntry(
                    name=t.name,
                    shape=list(t.shape),
                    dtype=dtype_enum[t.dtype],
                    bucket=t.bucket,
                    offset=t.offset,
                    nbytes=t.nbytes,
                )  # fmt: skip
                for t in m.tensors
            ],
            buckets=m.buckets,
            quantization=pb.Quantization(
                method=method_enum[m.quantization.method], extra_keep=list(m.quantization.extra_keep)
            ),
        ),
    )


@pytest.mark.parametrize("method", ["none", "fp8_block"])
def test_update_request_round_trips_through_the_proto(method):
    specs = [
        ("model.embed_tokens.weight", (1024, 128), "bfloat16"),
        ("model.layers.0.mlp.up_proj.weight", (256, 128), "bfloat16"),
        ("model.layers.0.input_layernorm.weight", (128,), "float32"),
        ("model.layers.0.self_attn.rotary.inv_freq", (16,), "float32"),
        ("step", (), "int64"),
    ]
    quantization = Quantization(method=method, extra_keep=(r".*\.up_proj\..*",) if method != "none" else ())
    manifest = layout_buckets(specs, 64 << 10, quantization)
    want = UpdateWeightsRequest(version="v7", group_id="g-1", manifest=manifest)
    assert update_from_proto(_to_proto(want)) == want


def test_every_wire_dtype_has_a_proto_enum_value_and_back():
    assert sorted(_DTYPES.values()) == sorted(WIRE_DTYPES)
    assert {pb.DType.Name(v) for v in _DTYPES} == set(pb.DType.keys()) - {"DTYPE_UNSPECIFIED"}
    assert set(_QUANTIZATION) == set(pb.QuantizationMethod.values())


def test_unset_enums_are_refused():
    with pytest.raises(errors.BadRequest, match="backend"):
        connect_from_proto(
            pb.ConnectRequest(store_host="h", store_port=1, group_id="g", rank=1, world_size=2)
        )
    bad = pb.UpdateWeightsRequest(
        version="v1",
        group_id="g",
        manifest=pb.Manifest(tensors=[pb.TensorEntry(name="w", shape=[2], nbytes=4)], buckets=[256]),
    )
    with pytest.raises(errors.BadRequest, match="w.dtype"):
        update_from_proto(bad)
    ok = connect_from_proto(
        pb.ConnectRequest(
            store_host="h", store_port=1, group_id="g", rank=1, world_size=2, backend=pb.BACKEND_GLOO
        )
    )
    assert ok.timeout_s == 120.0 and ok.backend == "gloo"


def _all_errors(cls=errors.SidecarError):
    yield cls
    for sub in cls.__subclasses__():
        yield from _all_errors(sub)


@pytest.mark.parametrize("cls", list(_all_errors()), ids=lambda c: c.__name__)
def test_error_table_gives_every_error_an_http_status_and_a_matching_grpc_code(cls):
    assert isinstance(cls.grpc_code, grpc.StatusCode) and cls.grpc_code != grpc.StatusCode.OK
    client_side = {
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    }  # fmt: skip
    assert (cls.status < 500) == (cls.grpc_code in client_side), (cls.status, cls.grpc_code)
