"""JSON-RPC 2.0 without I/O: parse a body, bind params to a signature, encode answers.

The server (:mod:`resilient.rpc.server`) does the ASGI part and calls in here with
bytes; everything here is plain functions over bytes and msgspec types, decided once
per method at registration where it can be:

* :func:`parse` turns a body into one :class:`Request`, a list of them (a batch),
  or the bytes of the single error answer (parse error, empty or oversized batch).
  A request object is decoded by one typed msgspec decoder whose ``params`` and
  ``id`` stay :class:`msgspec.Raw`: params are decoded later by the method's own
  decoder, and the id is echoed byte for byte. Only a request that fails that
  decoder takes the slow path that says which member is wrong.
* :class:`Signature` is a handler's parameters, built at registration: two msgspec
  Structs (by position, by name) whose decoders validate the params against the
  annotations; a mismatch becomes :class:`~resilient.rpc.errors.InvalidParams`
  naming the parameter and why. An annotation msgspec cannot decode from JSON is
  refused there, with a ``TypeError``, rather than at every call.
* :func:`result_body` and :func:`error_body` encode answers; constant errors are
  encoded once, at import.
* :func:`deadline_from_headers` reads ``resilient-timeout-ms``, ``grpc-timeout`` and
  ``connect-timeout-ms``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Final

import msgspec

from resilient.deadline import parse_connect_timeout, parse_deadline_header, parse_grpc_timeout
from resilient.rpc.errors import (
    InvalidParams,
    InvalidRequest,
    ParseError,
    RemoteError,
)

__all__ = [
    "ABSENT",
    "Request",
    "Signature",
    "content_type_ok",
    "deadline_from_headers",
    "depth_over",
    "error_body",
    "error_object",
    "parse",
    "parse_one",
    "result_body",
]

#: The default of a member the request left out (``params``, ``id``): an empty Raw.
ABSENT: Final = msgspec.Raw(b"")
#: The id of an answer whose request's id could not be read.
NULL: Final = b"null"


class Request(msgspec.Struct, gc=False):
    """One request object as the wire has it; ``params`` and ``id`` are not decoded yet."""

    jsonrpc: str
    method: str
    params: msgspec.Raw = ABSENT
    id: msgspec.Raw = ABSENT


_decode_request = msgspec.json.Decoder(Request).decode
_decode_batch = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_any = msgspec.json.decode
_encode = msgspec.json.encode

# Encoding answers ----------------------------------------------------------------------


def error_object(error: RemoteError) -> bytes:
    """The JSON of an error object: ``{"code", "message"}`` and ``data`` when there is some."""
    if error.data is None:
        return _encode({"code": error.code, "message": error.message})
    return _encode({"code": error.code, "message": error.message, "data": error.data})


def error_body(id: bytes, error: RemoteError | bytes) -> bytes:
    """The answer carrying ``error`` (an error or its encoded object) for the request ``id``."""
    encoded = error if isinstance(error, bytes) else error_object(error)
    return b'{"jsonrpc":"2.0","error":' + encoded + b',"id":' + id + b"}"


def result_body(id: bytes, result: bytes) -> bytes:
    """The answer carrying ``result`` (already encoded) for the request ``id``."""
    return b'{"jsonrpc":"2.0","result":' + result + b',"id":' + id + b"}"


PARSE_ERROR: Final = error_body(NULL, ParseError())
EMPTY_BATCH: Final = error_body(NULL, InvalidRequest(data="an empty batch is not a request"))


# Parsing ----------------------------------------------------------------------------

_WHITESPACE: Final = b" \t\r\n"
# A JSON string, to blank out before counting brackets. An unclosed one (or one ending
# in a lone backslash) runs to the end of the input, so a match never fails: with
# failures, every later quote would start a new scan to the end, quadratic in all.
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
# Every byte but the four brackets, deleted before the depth walk.
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_STEP: Final = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def depth_over(body: bytes, max_depth: int) -> bool:
    """Whether the JSON in ``body`` nests arrays and objects deeper than ``max_depth``.

    msgspec has no depth limit of its own (it stops at the interpreter's recursion
    limit). Counting every opening bracket is two scans in C and settles nearly every
    request; only a body with more brackets than ``max_depth`` is walked: strings
    blanked out, then the running depth of the brackets left. Every step is linear in
    the body. Brackets that do not balance are not JSON at all: ``False``, so that the
    parser refuses the body as a parse error rather than as too deep.
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if 2 * (brackets.count(b"[") + brackets.count(b"{")) != len(brackets):
        return False
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > max_depth


Parsed = Request | bytes
"""A request ready to dispatch, or the encoded answer to a request that is not one."""


def _explain(entry: bytes, rejected: str) -> bytes:
    """The invalid-request answer for an entry that failed the typed decoder: say why.

    The slow path, taken only for bad requests: decode the entry as any JSON and
    look at each member in turn; ``rejected`` is what the typed decoder said, for
    what that look cannot tell (duplicate members: the last one wins here).
    Raises :class:`msgspec.DecodeError` if it is not JSON.
    """
    try:
        value = _decode_any(entry)
    except msgspec.ValidationError as error:  # JSON, but not Python: 1e400
        return error_body(NULL, InvalidRequest(data=f"{_NOT_A_REQUEST}: {error}"))
    if not isinstance(value, dict):
        return error_body(NULL, InvalidRequest(data="a request must be a JSON object"))
    id_value = value.get("id")
    id = NULL
    if _valid_id(id_value):
        id = _encode(id_value)
    if value.get("jsonrpc") != "2.0":
        why = 'the "jsonrpc" member must be exactly "2.0"'
    elif "method" not in value:
        why = 'the "method" member is missing'
    elif not isinstance(value["method"], str):
        why = 'the "method" member must be a string'
    else:
        why = f"{_NOT_A_REQUEST}: {rejected}"
    return error_body(id, InvalidRequest(data=why))


_NOT_A_REQUEST: Final = "not a valid JSON-RPC 2.0 request object"


def _valid_id(value: object) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


# First byte of each JSON value an id may be: a string, a number or null.
_ID_STARTS: Final = frozenset(b'"-0123456789n')
_PARAMS_STARTS: Final = frozenset(b"[{")


def _check(request: Request, entry: bytes) -> Parsed:
    """The request if its ``id`` and ``params`` have allowed types, else its error answer."""
    id = request.id
    if id is not ABSENT and bytes(id)[0] not in _ID_STARTS:
        return error_body(
            NULL, InvalidRequest(data='the "id" member must be a string, a number or null')
        )
    params = request.params
    if params is not ABSENT and bytes(params)[0] not in _PARAMS_STARTS:
        return error_body(
            NULL if id is ABSENT else bytes(id),
            InvalidRequest(data='the "params" member must be an array or an object'),
        )
    if request.jsonrpc != "2.0":
        return _explain(entry, 'the "jsonrpc" member must be exactly "2.0"')
    return request


def parse_one(entry: bytes) -> Parsed:
    """One request object (a whole body, or one entry of a batch)."""
    try:
        request = _decode_request(entry)
    except msgspec.ValidationError as error:
        return _explain(entry, str(error))
    return _check(request, entry)


def parse(body: bytes, *, max_depth: int, max_batch: int) -> Parsed | list[Parsed]:
    """Parse a whole body: one request, a batch of them, or the single error answer.

    Never raises for bad input: everything that is not a request becomes its answer.
    """
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            return error_body(
                NULL, ParseError(data=f"the body is not UTF-8: bad byte at {error.start}")
            )
    if depth_over(body, max_depth):
        return error_body(
            NULL,
            InvalidRequest(data=f"the JSON nests deeper than max_depth={max_depth} levels"),
        )
    first = body[:1]
    if first in _WHITESPACE and first:
        first = body.lstrip(_WHITESPACE)[:1]
    try:
        if first != b"[":
            return parse_one(body)
        entries = _decode_batch(body)
    except (msgspec.DecodeError, RecursionError):
        return PARSE_ERROR
    if not entries:
        return EMPTY_BATCH
    if len(entries) > max_batch:
        return error_body(
            NULL,
            InvalidRequest(
                data=f"a batch of {len(entries)} requests is over max_batch={max_batch}"
            ),
        )
    return [parse_one(bytes(entry)) for entry in entries]


# Headers ---------------------------------------------------------------------------


def deadline_from_headers(
    resilient: bytes | None, grpc: bytes | None, connect: bytes | None, *, maximum: float
) -> float:
    """Seconds the caller gave the request, clamped to ``maximum`` (``inf``: no limit).

    Every header present counts and the shortest budget wins (never extend a
    deadline), as in :class:`resilient.asgi.DeadlineMiddleware`. Raises ``ValueError``
    for a malformed one, even beside a valid one.
    """
    limit = 1e12 if math.isinf(maximum) else maximum
    seconds = math.inf
    if resilient is not None:
        seconds = parse_deadline_header(resilient, maximum=limit)
    if grpc is not None:
        seconds = min(seconds, parse_grpc_timeout(grpc, maximum=limit))
    if connect is not None:
        seconds = min(seconds, parse_connect_timeout(connect, maximum=limit))
    return seconds if seconds < maximum else maximum


def content_type_ok(value: bytes | None) -> bool:
    """Whether a ``Content-Type`` names JSON: ``application/json``, charset UTF-8 if any.

    No header at all is accepted: many callers leave it out, and the body is parsed
    strictly anyway.
    """
    if value is None or value == b"application/json":
        return True
    kind, _, parameters = value.partition(b";")
    if kind.strip().lower() != b"application/json":
        return False
    for parameter in parameters.split(b";"):
        key, _, setting = parameter.partition(b"=")
        if key.strip().lower() == b"charset" and setting.strip().strip(b'"').lower() not in (
            b"utf-8",
            b"utf8",
        ):
            return False
    return True


# Signatures ------------------------------------------------------------------------

_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_AT: Final = re.compile(r" - at `\$(?:\.([^.\[`]+)|\[(\d+)\])")
_decode_array = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_NO_PARAMS: Final = msgspec.Raw(b"{}")


def _undecodable(info: msgspec.inspect.Type, seen: set[int]) -> type | None:
    """The first class in ``info`` msgspec would need a ``dec_hook`` for, if any.

    msgspec builds a decoder for any class (it takes one it does not know for a custom
    type), so a parameter annotated with one would refuse every call; this finds it
    at registration. ``object`` is the exception: msgspec decodes it as ``Any``.
    """
    if isinstance(info, msgspec.inspect.CustomType):
        return None if info.cls is object else info.cls
    if isinstance(info, msgspec.inspect.ExtType):  # MessagePack only
        return msgspec.msgpack.Ext
    if id(info) in seen:  # a recursive Struct
        return None
    seen.add(id(info))
    for value in msgspec.structs.astuple(info):
        for item in value if isinstance(value, tuple) else (value,):
            inner = item.type if isinstance(item, msgspec.inspect.Field) else item
            if isinstance(inner, msgspec.inspect.Type):
                found = _undecodable(inner, seen)
                if found is not None:
                    return found
    return None


def _described(annotation: Any) -> Any:
    """``annotation`` if msgspec can write its JSON Schema (for ``rpc.discover``), else Any."""
    try:
        msgspec.json.schema(annotation)
    except (TypeError, ValueError):
        return Any
    return annotation


class Signature:
    """A handler's parameters, turned into msgspec decoders once, at registration.

    :meth:`bind` decodes the raw params (an array binds by position, an object by
    name) into ``(args, kwargs)`` for the handler, raising :class:`InvalidParams`
    whose ``data`` is ``{"param": name, "reason": why}``. ``described`` holds a type
    per parameter, then one for the result, that msgspec can write a JSON Schema
    for (``Any`` where the annotation has none, such as ``object``).
    """

    __slots__ = (
        "_by_name",
        "_by_position",
        "_keyword_names",
        "_positional_count",
        "_positional_required",
        "described",
        "names",
        "parameters",
        "positional_names",
        "required",
    )

    def __init__(self, fn: Callable[..., Any], method: str) -> None:
        try:
            signature = inspect.signature(fn, eval_str=True)
        except NameError as error:
            raise TypeError(
                f"the annotations of the handler for {method!r} do not resolve: {error}"
            ) from None
        positional: list[tuple[Any, ...]] = []
        keyword: list[tuple[Any, ...]] = []
        self.parameters: dict[str, inspect.Parameter] = {}
        for parameter in signature.parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TypeError(
                    f"the handler for {method!r} takes *{parameter.name} or **{parameter.name}:"
                    " JSON-RPC params bind to named parameters only; list them"
                )
            annotation = Any if parameter.annotation is parameter.empty else parameter.annotation
            _check_decodable(method, parameter.name, annotation)
            field: tuple[Any, ...] = (parameter.name, annotation)
            if parameter.default is not parameter.empty:
                field = (*field, parameter.default)
            (positional if parameter.kind in _POSITIONAL else keyword).append(field)
            self.parameters[parameter.name] = parameter
        returns = signature.return_annotation
        self.described = [
            *(_described(field[1]) for field in (*positional, *keyword)),
            Any if returns is signature.empty else _described(returns),
        ]
        self.names = [field[0] for field in (*positional, *keyword)]
        self.positional_names = [field[0] for field in positional]
        self.required = frozenset(
            name for name, p in self.parameters.items() if p.default is p.empty
        )
        self._positional_count = len(positional)
        self._positional_required = sum(len(field) == 2 for field in positional)
        self._keyword_names = tuple(field[0] for field in keyword)
        by_name = msgspec.defstruct(
            f"{method}:by_name",
            [*positional, *keyword],
            kw_only=True,
            forbid_unknown_fields=True,
        )
        self._by_name = msgspec.json.Decoder(by_name).decode
        # Keyword-only parameters cannot be given by position; without defaults
        # they rule out a positional call.
        self._by_position: Callable[[bytes], Any] | None = None
        if not any(len(field) == 2 for field in keyword):
            by_position = msgspec.defstruct(
                f"{method}:by_position",
                positional,
                array_like=True,
                forbid_unknown_fields=True,
            )
            self._by_position = msgspec.json.Decoder(by_position).decode

    @property
    def by_position(self) -> bool:
        """Whether the params may be given by position (no required keyword-only ones)."""
        return self._by_position is not None

    def bind(self, params: msgspec.Raw) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Decode ``params`` (``ABSENT``: none given) into the handler's arguments."""
        by_position = params is not ABSENT and bytes(params)[0] == 0x5B  # "["
        try:
            if by_position:
                if self._by_position is None:
                    raise self._keyword_only()
                values = msgspec.structs.astuple(self._by_position(params))
            else:
                values = msgspec.structs.astuple(
                    self._by_name(_NO_PARAMS if params is ABSENT else params)
                )
        except msgspec.ValidationError as error:
            given = _NO_PARAMS if params is ABSENT else params
            raise self._invalid(given, by_position, str(error)) from None
        count = self._positional_count
        if len(values) == count:
            return values, {}
        return values[:count], dict(zip(self._keyword_names, values[count:], strict=True))

    def _keyword_only(self) -> InvalidParams:
        name = next(
            name
            for name in self._keyword_names
            if name in self.required  # the ones that made the positional form impossible
        )
        return InvalidParams(
            data={"param": name, "reason": "keyword-only: give the params by name (an object)"}
        )

    def _invalid(self, params: msgspec.Raw, by_position: bool, message: str) -> InvalidParams:
        """Which parameter is wrong and why, as ``{"param", "reason"}``.

        Too many, too few and unknown params are told from the params themselves
        (their count, or their names against the signature's); what is left is a
        value of the wrong type, whose parameter msgspec's message locates.
        """
        if by_position:
            count = len(_decode_array(params))
            if count > self._positional_count:
                return InvalidParams(
                    data={
                        "reason": f"unexpected: at most {self._positional_count} params by position"
                    }
                )
            if count < self._positional_required:
                return InvalidParams(
                    data={"param": self.positional_names[count], "reason": "missing"}
                )
        else:
            given = _decode_object(params)
            unknown = next((name for name in given if name not in self.parameters), None)
            if unknown is not None:
                return InvalidParams(
                    data={"param": unknown, "reason": "unexpected: no such parameter"}
                )
            missing = next(
                (name for name in self.names if name in self.required and name not in given), None
            )
            if missing is not None:
                return InvalidParams(data={"param": missing, "reason": "missing"})
        at = _AT.search(message)
        if at is None:  # pragma: no cover - msgspec locates every other mismatch
            return InvalidParams(data={"reason": message})
        param = at[1] if at[1] is not None else self.positional_names[int(at[2])]
        return InvalidParams(data={"param": param, "reason": message[: at.start()]})


def _check_decodable(method: str, name: str, annotation: Any) -> None:
    """Refuse, naming it, a parameter whose type msgspec cannot decode from JSON."""
    try:
        culprit = _undecodable(msgspec.inspect.type_info(annotation), set())
    except TypeError as error:
        reason = str(error)
    else:
        if culprit is None:
            return
        reason = f"{culprit.__module__}.{culprit.__qualname__} is not a type it decodes"
    raise TypeError(
        f"the handler for {method!r} has a parameter type msgspec cannot decode: "
        f"{name}: {_type_name(annotation)} ({reason}); annotate it with a type msgspec "
        "decodes from JSON (builtins, Struct, dataclass, TypedDict, ...)"
    )


def _type_name(annotation: Any) -> str:
    return annotation.__qualname__ if isinstance(annotation, type) else repr(annotation)
