"""Reading compiled, SPMD-partitioned HLO text (`jax.jit(f).lower(...).compile().as_text()`):
per-device collective bytes and matmul FLOPs of one call of the program, with every `while`
loop body counted once per iteration.

    counts = call_counts(parse(hlo_text))          # computation -> runs per call of the entry
    collective_bytes(hlo_text, n_devices)          # CollectiveBytes: result/wire bytes by kind
    matmul_flops(hlo_text)                         # MatmulFlops: dots, convolutions, cuBLAS gemms

Why: XLA's `compiled.cost_analysis()` counts a loop body once, so a model whose layers are a
`jax.lax.scan` reports the FLOPs of one layer. Shapes in partitioned HLO are per device.

Loop trip counts: XLA's `known_trip_count` annotation on the while op (the CPU and GPU
compilers write it), else read from a loop condition `counter < constant(N)` (the TPU
compiler's HLO: jax's scans and fori_loops count from 0 by 1); a loop with neither counts once
and is flagged in `unknown_trip_counts`. `conditional` branches count as if every branch ran.
Both the CPU and the TPU dialects are read: layouts such as `{1,0:T(8,128)}`, operands written
`%name` or `f32[8]{0} %name`, `/*index=5*/` comments, iota and `mesh[...]` replica groups.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
            "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

# Bytes one device sends with the textbook ring / bandwidth-optimal algorithm, per result byte,
# for a group of n devices (reduce-scatter's result is 1/n of its input).
WIRE = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
        "reduce-scatter": lambda n: n - 1, "all-to-all": lambda n: (n - 1) / n,
        "collective-permute": lambda n: 1.0}

# custom-call targets that move, annotate or allocate data and compute no matmul FLOPs; any
# other custom call (a Pallas/Mosaic kernel `tpu_custom_call`, Triton `__gpu$xla.gpu.triton`,
# cuDNN attention, a host callback, ...) is listed in MatmulFlops.opaque_custom_calls
NO_FLOP_CUSTOM_CALLS = frozenset({
    "AllocateBuffer", "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked",
    "PrepareAsyncCallStart", "PrepareAsyncCallDone", "Sharding", "SPMDFullToShardShape",
    "SPMDShardToFullShape", "LayoutConstraint", "MoveToHost", "MoveToDevice",
    "annotate_device_placement", "TopK"})  # TopK: a partial sort

_SHAPE = re.compile(r"\b(" + "|".join(ITEMSIZE) + r")\[([0-9,]*)\]")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLED = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_COMMENT = re.compile(r"/\*.*?\*/")


@dataclass(frozen=True)
class Instruction:
    """One HLO instruction: `name = type op(operands), attributes`."""

    name: str
    type: str  # the result type text, e.g. `f32[8,64]{1,0}` or a tuple `(s32[], f32[4])`
    op: str
    operands: tuple[str, ...]  # each operand's text: `%x`, or `f32[8]{0} %x` in some versions
    attrs: str  # everything after the operand list
    is_root: bool = False

    def operand_name(self, i: int) -> str:
        return self.operands[i].split()[-1].lstrip("%")


@dataclass
class Module:
    """The computations of an HLO module (name -> instructions, in order) and its entry."""

    computations: dict[str, list[Instruction]]
    entry: str
    _by_name: dict[str, dict[str, Instruction]] = field(default_factory=dict, repr=False)

    def find(self, computation: str, name: str) -> Instruction | None:
        """The instruction `name` of `computation`; None if there is none."""
        if computation not in self._by_name:
            self._by_name[computation] = {ins.name: ins for ins in self.computations.get(computation, ())}
        return self._by_name[computation].get(name)

    def instruction(self, computation: str, name: str) -> Instruction:
        ins = self.find(computation, name)
        if ins is None:
            raise ValueError(f"HLO computation {computation!r} defines no instruction {name!r}")
        return ins

    def operand_type(self, computation: str, ins: Instruction, i: int) -> str:
        """The type of `ins`'s i-th operand: written next to it, or that of its definition."""
        if i >= len(ins.operands):
            raise ValueError(f"HLO instruction {ins.name!r} ({ins.op}) has no operand {i}")
        text = ins.operands[i]
        if _SHAPE.search(text):
            return text
        return self.instruction(computation, ins.operand_name(i)).type


def _split_top(text: str) -> tuple[list[str], str]:
    """Splits `a, b(c, d), e), rest` at the commas outside brackets up to the closing `)` of the
    enclosing call: returns (["a", "b(c, d)", "e"], ", rest")."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                last = text[start:i].strip()
                return (items + [last] if last or items else items), text[i + 1:]
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    raise ValueError(f"unbalanced parentheses in HLO instruction text: {text[:200]}")


def parse_instruction(line: str) -> Instruction | None:
    """An Instruction from one line of HLO text; None for a line that defines none."""
    m = _INSTR.match(line)
    if not m:
        return None
    operands, attrs = _split_top(_COMMENT.sub("", m.group(4)))
    return Instruction(m.group(1), m.group(2), m.group(3), tuple(operands), attrs,
                       is_root=line.lstrip().startswith("ROOT "))


def parse(hlo_text: str) -> Module:
    """The computations of HLO text (`compiled.as_text()`); ValueError without an ENTRY."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is not None and line.strip() and line.strip() != "}":
            ins = parse_instruction(line)
            if ins is not None:
                comps[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(comps, entry)


def _scalar_constant(module: Module, comp: str, name: str) -> int | None:
    ins = module.find(comp, name)
    if ins is not None and ins.op == "constant" and re.match(r"[su]\d+\[\]", ins.type):
        return int(ins.operands[0])
    return None


def _tuple_index(module: Module, comp: str, name: str) -> int | None:
    """k when `name` is `get-tuple-element(param), index=k` in `comp`, or `param#k` (the
    `--xla_dump_to` files' dialect writes tuple elements inline, with no get-tuple-element)."""
    base, _, k = name.rpartition("#")
    if base and k.isdigit():
        return int(k)
    ins = module.find(comp, name)
    m = re.search(r"\bindex=(\d+)", ins.attrs) if ins is not None and ins.op == "get-tuple-element" else None
    return int(m.group(1)) if m else None


def _trip_count(module: Module, caller: str, loop: Instruction, cond: str | None, body: str | None) -> int | None:
    """Iterations of a while loop whose condition's root is `compare(counter, constant(N)),
    direction=LT`: ceil((N - start) / step), the counter being element k of the loop tuple,
    `step` read from the body's root (`add(counter, constant(step))`, 1 if not of that form)
    and `start` from the loop's initial tuple (0 if not a constant). jax's scans count 0..N-1
    by 1; the TPU compiler's windowed matmul loops (collective matmuls) step by 2. None for a
    condition of another form."""
    instructions = module.computations.get(cond, [])
    root = next((ins for ins in instructions if ins.is_root), None)
    if root is None or root.op != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
        return None
    bound = _scalar_constant(module, cond, root.operand_name(1))
    if bound is None:
        return None
    k = _tuple_index(module, cond, root.operand_name(0))
    step, start = 1, 0
    body_root = next((ins for ins in module.computations.get(body, ()) if ins.is_root), None)
    if k is not None and body_root is not None and body_root.op == "tuple" and k < len(body_root.operands):
        upd = module.find(body, body_root.operand_name(k))
        if upd is not None and upd.op == "add" and len(upd.operands) == 2:
            for a, b in ((0, 1), (1, 0)):
                c = _scalar_constant(module, body, upd.operand_name(b))
                if c is not None and _tuple_index(module, body, upd.operand_name(a)) == k and c > 0:
                    step = c
    if k is not None and loop.operands:
        init = module.find(caller, loop.operand_name(0))
        if init is not None and init.op == "tuple" and k < len(init.operands):
            start = _scalar_constant(module, caller, init.operand_name(k)) or 0
    return max(0, -(-(bound - start) // step))


def call_counts(module: Module) -> tuple[dict[str, float], int]:
    """How many times each computation runs per call of the entry, for every computation the
    entry reaches: a while body x its trip count, its condition x (trip count + 1); fused,
    called and async-wrapped computations and conditional branches x 1 per run of their caller
    (a reduction's `to_apply` counts once per run of the reduce: it holds scalar arithmetic
    only). Also returns the number of reached while loops of unknown trip count (each counted
    as 1 iteration)."""
    comps = module.computations
    edges: dict[str, list[tuple[str, float]]] = {}
    unknown_loops: dict[str, int] = {}
    for name, instructions in comps.items():
        out = edges[name] = []
        for ins in instructions:
            if ins.op in ("async-update", "async-done"):
                continue  # they print their async-start's `calls=` again: it runs once
            called = _CALLED.findall(ins.attrs)
            b = _BRANCHES.search(ins.attrs)
            if b:
                called += [c.strip().lstrip("%") for c in b.group(1).split(",") if c.strip()]
            trips, cond = 1, None
            if ins.op == "while":
                t = _TRIP.search(ins.attrs)
                cond = re.search(r"\bcondition=%?([\w.\-]+)", ins.attrs)
                cond = cond.group(1) if cond else None
                body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs)
                trips = int(t.group(1)) if t else _trip_count(module, name, ins, cond, body and body.group(1))
                if trips is None:
                    unknown_loops[name] = unknown_loops.get(name, 0) + 1
                    trips = 1
            out += [(c, trips + 1 if c == cond else trips) for c in called if c in comps]

    # callers before callees (HLO calls form a DAG), then push the counts down
    postorder, seen, stack = [], {module.entry}, [(module.entry, iter(edges[module.entry]))]
    while stack:
        name, callees = stack[-1]
        callee = next((c for c, _ in callees if c not in seen), None)
        if callee is None:
            postorder.append(name)
            stack.pop()
        else:
            seen.add(callee)
            stack.append((callee, iter(edges[callee])))
    counts = dict.fromkeys(postorder, 0.0)
    counts[module.entry] = 1.0
    for name in reversed(postorder):
        for callee, times in edges[name]:
            counts[callee] += counts[name] * times
    return counts, sum(unknown_loops.get(name, 0) for name in postorder)


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string (`f32[8,64]`, a tuple of them, ...)."""
    return sum(ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(text))


def shape_dims(text: str) -> tuple[int, ...]:
    """The dimensions of the first array shape in an HLO type string (`f32[8,64]{1,0}` -> (8, 64))."""
    m = _SHAPE.search(text)
    if not m:
        raise ValueError(f"no array shape in HLO type {text[:120]!r}")
    return tuple(int(d) for d in m.group(2).split(",") if d)


def group_size(attrs: str, n_devices: int) -> int:
    """Devices per replica group of a collective, from its HLO attributes: an explicit list
    `{{0,1},{2,3}}`, the iota form `[groups,size]<=[...]`, or the mesh form
    `mesh['a'=4,'b'=2], device_ids=(...) {'a'}` (the product of the named axes; device_ids
    optional)."""
    m = re.search(r"source_target_pairs=", attrs)
    if m:
        return 2
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:
        sizes = {k.strip("'\" "): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        return math.prod(sizes[a.strip("'\" ")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    if re.search(r"replica_groups=\{\}", attrs) or "replica_groups" not in attrs:
        return n_devices  # empty groups: all devices
    raise ValueError(f"cannot read the replica groups of a collective from: {attrs[:200]}")


@dataclass
class CollectiveBytes:
    """Per-device collective bytes of one compiled program, by kind."""

    result: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    wire: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    unknown_trip_counts: int = 0

    @property
    def total_result(self) -> float:
        return sum(self.result.values())

    @property
    def total_wire(self) -> float:
        return sum(self.wire.values())


def collective_bytes(hlo_text: str, n_devices: int) -> CollectiveBytes:
    """Each collective's per-device result bytes and wire bytes (WIRE), times the number of
    times its computation runs (call_counts), summed by kind. Async `-start`/`-done` pairs
    count once, at `-done`; a collective over groups of 1 device counts nothing."""
    module = parse(hlo_text)
    counts, unknown = call_counts(module)
    out = CollectiveBytes(unknown_trip_counts=unknown)
    for name, times in counts.items():
        for ins in module.computations[name]:
            if ins.op.endswith("-start"):
                continue  # counted at its -done
            kind = ins.op.removesuffix("-done")
            if kind not in KINDS:
                continue
            # the -done has no attributes: take them from its -start
            attrs = module.instruction(name, ins.operand_name(0)).attrs if ins.op.endswith("-done") else ins.attrs
            n = group_size(attrs, n_devices)
            if n <= 1:
                continue
            nbytes = shape_bytes(ins.type) * times
            out.count[kind] += int(times)
            out.result[kind] += nbytes
            out.wire[kind] += nbytes * WIRE[kind](n)
    return out


@dataclass
class MatmulFlops:
    """Per-device FLOPs of the matrix products of one compiled program (2 per multiply-add)."""

    flops: float = 0.0
    count: int = 0  # dots, convolutions and cuBLAS gemms executed, loop trips included
    unknown_trip_counts: int = 0
    # custom-call target -> executions, for custom calls whose FLOPs the HLO does not state
    # (Pallas/Mosaic kernels, Triton calls, cuDNN attention, ...): not in `flops`
    opaque_custom_calls: dict[str, int] = field(default_factory=dict)


def _dims_attr(attrs: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([0-9,]*)\}}", attrs)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(result_type: str, lhs_type: str, lhs_contracting: list[int]) -> float:
    """2 x (elements of the result) x (product of the lhs's contracting dimensions)."""
    lhs = shape_dims(lhs_type)
    if any(d >= len(lhs) for d in lhs_contracting):
        raise ValueError(f"contracting dims {lhs_contracting} out of range for {lhs_type}")
    return 2.0 * math.prod(shape_dims(result_type)) * math.prod(lhs[d] for d in lhs_contracting)


def _valid_positions(inp: int, kernel: int, out: int, stride: int, pad_low: int,
                     lhs_dilate: int, rhs_dilate: int) -> int:
    """(output, kernel) position pairs of one spatial dimension that read a real input element,
    not padding or a dilation hole (as XLA's HloCostAnalysis counts)."""
    start = np.arange(kernel, dtype=np.int64) * rhs_dilate - pad_low  # input index at output 0
    if lhs_dilate == 1:  # per kernel position, the outputs o with 0 <= start + o*stride < inp
        first = np.maximum(0, -(start // stride))  # ceil(-start / stride)
        last = np.minimum(out - 1, (inp - 1 - start) // stride)
        return int(np.maximum(last - first + 1, 0).sum())
    o = np.arange(out, dtype=np.int64) * stride
    return sum(int(((u >= 0) & (u % lhs_dilate == 0) & (u // lhs_dilate < inp)).sum())
               for u in (s + o for s in start))


def convolution_flops(ins: Instruction, lhs_type: str, rhs_type: str) -> float:
    """2 x batch x output features x input features per group x the valid (output, kernel)
    positions of every spatial dimension, read from `dim_labels` and `window` (the TPU
    compiler writes dot products as convolutions)."""
    m = re.search(r"\bdim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", ins.attrs)
    if not m:
        raise ValueError(f"convolution {ins.name!r} has no dim_labels: {ins.attrs[:200]}")
    lhs_l, rhs_l, out_l = m.groups()
    lhs, rhs, out = shape_dims(lhs_type), shape_dims(rhs_type), shape_dims(ins.type)
    if not (len(lhs_l) == len(lhs) and len(rhs_l) == len(rhs) and len(out_l) == len(out)):
        raise ValueError(f"convolution {ins.name!r}: dim_labels {m.group(0)} do not fit the shapes "
                         f"{lhs}, {rhs} -> {out}")
    fgc = re.search(r"\bfeature_group_count=(\d+)", ins.attrs)
    bgc = re.search(r"\bbatch_group_count=(\d+)", ins.attrs)
    fma = ((lhs[lhs_l.index("f")] // (int(fgc.group(1)) if fgc else 1)) * out[out_l.index("f")]
           * (lhs[lhs_l.index("b")] // (int(bgc.group(1)) if bgc else 1)))
    n_spatial = sum(c.isdigit() for c in lhs_l)
    window = re.search(r"\bwindow=\{([^}]*)\}", ins.attrs)
    fields = dict(kv.split("=", 1) for kv in window.group(1).split()) if window else {}

    def per_dim(key: str, default: int) -> list[int]:
        if key not in fields:
            return [default] * n_spatial
        return [int(v) for v in fields[key].split("x")]

    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields \
        else [(0, 0)] * n_spatial
    stride, lhs_d, rhs_d = per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    for d in range(n_spatial):
        s = str(d)
        fma *= _valid_positions(lhs[lhs_l.index(s)], rhs[rhs_l.index(s)], out[out_l.index(s)],
                                stride[d], pads[d][0], lhs_d[d], rhs_d[d])
    return 2.0 * fma


def _cublas_contracting(ins: Instruction) -> list[int]:
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
    if not m:
        raise ValueError(f"cuBLAS custom call {ins.name!r} has no lhs_contracting_dimensions")
    return [int(d) for d in json.loads("[" + m.group(1) + "]")]


def matmul_flops(hlo_text: str) -> MatmulFlops:
    """FLOPs per device of every `dot`, `convolution` and cuBLAS gemm custom call, fused ones
    included, each times the number of times its computation runs per call of the entry
    (call_counts). Elementwise arithmetic, reductions and the FLOPs of opaque custom calls
    (listed in `opaque_custom_calls`) are not counted."""
    module = parse(hlo_text)
    counts, unknown = call_counts(module)
    out = MatmulFlops(unknown_trip_counts=unknown)
    for name, times in counts.items():
        for ins in module.computations[name]:
            if ins.op == "dot":
                f = dot_flops(ins.type, module.operand_type(name, ins, 0), _dims_attr(ins.attrs, "lhs_contracting_dims"))
            elif ins.op == "convolution":
                f = convolution_flops(ins, module.operand_type(name, ins, 0), module.operand_type(name, ins, 1))
            elif ins.op == "custom-call":
                target = re.search(r'\bcustom_call_target="([^"]*)"', ins.attrs)
                target = target.group(1) if target else "?"
                if target.startswith("__cublas$"):  # XLA:GPU's gemm rewrite of a dot
                    f = dot_flops(ins.type, module.operand_type(name, ins, 0), _cublas_contracting(ins))
                else:
                    if target not in NO_FLOP_CUSTOM_CALLS:
                        out.opaque_custom_calls[target] = out.opaque_custom_calls.get(target, 0) + int(times)
                    continue
            else:
                continue
            out.flops += f * times
            out.count += int(times)
    return out
