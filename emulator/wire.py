"""The emulated NIC's wire format: msgpack messages between a client and a memory node.

request  = [VERBS, seq, rkey, [[opcode, addr, a, b], ...]]     one message per MN per batch
         | [CONTROL, seq, name, {args}]                          region info, ping, extensions
reply    = [seq, [completion, ...], error]                       error = None | [index, code, text]

A batch executes in order on the MN; at the first failure the MN stops (later requests are
flushed, as on an RC queue pair in the error state) and reports which one failed. ``seq``
lets a client drop a late reply to a request it already timed out on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    import zmq

from fusee.emulator import _atomic
from fusee.errors import Fenced, NodeRestarted
from fusee.verbs import (AllocBlock, Cas, ControlError, Faa, FreeBlock, MASK64, Read,
                         RemoteAccessError, Request, TransportError, Write)

VERBS, CONTROL = 0, 1
OP_READ, OP_WRITE, OP_CAS, OP_FAA, OP_ALLOC, OP_FREE = range(6)
ERR_ACCESS, ERR_CONTROL, ERR_MALFORMED, ERR_FENCED, ERR_WRONG_KEY = 1, 2, 3, 4, 5

_OPCODE = {Read: OP_READ, Write: OP_WRITE, Cas: OP_CAS, Faa: OP_FAA,
           AllocBlock: OP_ALLOC, FreeBlock: OP_FREE}
_ERRORS = {ERR_ACCESS: RemoteAccessError, ERR_CONTROL: ControlError,
           ERR_MALFORMED: RemoteAccessError, ERR_FENCED: Fenced, ERR_WRONG_KEY: NodeRestarted}


#: one Packer for the process: cheaper than msgpack.packb's fresh one per call, and safe to
#: share between threads (packing holds the GIL throughout)
_pack = msgpack.Packer().pack
_pack_verbs = _atomic.pack
_unpack_reply = _atomic.unpack
_ONE_SIDED = (Read, Write, Cas, Faa)        # the order _atomic.pack expects


class MalformedMessage(ValueError):
    """Bytes that are not a request this protocol knows."""


def encode_verbs(seq: int, rkey: int, batch, positions: list[int] | None = None) -> bytes:
    """The request for ``batch``, or for its requests at ``positions`` (one MN's part of a
    batch): written in one C call when they are only one-sided verbs with well-formed
    operands (``_atomic.pack``), else here, operands as they are (the MN refuses what it
    must)."""
    packed = _pack_verbs(seq, rkey, batch, _ONE_SIDED, positions)
    if packed is not None:
        return packed
    if positions is not None:
        batch = [batch[i] for i in positions]
    ops: list[tuple[Any, ...]] = []
    for r in batch:
        t = type(r)
        if t is Read:
            ops.append((OP_READ, r.addr, r.length))
        elif t is Write:
            ops.append((OP_WRITE, r.addr, bytes(r.data)))
        elif t is Cas:
            ops.append((OP_CAS, r.addr, r.expected, r.desired))
        elif t is Faa:
            ops.append((OP_FAA, r.addr, r.delta & MASK64))
        elif t is AllocBlock:
            ops.append((OP_ALLOC, r.owner, r.at) if r.at else (OP_ALLOC, r.owner))
        else:
            ops.append((OP_FREE, r.owner, r.addr))
    return _pack((VERBS, seq, rkey, ops))


def encode_control(seq: int, name: str, args: dict) -> bytes:
    return _pack((CONTROL, seq, name, args))


def decode_request(data: bytes | zmq.Frame):
    """-> (kind, seq, rkey_or_name, ops_or_args); raises MalformedMessage."""
    try:
        msg = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
        kind, seq, key, body = msg
    except Exception as e:
        raise MalformedMessage(f"undecodable request: {e}") from None
    if type(seq) is not int:
        raise MalformedMessage("sequence number must be an int")
    if kind == VERBS and type(key) is int and type(body) is list:
        return kind, seq, key, body
    if kind == CONTROL and type(key) is str and type(body) is dict:
        return kind, seq, key, body
    raise MalformedMessage("not a verbs or control request")


def parse_op(op):
    """One decoded [opcode, ...] list -> a fusee.verbs request (node filled in as 0)."""
    if type(op) is not list or not op:
        raise MalformedMessage("a verb must be a non-empty list")
    code, args = op[0], op[1:]
    try:
        req: Request
        if code == OP_READ:
            addr, length = args
            req = Read(0, addr, length)
        elif code == OP_WRITE:
            addr, data = args
            if type(data) is not bytes:
                raise MalformedMessage("WRITE data must be bytes")
            req = Write(0, addr, data)
        elif code == OP_CAS:
            req = Cas(0, *args)
        elif code == OP_FAA:
            req = Faa(0, *args)
        elif code == OP_ALLOC:
            req = AllocBlock(0, *args)
        elif code == OP_FREE:
            req = FreeBlock(0, *args)
        else:
            raise MalformedMessage(f"unknown opcode {code!r}")
    except (TypeError, ValueError):          # too few / too many operands
        raise MalformedMessage(f"wrong operands for opcode {code!r}") from None
    for v in req[1:]:
        if type(v) is int and not 0 <= v <= MASK64:
            raise MalformedMessage("operands must be unsigned 64-bit")
        if type(v) not in (int, bytes):
            raise MalformedMessage("operands must be int or bytes")
    return req


def encode_reply(seq: int, results: list, error=None) -> bytes:
    return _pack((seq, results, error))


def decode_reply(data: bytes):
    """-> (seq, results, error); raises MalformedMessage. A reply whose verbs all completed
    is read in one C call (``_atomic.unpack``), any other by msgpack."""
    done = _unpack_reply(data)
    if done is not None:
        return done
    try:
        seq, results, error = msgpack.unpackb(data, use_list=True, raw=False)
    except Exception as e:
        raise MalformedMessage(f"undecodable reply: {e}") from None
    return seq, results, error


def error_of(error, node: int) -> TransportError:
    """The exception a client raises for a reply's error triple."""
    _, code, text = error
    if not str(text).startswith(f"MN {node}:"):
        text = f"MN {node}: {text}"
    return _ERRORS.get(code, RemoteAccessError)(text, node)
