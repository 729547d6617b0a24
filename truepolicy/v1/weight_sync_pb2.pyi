from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_GLOO: _ClassVar[Backend]
    BACKEND_NCCL: _ClassVar[Backend]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3FN: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class QuantizationMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANTIZATION_METHOD_UNSPECIFIED: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_NONE: _ClassVar[QuantizationMethod]
    QUANTIZATION_METHOD_FP8_BLOCK: _ClassVar[QuantizationMethod]
BACKEND_UNSPECIFIED: Backend
BACKEND_GLOO: Backend
BACKEND_NCCL: Backend
DTYPE_UNSPECIFIED: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT8_E4M3FN: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
QUANTIZATION_METHOD_UNSPECIFIED: QuantizationMethod
QUANTIZATION_METHOD_NONE: QuantizationMethod
QUANTIZATION_METHOD_FP8_BLOCK: QuantizationMethod

class ConnectRequest(_message.Message):
    __slots__ = ("store_host", "store_port", "group_id", "rank", "world_size", "backend", "timeout_s")
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    store_host: str
    store_port: int
    group_id: str
    rank: int
    world_size: int
    backend: Backend
    timeout_s: float
    def __init__(self, store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., group_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., backend: _Optional[_Union[Backend, str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("group_id", "rank")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    rank: int
    def __init__(self, group_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "shape", "dtype", "bucket", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    bucket: int
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., bucket: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Quantization(_message.Message):
    __slots__ = ("method", "extra_keep")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEEP_FIELD_NUMBER: _ClassVar[int]
    method: QuantizationMethod
    extra_keep: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, method: _Optional[_Union[QuantizationMethod, str]] = ..., extra_keep: _Optional[_Iterable[str]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "buckets", "quantization")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    buckets: _containers.RepeatedScalarFieldContainer[int]
    quantization: Quantization
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., buckets: _Optional[_Iterable[int]] = ..., quantization: _Optional[_Union[Quantization, _Mapping]] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("version", "group_id", "manifest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    version: str
    group_id: str
    manifest: Manifest
    def __init__(self, version: _Optional[str] = ..., group_id: _Optional[str] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class PreparedTransfer(_message.Message):
    __slots__ = ("transfer_id", "version", "state", "buckets", "total_bytes")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    version: str
    state: str
    buckets: int
    total_bytes: int
    def __init__(self, transfer_id: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., buckets: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class CommitUpdateRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class CancelUpdateRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class CancelUpdateResponse(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("receive_s", "pause_s", "load_s", "flush_s", "paused_s", "total_s")
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    FLUSH_S_FIELD_NUMBER: _ClassVar[int]
    PAUSED_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    receive_s: float
    pause_s: float
    load_s: float
    flush_s: float
    paused_s: float
    total_s: float
    def __init__(self, receive_s: _Optional[float] = ..., pause_s: _Optional[float] = ..., load_s: _Optional[float] = ..., flush_s: _Optional[float] = ..., paused_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class TransferResult(_message.Message):
    __slots__ = ("transfer_id", "version", "state", "current_version", "bytes", "bandwidth_gbps", "cache_flushed", "timings")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FLUSHED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    version: str
    state: str
    current_version: str
    bytes: int
    bandwidth_gbps: float
    cache_flushed: bool
    timings: Timings
    def __init__(self, transfer_id: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., current_version: _Optional[str] = ..., bytes: _Optional[int] = ..., bandwidth_gbps: _Optional[float] = ..., cache_flushed: _Optional[bool] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "previous", "source", "pushes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    version: str
    previous: str
    source: str
    pushes: int
    def __init__(self, version: _Optional[str] = ..., previous: _Optional[str] = ..., source: _Optional[str] = ..., pushes: _Optional[int] = ...) -> None: ...
