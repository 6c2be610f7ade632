from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Request(_message.Message):
    __slots__ = ("uid", "role", "num_conn", "rate", "lease")
    UID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_CONN_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    uid: str
    role: str
    num_conn: int
    rate: int
    lease: int
    def __init__(self, uid: _Optional[str] = ..., role: _Optional[str] = ..., num_conn: _Optional[int] = ..., rate: _Optional[int] = ..., lease: _Optional[int] = ...) -> None: ...

class UpdateTargets(_message.Message):
    __slots__ = ("uid", "remote_listeners", "role", "wan_secret")
    UID_FIELD_NUMBER: _ClassVar[int]
    REMOTE_LISTENERS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WAN_SECRET_FIELD_NUMBER: _ClassVar[int]
    uid: str
    remote_listeners: _containers.RepeatedScalarFieldContainer[str]
    role: str
    wan_secret: bytes
    def __init__(self, uid: _Optional[str] = ..., remote_listeners: _Optional[_Iterable[str]] = ..., role: _Optional[str] = ..., wan_secret: _Optional[bytes] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("uid",)
    UID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    def __init__(self, uid: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("uid", "prod_listeners", "role")
    UID_FIELD_NUMBER: _ClassVar[int]
    PROD_LISTENERS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    uid: str
    prod_listeners: _containers.RepeatedScalarFieldContainer[str]
    role: str
    def __init__(self, uid: _Optional[str] = ..., prod_listeners: _Optional[_Iterable[str]] = ..., role: _Optional[str] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("listeners", "prod_listeners", "wan_secret", "wan_security")
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    PROD_LISTENERS_FIELD_NUMBER: _ClassVar[int]
    WAN_SECRET_FIELD_NUMBER: _ClassVar[int]
    WAN_SECURITY_FIELD_NUMBER: _ClassVar[int]
    listeners: _containers.RepeatedScalarFieldContainer[str]
    prod_listeners: _containers.RepeatedScalarFieldContainer[str]
    wan_secret: bytes
    wan_security: str
    def __init__(self, listeners: _Optional[_Iterable[str]] = ..., prod_listeners: _Optional[_Iterable[str]] = ..., wan_secret: _Optional[bytes] = ..., wan_security: _Optional[str] = ...) -> None: ...

class AppResponse(_message.Message):
    __slots__ = ("message", "listeners")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    message: str
    listeners: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, message: _Optional[str] = ..., listeners: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("uid",)
    UID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    def __init__(self, uid: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("uid", "role", "state", "owner", "listeners", "targets", "num_conn", "rate", "bytes_in", "bytes_out", "created", "lease_expires", "last_error", "wan_security", "server_type", "connections", "ended", "connected", "total_connections", "refused_connections", "rate_not_enforced", "node", "instance", "cut_streams", "legs", "bottleneck", "udp", "udp_counters")
    class UdpCountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    UID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    NUM_CONN_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    WAN_SECURITY_FIELD_NUMBER: _ClassVar[int]
    SERVER_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    RATE_NOT_ENFORCED_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CUT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    LEGS_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_FIELD_NUMBER: _ClassVar[int]
    UDP_FIELD_NUMBER: _ClassVar[int]
    UDP_COUNTERS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    role: str
    state: str
    owner: str
    listeners: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedScalarFieldContainer[str]
    num_conn: int
    rate: int
    bytes_in: int
    bytes_out: int
    created: float
    lease_expires: float
    last_error: str
    wan_security: str
    server_type: str
    connections: int
    ended: float
    connected: float
    total_connections: int
    refused_connections: int
    rate_not_enforced: bool
    node: str
    instance: str
    cut_streams: int
    legs: _containers.RepeatedCompositeFieldContainer[LegTelemetry]
    bottleneck: str
    udp: str
    udp_counters: _containers.ScalarMap[str, int]
    def __init__(self, uid: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., owner: _Optional[str] = ..., listeners: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[str]] = ..., num_conn: _Optional[int] = ..., rate: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., created: _Optional[float] = ..., lease_expires: _Optional[float] = ..., last_error: _Optional[str] = ..., wan_security: _Optional[str] = ..., server_type: _Optional[str] = ..., connections: _Optional[int] = ..., ended: _Optional[float] = ..., connected: _Optional[float] = ..., total_connections: _Optional[int] = ..., refused_connections: _Optional[int] = ..., rate_not_enforced: _Optional[bool] = ..., node: _Optional[str] = ..., instance: _Optional[str] = ..., cut_streams: _Optional[int] = ..., legs: _Optional[_Iterable[_Union[LegTelemetry, _Mapping]]] = ..., bottleneck: _Optional[str] = ..., udp: _Optional[str] = ..., udp_counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class LegTelemetry(_message.Message):
    __slots__ = ("leg", "connections", "rtt_ms", "min_rtt_ms", "rcv_rtt_ms", "cwnd", "mss", "delivery_rate_bps", "sent_bps", "received_bps", "retrans", "segs_sent", "retrans_pct", "total_retrans", "busy", "rwnd_limited", "sndbuf_limited", "cwnd_limited", "app_limited", "sampled")
    LEG_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_RTT_MS_FIELD_NUMBER: _ClassVar[int]
    RCV_RTT_MS_FIELD_NUMBER: _ClassVar[int]
    CWND_FIELD_NUMBER: _ClassVar[int]
    MSS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_RATE_BPS_FIELD_NUMBER: _ClassVar[int]
    SENT_BPS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BPS_FIELD_NUMBER: _ClassVar[int]
    RETRANS_FIELD_NUMBER: _ClassVar[int]
    SEGS_SENT_FIELD_NUMBER: _ClassVar[int]
    RETRANS_PCT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_RETRANS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    RWND_LIMITED_FIELD_NUMBER: _ClassVar[int]
    SNDBUF_LIMITED_FIELD_NUMBER: _ClassVar[int]
    CWND_LIMITED_FIELD_NUMBER: _ClassVar[int]
    APP_LIMITED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    leg: str
    connections: int
    rtt_ms: float
    min_rtt_ms: float
    rcv_rtt_ms: float
    cwnd: int
    mss: int
    delivery_rate_bps: int
    sent_bps: int
    received_bps: int
    retrans: int
    segs_sent: int
    retrans_pct: float
    total_retrans: int
    busy: float
    rwnd_limited: float
    sndbuf_limited: float
    cwnd_limited: float
    app_limited: float
    sampled: bool
    def __init__(self, leg: _Optional[str] = ..., connections: _Optional[int] = ..., rtt_ms: _Optional[float] = ..., min_rtt_ms: _Optional[float] = ..., rcv_rtt_ms: _Optional[float] = ..., cwnd: _Optional[int] = ..., mss: _Optional[int] = ..., delivery_rate_bps: _Optional[int] = ..., sent_bps: _Optional[int] = ..., received_bps: _Optional[int] = ..., retrans: _Optional[int] = ..., segs_sent: _Optional[int] = ..., retrans_pct: _Optional[float] = ..., total_retrans: _Optional[int] = ..., busy: _Optional[float] = ..., rwnd_limited: _Optional[float] = ..., sndbuf_limited: _Optional[float] = ..., cwnd_limited: _Optional[float] = ..., app_limited: _Optional[float] = ..., sampled: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("sessions", "server_time", "omitted")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    server_time: float
    omitted: int
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., server_time: _Optional[float] = ..., omitted: _Optional[int] = ...) -> None: ...
