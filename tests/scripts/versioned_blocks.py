"""Block contents the workload scripts write and check: the block number and a version,
repeated over the 4 KiB block, so torn or misplaced data is caught as well as stale data."""
import struct

BS = 4096
ZERO = bytes(BS)


def content(b, v):
    return struct.pack("<QQ", b, v) * (BS // 16)


def version_of(b, data):
    """The version block `b` holds (0: never written); fails on foreign or torn content."""
    if data == ZERO:
        return 0
    bb, v = struct.unpack_from("<QQ", data)
    if bb != b or data != content(b, v):
        raise AssertionError("block %d holds torn or foreign content %r" % (b, data[:16]))
    return v
