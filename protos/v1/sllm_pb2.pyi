from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    BAD_REQUEST: _ClassVar[ErrorReason]
    OUT_OF_ORDER: _ClassVar[ErrorReason]
    MODEL_MISMATCH: _ClassVar[ErrorReason]
    SESSION_ATTACHED: _ClassVar[ErrorReason]
    HISTORY_MISMATCH: _ClassVar[ErrorReason]
    SESSION_NOT_FOUND: _ClassVar[ErrorReason]
    SESSION_IDLE: _ClassVar[ErrorReason]
    SESSION_FULL: _ClassVar[ErrorReason]
    SERVER_FULL: _ClassVar[ErrorReason]
    SHUTTING_DOWN: _ClassVar[ErrorReason]
    MODEL_STOPPED: _ClassVar[ErrorReason]
    MODEL_FAILED: _ClassVar[ErrorReason]
    OPEN_TIMEOUT: _ClassVar[ErrorReason]
    BAD_TOKEN: _ClassVar[ErrorReason]
    SERVER_BUG: _ClassVar[ErrorReason]
    STREAM_ENDED: _ClassVar[ErrorReason]
    NO_REPLICA: _ClassVar[ErrorReason]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
ERROR_REASON_UNSPECIFIED: ErrorReason
BAD_REQUEST: ErrorReason
OUT_OF_ORDER: ErrorReason
MODEL_MISMATCH: ErrorReason
SESSION_ATTACHED: ErrorReason
HISTORY_MISMATCH: ErrorReason
SESSION_NOT_FOUND: ErrorReason
SESSION_IDLE: ErrorReason
SESSION_FULL: ErrorReason
SERVER_FULL: ErrorReason
SHUTTING_DOWN: ErrorReason
MODEL_STOPPED: ErrorReason
MODEL_FAILED: ErrorReason
OPEN_TIMEOUT: ErrorReason
BAD_TOKEN: ErrorReason
SERVER_BUG: ErrorReason
STREAM_ENDED: ErrorReason
NO_REPLICA: ErrorReason

class Vectors(_message.Message):
    __slots__ = ("data", "dtype", "dim", "count")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    dim: int
    count: int
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., dim: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("model_id", "dim", "session_id", "history", "reply_dtype", "keep_on_disconnect", "speculate")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    REPLY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEEP_ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dim: int
    session_id: str
    history: Vectors
    reply_dtype: DType
    keep_on_disconnect: bool
    speculate: int
    def __init__(self, model_id: _Optional[str] = ..., dim: _Optional[int] = ..., session_id: _Optional[str] = ..., history: _Optional[_Union[Vectors, _Mapping]] = ..., reply_dtype: _Optional[_Union[DType, str]] = ..., keep_on_disconnect: _Optional[bool] = ..., speculate: _Optional[int] = ...) -> None: ...

class Append(_message.Message):
    __slots__ = ("vectors", "position", "decoding")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    vectors: Vectors
    position: int
    decoding: Decoding
    def __init__(self, vectors: _Optional[_Union[Vectors, _Mapping]] = ..., position: _Optional[int] = ..., decoding: _Optional[_Union[Decoding, _Mapping]] = ...) -> None: ...

class Decoding(_message.Message):
    __slots__ = ("guess", "repetition_penalty", "no_repeat_ngram_size", "no_repeat_sentence", "max_tokens", "stop_threshold", "min_sentences", "max_sentences", "stop_scale", "stop_offsets")
    GUESS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_SENTENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    STOP_SCALE_FIELD_NUMBER: _ClassVar[int]
    STOP_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    guess: bool
    repetition_penalty: float
    no_repeat_ngram_size: int
    no_repeat_sentence: bool
    max_tokens: int
    stop_threshold: float
    min_sentences: int
    max_sentences: int
    stop_scale: float
    stop_offsets: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, guess: _Optional[bool] = ..., repetition_penalty: _Optional[float] = ..., no_repeat_ngram_size: _Optional[int] = ..., no_repeat_sentence: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., stop_threshold: _Optional[float] = ..., min_sentences: _Optional[int] = ..., max_sentences: _Optional[int] = ..., stop_scale: _Optional[float] = ..., stop_offsets: _Optional[_Iterable[float]] = ...) -> None: ...

class Accept(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ("keep",)
    KEEP_FIELD_NUMBER: _ClassVar[int]
    keep: bool
    def __init__(self, keep: _Optional[bool] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("open", "append", "close", "accept")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    open: Open
    append: Append
    close: Close
    accept: Accept
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., append: _Optional[_Union[Append, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., accept: _Optional[_Union[Accept, _Mapping]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("hidden", "stop", "stop_probability", "past_length", "speculative", "assumed", "epoch", "declined")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    PAST_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    ASSUMED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    hidden: Vectors
    stop: bool
    stop_probability: float
    past_length: int
    speculative: bool
    assumed: Vectors
    epoch: int
    declined: bool
    def __init__(self, hidden: _Optional[_Union[Vectors, _Mapping]] = ..., stop: _Optional[bool] = ..., stop_probability: _Optional[float] = ..., past_length: _Optional[int] = ..., speculative: _Optional[bool] = ..., assumed: _Optional[_Union[Vectors, _Mapping]] = ..., epoch: _Optional[int] = ..., declined: _Optional[bool] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "past_length", "resumed", "last", "remaining_sentences", "speculate", "speculate_note")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PAST_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    REMAINING_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_NOTE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    past_length: int
    resumed: bool
    last: Step
    remaining_sentences: int
    speculate: int
    speculate_note: str
    def __init__(self, session_id: _Optional[str] = ..., past_length: _Optional[int] = ..., resumed: _Optional[bool] = ..., last: _Optional[_Union[Step, _Mapping]] = ..., remaining_sentences: _Optional[int] = ..., speculate: _Optional[int] = ..., speculate_note: _Optional[str] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("session_id", "kept")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kept: bool
    def __init__(self, session_id: _Optional[str] = ..., kept: _Optional[bool] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("opened", "step", "closed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    step: Step
    closed: Closed
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "dim", "compute_dtype", "accepted_dtypes", "num_layers", "max_sentences", "max_sessions", "max_message_bytes", "idle_timeout_s", "kv_budget_bytes", "kv_bytes_per_sentence", "device", "batching", "max_batch", "weights_sha256")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_SENTENCE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dim: int
    compute_dtype: str
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    num_layers: int
    max_sentences: int
    max_sessions: int
    max_message_bytes: int
    idle_timeout_s: float
    kv_budget_bytes: int
    kv_bytes_per_sentence: int
    device: str
    batching: bool
    max_batch: int
    weights_sha256: str
    def __init__(self, model_id: _Optional[str] = ..., dim: _Optional[int] = ..., compute_dtype: _Optional[str] = ..., accepted_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., num_layers: _Optional[int] = ..., max_sentences: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ..., kv_budget_bytes: _Optional[int] = ..., kv_bytes_per_sentence: _Optional[int] = ..., device: _Optional[str] = ..., batching: _Optional[bool] = ..., max_batch: _Optional[int] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("sessions", "attached_sessions", "kv_bytes", "kv_budget_bytes", "queue_depth", "steps_total", "sentences_total", "forward_passes_total", "mean_batch_size", "max_batch_size_seen", "steps_per_second", "sessions_opened_total", "sessions_evicted_total", "errors_by_code", "uptime_s", "batch_size_histogram", "speculative_steps_total", "speculation_accepted_total", "speculation_dropped_total", "speculation_decode_tokens_total", "speculate_max")
    class ErrorsByCodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BatchSizeHistogramEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_SEEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPENED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_EVICTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERRORS_BY_CODE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_ACCEPTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_DECODE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_MAX_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    attached_sessions: int
    kv_bytes: int
    kv_budget_bytes: int
    queue_depth: int
    steps_total: int
    sentences_total: int
    forward_passes_total: int
    mean_batch_size: float
    max_batch_size_seen: int
    steps_per_second: float
    sessions_opened_total: int
    sessions_evicted_total: int
    errors_by_code: _containers.ScalarMap[str, int]
    uptime_s: float
    batch_size_histogram: _containers.ScalarMap[int, int]
    speculative_steps_total: int
    speculation_accepted_total: int
    speculation_dropped_total: int
    speculation_decode_tokens_total: int
    speculate_max: int
    def __init__(self, sessions: _Optional[int] = ..., attached_sessions: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., queue_depth: _Optional[int] = ..., steps_total: _Optional[int] = ..., sentences_total: _Optional[int] = ..., forward_passes_total: _Optional[int] = ..., mean_batch_size: _Optional[float] = ..., max_batch_size_seen: _Optional[int] = ..., steps_per_second: _Optional[float] = ..., sessions_opened_total: _Optional[int] = ..., sessions_evicted_total: _Optional[int] = ..., errors_by_code: _Optional[_Mapping[str, int]] = ..., uptime_s: _Optional[float] = ..., batch_size_histogram: _Optional[_Mapping[int, int]] = ..., speculative_steps_total: _Optional[int] = ..., speculation_accepted_total: _Optional[int] = ..., speculation_dropped_total: _Optional[int] = ..., speculation_decode_tokens_total: _Optional[int] = ..., speculate_max: _Optional[int] = ...) -> None: ...
