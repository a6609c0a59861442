"""64-bit indexing in the C++ kernels: offsets into tensor data past 2^31 elements.

An offset computed in 32-bit arithmetic (``int i = row * stride``) wraps past 2^31 elements and reads or writes
the wrong memory. The quantized matmuls are the kernels whose operands are bytes, so a weight with more than 2^31
elements costs only 2 GiB: they run for real here (one 2 GiB buffer shared by both tests), with the last
rows (past 2^31 bytes) compared bitwise against the same rows run on their own. The other kernels take
float operands (8 GiB and more past 2^31 elements); for them a source check asserts that no 32-bit integer is
declared in csrc/cpu other than the allowed non-index uses listed below, so offsets are computed in int64_t.
"""
import mmap
from pathlib import Path
import re

import pytest
import torch

import accel.ops
from accel.ops.quantize import QuantizedWeight

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cpu"
ROW_BYTES = 32768
ROWS = 2 ** 31 // ROW_BYTES + 1  # the last row starts at byte 2^31
TAIL = 3  # rows ROWS - 3 .. ROWS - 1: two before 2^31 and one past it


@pytest.fixture(scope="module")
def weight_bytes():
    """(ROWS, ROW_BYTES) uint8, 2 GiB + 32 KiB, zero. An anonymous mapping is zero without being written: writing
    2 GiB costs seconds of page faults here, reading untouched pages a fifth of that. Both tests share it."""
    buffer = mmap.mmap(-1, ROWS * ROW_BYTES)
    yield torch.frombuffer(buffer, dtype=torch.uint8).view(ROWS, ROW_BYTES)
    buffer.close()


def _rows_alone(qw: QuantizedWeight, rows: slice) -> QuantizedWeight:
    """The same weight restricted to ``rows``, copied: small, at offset 0."""
    return QuantizedWeight(qw.codes[rows].clone(), qw.step[rows].clone(), qw.offset[rows].clone(), qw.bits,
                           qw.group_size, qw.scheme, qw.in_features)


def test_int8_linear_reads_weight_rows_past_2_to_the_31_bytes(weight_bytes):
    K = ROW_BYTES
    gen = torch.Generator().manual_seed(0)
    codes = weight_bytes.view(torch.int8)
    for rows in (slice(0, 1), slice(ROWS - TAIL, ROWS)):
        codes[rows] = torch.randint(-127, 128, (rows.stop - rows.start, K), generator=gen, dtype=torch.int8)
    qw = QuantizedWeight(codes, torch.rand(ROWS, 1, generator=gen) + 0.5, torch.zeros(ROWS, 1), 8, K, "symmetric",
                         K)
    x = torch.randn(2, K, generator=gen)  # two rows: the kernel's 2-row tiles
    out = accel.ops.quant_matmul(x, qw)
    assert out.shape == (2, ROWS)
    for rows in (slice(0, 1), slice(ROWS - TAIL, ROWS)):
        assert torch.equal(out[:, rows], accel.ops.quant_matmul(x, _rows_alone(qw, rows))), rows
    assert torch.equal(out[:, 1:ROWS - TAIL], torch.zeros(2, ROWS - TAIL - 1))  # zero codes between


def test_int4_linear_reads_weight_rows_past_2_to_the_31_bytes(weight_bytes):
    K, G = 2 * ROW_BYTES, 2048  # two codes a byte
    gen = torch.Generator().manual_seed(1)
    for rows in (slice(0, 1), slice(ROWS - TAIL, ROWS)):
        weight_bytes[rows] = torch.randint(0, 256, (rows.stop - rows.start, ROW_BYTES), generator=gen,
                                           dtype=torch.uint8)
    qw = QuantizedWeight(weight_bytes, torch.rand(ROWS, K // G, generator=gen) + 0.5,
                         torch.randn(ROWS, K // G, generator=gen), 4, G, "minmax", K)
    x = torch.randn(1, K, generator=gen)
    out = accel.ops.quant_matmul(x, qw)
    assert out.shape == (1, ROWS)
    for rows in (slice(0, 1), slice(1, 2), slice(ROWS - TAIL, ROWS)):
        assert torch.equal(out[:, rows], accel.ops.quant_matmul(x, _rows_alone(qw, rows))), rows


def test_int8_linear_dot_products_past_2_to_the_31():
    """127 * 127 * K passes int32 from K = 133,145: the int8 dot products are summed in int64 (in int32 they wrapped
    to a negative total)."""
    K = 140_032  # a multiple of 32
    w = torch.ones(2, K)
    w[1, ::2] = -1.0
    qw = accel.ops.quantize(w, 8)
    assert qw.codes.abs().min() == 127
    x = torch.ones(1, K)  # codes 127 too: the largest products
    out = accel.ops.quant_matmul(x, qw)
    torch.testing.assert_close(out, torch.tensor([[float(K), 0.0]]), rtol=1e-6, atol=1e-6)


# 32-bit integers csrc/cpu may declare that are not offsets: (file, name) -> why
NOT_INDICES = {
    ("binary_matmul.cpp", "word"): "32 packed sign bits",
    ("binary_matmul.cpp", "dot"): "a dot product of at most K <= 2^31 bits, the op's int32 output",
}
DECLARATION = re.compile(r"\b(?:unsigned|int|int32_t|uint32_t|int16_t|uint16_t)\s+(?:const\s+)?(\w+)\s*(?=[=;,\[)])")
# a loop counter bounded by a compile-time constant (a literal, kName or an all-caps template parameter)
SMALL_LOOP = re.compile(r"for \(int (\w+) = [^;]+; \1 < (?:\d+|k[A-Z]\w*|[A-Z][A-Z0-9_]*);")


def _declarations(source: str):
    for line_number, line in enumerate(source.splitlines(), 1):
        code = line.split("//")[0]
        small = set(SMALL_LOOP.findall(code))
        for match in DECLARATION.finditer(code):
            name = match.group(1)
            before = code[:match.start()]
            if name in small or re.search(r"(constexpr|template\s*<[^>]*)\s*$", before):
                continue
            yield line_number, name, line.strip()


def test_the_declaration_check_flags_a_32_bit_offset():
    source = "  const int offset = row * stride;\n  for (int i = 0; i < n; ++i) out[i] = 0;\n"
    assert [(n, name) for n, name, _ in _declarations(source)] == [(1, "offset"), (2, "i")]
    assert list(_declarations("  for (int l = 0; l < kLanes; ++l) acc[l] = 0;\n  constexpr int kLanes = 8;\n")) == []


def test_csrc_declares_no_32_bit_index():
    found = []
    for path in sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.h")]):
        for line_number, name, line in _declarations(path.read_text()):
            if (path.name, name) not in NOT_INDICES:
                found.append(f"{path.name}:{line_number}: {line}")
    assert not found, "32-bit integers in csrc/cpu (offsets must be int64_t):\n" + "\n".join(found)
