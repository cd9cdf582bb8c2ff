"""A reference executor for the MIL programs of our Core ML packages, so that their numerics are checked on Linux,
where Core ML itself cannot run (coremltools' own test helpers skip the comparison there).

It reads the saved .mlpackage as an app would ship it: the spec's program and weight.bin, through coremltools'
milproto loader (libmilstoragepython works on Linux), and runs any function of it op by op in torch, the states
(read_state, slice_update, coreml_update_state) carried across calls in a dict that every function of the package
shares, as Core ML's MLState is.

Precision. precision="fp16" (the default) rounds every fp16-typed value the program produces to fp16, op by op, and
computes inside an op in float32: fp16 storage between ops, float32 accumulation inside matmul, linear, conv,
reductions and softmax. That is what Core ML's GPU path does (Metal fp16 tensors, fp32 accumulators); the Neural
Engine computes in fp16 throughout and may round more. precision="fp32" keeps float32 everywhere, as Core ML's CPU
path runs an fp16 program (it computes in float32 on the CPU). Either way, a value beyond fp16's range becomes inf
under "fp16", as it would on the device.

Compressed weights (constexpr_blockwise_shift_scale: int8/int4 per channel and per block; constexpr_lut_to_dense:
palettization; constexpr_affine_dequantize) are materialised once at load by coremltools' own op definitions, which
implement exactly Core ML's dequantization. Memory: only the constants a running op reads are held (not a compressed
weight's parts), each once per package (save_multifunction stores the functions' shared weights once, the loader
gives each function its own copy), fp16 ones as fp16 (exact), widened to float32 by the op that reads them; the
loaded program is dropped once every function is built. E2B's int4 decoder package (2.4 billion weights, two
functions) loads in 5.9 GB and is then held in 5.5 GB; it ran out of memory before (int4 data held as int64 and every
weight in float32, per function). Every other op is written out below (OPS); an op not there is a
MilOpError naming the op and the function, never a silent skip.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contract.bundle import COREML_WEIGHTS_DIR
from models.errors import InputError
from runtime_py.executors.base import native_output_to_log, release_freed_memory

PRECISIONS = ("fp16", "fp32")


class MilOpError(InputError):
    """A MIL op this executor does not implement (it names the op, the function and the package)."""


def load_program(package: str | Path):
    """The package's MIL program (every function), weights read from its weight.bin."""
    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise InputError(f"{package}: not an .mlpackage (no Manifest.json)")
    # coremltools' import warns of its missing native runtime and of untested torch versions: to the runtime log
    with native_output_to_log():
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load

        spec = ct.utils.load_spec(str(package))
        return load(spec, spec.specificationVersion, str(package / COREML_WEIGHTS_DIR))


def dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


TORCH_DTYPES = {"fp16": torch.float32, "fp32": torch.float32, "fp64": torch.float32, "bool": torch.bool}


def torch_dtype(name: str) -> torch.dtype:
    """Floats are held as float32 (fp16 values rounded, see `round_to`); every integer type as int64."""
    return TORCH_DTYPES.get(name, torch.int64)


def as_tensor(value, name: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value)).to(torch_dtype(name))


def constant_tensor(value, name: str) -> torch.Tensor:
    """A constant as held: fp16 values as float16 (exact, half of float32), other types as as_tensor."""
    return torch.as_tensor(np.asarray(value)).to(torch.float16) if name == "fp16" else as_tensor(value, name)


def widened(value):
    """What an op reads: an fp16-held constant as float32, as every other fp16 value is held."""
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.float16 else value


def constant_key(op) -> tuple:
    """What determines a constexpr op's value: its type, output type and every input's value (arrays by a hash of
    their bytes), so equal constants of different functions are materialised once."""
    values = {"val": op.outputs[0].val} if op.op_type == "const" else {k: var.val for k, var in op.inputs.items()}
    parts = [op.op_type, dtype_name(op.outputs[0])]
    for name, value in sorted(values.items()):
        if isinstance(value, np.ndarray):
            data = np.ascontiguousarray(value)
            digest = hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).digest()
            parts.append((name, data.dtype.str, data.shape, digest))
        else:
            parts.append((name, type(value).__name__, repr(value)))
    return tuple(parts)


# --- the ops ------------------------------------------------------------------------------------------------------
# Each takes (a: dict of the op's inputs by parameter name, torch tensors or tuples of them, None where omitted)
# and returns its output tensor, or a tuple of them.


def ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def flag(t, default: bool = False) -> bool:
    return default if t is None else bool(t.item())


def axes_of(t, rank: int) -> list[int] | None:
    return None if t is None else [a % rank for a in ints(t)]


def binary(fn):
    return lambda a: fn(a["x"], a["y"])


def unary(fn):
    return lambda a: fn(a["x"])


def solve_slices(x: torch.Tensor, a: dict) -> tuple[list[slice], list[int]]:
    """slice_by_index's and slice_update's python slices per axis, and the axes squeeze_mask drops."""
    rank = x.dim()
    begin, end = ints(a["begin"]), ints(a["end"])
    stride = ints(a["stride"]) if a.get("stride") is not None else [1] * rank
    masks = {k: [bool(v) for v in a[k].reshape(-1).tolist()] if a.get(k) is not None else [False] * rank
             for k in ("begin_mask", "end_mask", "squeeze_mask")}
    slices, squeezed = [], []
    for i in range(rank):
        b = None if masks["begin_mask"][i] else begin[i]
        e = None if masks["end_mask"][i] else end[i]
        if masks["squeeze_mask"][i]:
            start = begin[i] % x.shape[i]
            slices.append(slice(start, start + 1, 1))
            squeezed.append(i)
        else:
            slices.append(slice(b, e, stride[i]))
    return slices, squeezed


def index_with(x: torch.Tensor, slices: list[slice]) -> tuple:
    """Indices for x (torch takes no negative steps: those become index tensors, applied axis by axis)."""
    out = x
    for axis, s in enumerate(slices):
        start, stop, step = s.indices(x.shape[axis])
        index = torch.arange(start, stop, step)
        out = out.index_select(axis, index)
    return out


def slice_by_index(a):
    x = a["x"]
    slices, squeezed = solve_slices(x, a)
    out = index_with(x, slices)
    return out.squeeze(squeezed) if squeezed else out


def slice_update(a):
    x, update = a["x"], a["update"]
    slices, squeezed = solve_slices(x, a)
    index = [torch.arange(*s.indices(x.shape[axis])) for axis, s in enumerate(slices)]
    for axis in squeezed:
        update = update.unsqueeze(axis)
    out = x.clone()
    out[torch.meshgrid(*index, indexing="ij")] = update.to(x.dtype).expand(*(len(i) for i in index))
    return out


def slice_by_size(a):
    x, begin, size = a["x"], ints(a["begin"]), ints(a["size"])
    for axis, (b, n) in enumerate(zip(begin, size)):
        x = x.narrow(axis, b, x.shape[axis] - b if n == -1 else n)
    return x


def reshape(a):
    x, shape = a["x"], ints(a["shape"])
    # iOS 17: a 0 takes the input's dimension counted from the right (1 where the input has none)
    shape = [(x.shape[x.dim() - len(shape) + i] if x.dim() - len(shape) + i >= 0 else 1) if d == 0 else d
             for i, d in enumerate(shape)]
    return x.reshape(shape)


def expand_dims(a):
    x = a["x"]
    rank = x.dim() + a["axes"].numel()
    for axis in sorted(v % rank for v in ints(a["axes"])):
        x = x.unsqueeze(axis)
    return x


def squeeze(a):
    x = a["x"]
    axes = axes_of(a.get("axes"), x.dim())
    return x.squeeze() if axes is None else x.squeeze(axes)


def concat(a):
    values = [v.reshape(1) if v.dim() == 0 else v for v in a["values"]]  # scalars concatenate as 1-element vectors
    axis = int(a["axis"]) % values[0].dim()
    if flag(a.get("interleave")):
        return torch.stack(values, dim=axis + 1).flatten(axis, axis + 1)
    return torch.cat(values, dim=axis)


def split(a):
    x, axis = a["x"], int(a["axis"])
    if a.get("split_sizes") is not None:
        return tuple(torch.split(x, ints(a["split_sizes"]), dim=axis))
    return tuple(torch.chunk(x, int(a["num_splits"]), dim=axis))


def reduce(fn):
    def op(a):
        x = a["x"]
        axes = axes_of(a.get("axes"), x.dim()) or list(range(x.dim()))
        return fn(x, dim=axes, keepdim=flag(a.get("keep_dims")))
    return op


def prod(x, dim, keepdim):
    """torch.prod over several axes (it takes one)."""
    for axis in sorted(dim, reverse=True):
        x = x.prod(axis, keepdim=keepdim)
    return x


def gather(a):
    x, indices, axis = a["x"], a["indices"].long(), int(a.get("axis", torch.tensor(0))) % a["x"].dim()
    if a.get("batch_dims") is not None and int(a["batch_dims"]) != 0:
        raise MilOpError("gather with batch_dims != 0")
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = x.index_select(axis, indices.reshape(-1))
    return out.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1:])


def gather_along_axis(a):
    x, indices, axis = a["x"], a["indices"].long(), int(a["axis"]) % a["x"].dim()
    return torch.gather(x, axis, torch.where(indices < 0, indices + x.shape[axis], indices))


def gather_nd(a):
    x, indices = a["x"], a["indices"].long()
    if a.get("batch_dims") is not None and int(a["batch_dims"]) != 0:
        raise MilOpError("gather_nd with batch_dims != 0")
    return x[tuple(indices[..., i] for i in range(indices.shape[-1]))]


def matmul(a):
    x, y = a["x"], a["y"]
    if flag(a.get("transpose_x")):
        x = x.transpose(-1, -2)
    if flag(a.get("transpose_y")):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def linear(a):
    return F.linear(a["x"], a["weight"], a.get("bias"))


def conv_padding(a, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: list[int],
                 dilations: list[int]) -> list[int]:
    """[begin, end] per spatial axis for pad_type valid, custom, same and same_lower (MIL's conv and pools)."""
    pad_type = a["pad_type"] if isinstance(a.get("pad_type"), str) else "valid"
    if pad_type == "valid":
        return [0] * 2 * len(spatial)
    if pad_type == "custom":
        return ints(a["pad"])
    pads = []
    for n, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        pads += [small, total - small] if pad_type == "same" else [total - small, small]
    return pads


def torch_pad(pads: list[int]) -> list[int]:
    """MIL's [begin0, end0, begin1, end1, ...] (first axis first) as F.pad's (last axis first)."""
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]
    return [p for pair in reversed(pairs) for p in pair]


def conv(a):
    x, w = a["x"], a["weight"]
    spatial_rank = x.dim() - 2
    strides = ints(a["strides"]) if a.get("strides") is not None else [1] * spatial_rank
    dilations = ints(a["dilations"]) if a.get("dilations") is not None else [1] * spatial_rank
    pads = conv_padding(a, tuple(x.shape[2:]), tuple(w.shape[2:]), strides, dilations)
    x = F.pad(x, torch_pad(pads))
    groups = int(a["groups"]) if a.get("groups") is not None else 1
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial_rank]
    return fn(x, w, a.get("bias"), stride=strides, dilation=dilations, groups=groups)


def pad(a):
    x, pads, mode = a["x"], ints(a["pad"]), a.get("mode") or "constant"
    pads = [0] * (2 * x.dim() - len(pads)) + pads  # the pads cover the last len(pad) / 2 axes
    pads = torch_pad(pads)
    while len(pads) > 2 and pads[-2:] == [0, 0]:  # F.pad's reflect and replicate take only the axes they pad
        pads = pads[:-2]
    if mode == "constant":
        value = float(a["constant_val"]) if a.get("constant_val") is not None else 0.0
        return F.pad(x, pads, value=value)
    return F.pad(x, pads, mode={"reflect": "reflect", "replicate": "replicate"}[mode])


def avg_pool(a):
    x = a["x"]
    kernel, strides = ints(a["kernel_sizes"]), ints(a["strides"])
    pads = conv_padding(a, tuple(x.shape[2:]), tuple(kernel), strides, [1] * len(kernel))
    if any(pads[0::2][i] != pads[1::2][i] for i in range(len(kernel))):
        raise MilOpError("avg_pool with asymmetric padding")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    return fn(x, kernel, strides, padding=pads[0::2], ceil_mode=flag(a.get("ceil_mode")),
              count_include_pad=not flag(a.get("exclude_padding_from_average")))


def max_pool(a):
    x = a["x"]
    kernel, strides = ints(a["kernel_sizes"]), ints(a["strides"])
    pads = conv_padding(a, tuple(x.shape[2:]), tuple(kernel), strides, [1] * len(kernel))
    x = F.pad(x, torch_pad(pads), value=-math.inf)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    return fn(x, kernel, strides, ceil_mode=flag(a.get("ceil_mode")))


def upsample_nearest_neighbor(a):
    scale = tuple(float(a[k]) if a.get(k) is not None else 1.0 for k in ("scale_factor_height", "scale_factor_width"))
    return F.interpolate(a["x"], scale_factor=scale, mode="nearest")


def gelu(a):
    mode = a.get("mode") or "EXACT"
    x = a["x"]
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if mode == "TANH_APPROXIMATION" else "none")


def cumsum(a):
    x, axis = a["x"], int(a["axis"]) if a.get("axis") is not None else 0
    if flag(a.get("reverse")):
        x = x.flip(axis)
    out = x.cumsum(axis)
    if flag(a.get("exclusive")):
        out = out - x
    return out.flip(axis) if flag(a.get("reverse")) else out


def cast(a):
    return a["x"].to(torch_dtype(a["dtype"]))


def layer_norm(a):
    x = a["x"]
    axes = axes_of(a.get("axes"), x.dim()) or list(range(x.dim()))
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    out = (x - mean) / torch.sqrt(var + float(a.get("epsilon", torch.tensor(1e-5))))
    if a.get("gamma") is not None:
        out = out * a["gamma"]
    return out + a["beta"] if a.get("beta") is not None else out


def batch_norm(a):
    shape = (1, -1) + (1,) * (a["x"].dim() - 2)
    eps = float(a["epsilon"]) if a.get("epsilon") is not None else 1e-5
    out = (a["x"] - a["mean"].reshape(shape)) / torch.sqrt(a["variance"].reshape(shape) + eps)
    if a.get("gamma") is not None:
        out = out * a["gamma"].reshape(shape)
    return out + a["beta"].reshape(shape) if a.get("beta") is not None else out


def eps(a, default: float) -> float:
    return float(a["epsilon"]) if a.get("epsilon") is not None else default


def floor_div(a):
    x, y = a["x"], a["y"]
    return torch.div(x, y, rounding_mode="floor")


OPS = {
    "add": binary(torch.add), "sub": binary(torch.sub), "mul": binary(torch.mul), "real_div": binary(torch.div),
    "floor_div": floor_div, "mod": binary(torch.remainder), "pow": binary(torch.pow),
    "maximum": binary(torch.maximum), "minimum": binary(torch.minimum),
    "equal": binary(torch.eq), "not_equal": binary(torch.ne), "greater": binary(torch.gt),
    "greater_equal": binary(torch.ge), "less": binary(torch.lt), "less_equal": binary(torch.le),
    "logical_and": binary(torch.logical_and), "logical_or": binary(torch.logical_or),
    "logical_xor": binary(torch.logical_xor), "logical_not": unary(torch.logical_not),
    "abs": unary(torch.abs), "ceil": unary(torch.ceil), "floor": unary(torch.floor), "round": unary(torch.round),
    "sign": unary(torch.sign), "exp": unary(torch.exp), "erf": unary(torch.erf), "cos": unary(torch.cos),
    "sin": unary(torch.sin), "tanh": unary(torch.tanh), "sqrt": unary(torch.sqrt), "square": unary(torch.square),
    "relu": unary(torch.relu), "sigmoid": unary(torch.sigmoid), "silu": unary(F.silu),
    "log": lambda a: torch.log(a["x"] + eps(a, 0.0)),
    "rsqrt": lambda a: torch.rsqrt(a["x"] + eps(a, 1e-12)),
    "inverse": lambda a: 1.0 / (a["x"] + eps(a, 1e-4)),
    "clip": lambda a: torch.clamp(a["x"], float(a["alpha"]), float(a["beta"])),
    "gelu": gelu,
    "softmax": lambda a: torch.softmax(a["x"], dim=int(a["axis"]) if a.get("axis") is not None else -1),
    "reduce_mean": reduce(torch.mean), "reduce_sum": reduce(torch.sum), "reduce_max": reduce(torch.amax),
    "reduce_min": reduce(torch.amin), "reduce_prod": reduce(prod),
    "select": lambda a: torch.where(a["cond"].bool(), a["a"], a["b"]),
    "shape": lambda a: torch.tensor(a["x"].shape, dtype=torch.int64),
    "cast": cast,
    "reshape": reshape, "expand_dims": expand_dims, "squeeze": squeeze,
    "transpose": lambda a: a["x"].permute(ints(a["perm"])),
    "tile": lambda a: a["x"].repeat(ints(a["reps"])),
    "concat": concat, "split": split,
    "stack": lambda a: torch.stack(a["values"], dim=int(a["axis"])),
    "slice_by_index": slice_by_index, "slice_by_size": slice_by_size, "slice_update": slice_update,
    "gather": gather, "gather_along_axis": gather_along_axis, "gather_nd": gather_nd,
    "matmul": matmul, "linear": linear, "conv": conv, "pad": pad, "avg_pool": avg_pool, "max_pool": max_pool,
    "upsample_nearest_neighbor": upsample_nearest_neighbor, "cumsum": cumsum,
    "layer_norm": layer_norm, "batch_norm": batch_norm,
    "range_1d": lambda a: torch.arange(a["start"].item(), a["end"].item(), a["step"].item()),
    "fill": lambda a: torch.full(ints(a["shape"]), a["value"].item()),
    "identity": lambda a: a["x"],
    "reverse": lambda a: a["x"].flip(axes_of(a.get("axes"), a["x"].dim()) or list(range(a["x"].dim()))),
}
# Ops whose result is fixed at load: coremltools' own definitions compute them (its dequantization is Core ML's).
CONSTEXPR_OPS = ("const", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_affine_dequantize",
                 "constexpr_cast", "constexpr_sparse_to_dense")
STATE_OPS = ("read_state", "coreml_update_state")


def covered_ops() -> list[str]:
    """Every MIL op type the executor runs."""
    return sorted([*OPS, *CONSTEXPR_OPS, *STATE_OPS])


# --- functions ----------------------------------------------------------------------------------------------------


class MilFunction:
    """One function of a loaded program, runnable: the interface of coremltools' MLModel that the coreml executors
    use (predict with a state, make_state)."""

    def __init__(self, program, name: str, package: Path, precision: str = "fp16", shared: dict | None = None):
        """shared: constants by constant_key, filled and reused across the functions of one package."""
        if precision not in PRECISIONS:
            raise InputError(f"MIL precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if name not in program.functions:
            raise InputError(f"{package}: has no function {name} (it has {', '.join(program.functions)})")
        self.name, self.package, self.precision = name, package, precision
        shared = {} if shared is None else shared
        function = program.functions[name]
        from coremltools.converters.mil.mil import types

        self.inputs, self.input_shapes, self.states = {}, {}, {}
        for input_name, var in function.inputs.items():
            if types.is_state(var.sym_type):
                self.states[input_name] = (tuple(var.sym_type.wrapped_type().get_shape()),
                                           types.builtin_to_string(var.sym_type.wrapped_type().get_primitive()))
            else:
                self.inputs[input_name], self.input_shapes[input_name] = dtype_name(var), tuple(var.shape)
        self.outputs = [var.name for var in function.outputs]
        self.op_types = {op.op_type for op in function.operations}
        # Only the constants a running op reads: a compressed weight's parts (int4 data as int64 here) are read once,
        # by the constexpr op that dequantizes them, at load.
        read = {var.name for op in function.operations if op.op_type not in CONSTEXPR_OPS
                for v in op.inputs.values() for var in (v if isinstance(v, (list, tuple)) else (v,))}
        read.update(self.outputs)
        self.constants, self.steps = {}, []
        for op in function.operations:
            if op.op_type in CONSTEXPR_OPS:
                if op.outputs[0].name not in read:
                    continue
                key = constant_key(op)
                if key not in shared:
                    value = op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()
                    # a string parameter (pad_type, mode, a cast's dtype) stays a string
                    shared[key] = value if isinstance(value, str) else constant_tensor(value, dtype_name(op.outputs[0]))
                self.constants[op.outputs[0].name] = shared[key]
                continue
            if op.op_type not in OPS and op.op_type not in STATE_OPS:
                raise MilOpError(f"{package}: function {name}: MIL op {op.op_type!r} ({op.name}) is not implemented "
                                 f"by the coreml-mil executor")
            args = {k: (tuple(v.name for v in var) if isinstance(var, (list, tuple)) else var.name)
                    for k, var in op.inputs.items()}
            outs = [(var.name, dtype_name(var)) for var in op.outputs]
            self.steps.append((op.op_type, op.name, args, outs, []))
        # Each value is dropped after its last use (a whole encoder's activations would not fit otherwise).
        last_use = {}
        for i, (_, _, args, _, _) in enumerate(self.steps):
            for v in args.values():
                for n in (v if isinstance(v, tuple) else (v,)):
                    last_use[n] = i
        for n in self.outputs:
            last_use.pop(n, None)
        for n, i in last_use.items():
            if n not in self.constants and n not in self.inputs and n not in self.states:
                self.steps[i][4].append(n)

    def make_state(self) -> dict[str, torch.Tensor]:
        """Zero-filled states (what Core ML's make_state gives), one tensor per state of the function."""
        return {name: torch.zeros(shape, dtype=torch_dtype(dtype)) for name, (shape, dtype) in self.states.items()}

    def round_to(self, value, dtype: str):
        if isinstance(value, torch.Tensor):
            if dtype == "fp16" and self.precision == "fp16":
                return value.to(torch.float16).to(torch.float32)
            return value.to(torch_dtype(dtype))
        return value

    def predict(self, inputs: dict[str, np.ndarray], state: dict[str, torch.Tensor] | None = None
                ) -> dict[str, np.ndarray]:
        """Outputs by name as numpy arrays. `state` (from make_state of any function of the package) is read and
        updated in place, as Core ML's is."""
        missing = [k for k in self.inputs if k not in inputs]
        if missing:
            raise InputError(f"{self.package}: function {self.name}: missing input {', '.join(missing)}")
        if self.states and state is None:
            raise InputError(f"{self.package}: function {self.name} has states: pass state=make_state()")
        env = dict(self.constants)
        for name, dtype in self.inputs.items():
            env[name] = self.round_to(torch.as_tensor(np.asarray(inputs[name])), dtype)
        for op_type, op_name, args, outs, dead in self.steps:
            if op_type == "read_state":
                result = state[args["input"]]
            elif op_type == "coreml_update_state":
                state[args["state"]] = result = self.round_to(widened(env[args["value"]]),
                                                              self.states[args["state"]][1])
            else:
                a = {k: (tuple(widened(env[n]) for n in v) if isinstance(v, tuple) else widened(env[v]))
                     for k, v in args.items()}
                try:
                    result = OPS[op_type](a)
                except MilOpError as e:
                    raise MilOpError(f"{self.package}: function {self.name}: op {op_name}: {e}") from None
            results = result if isinstance(result, tuple) else (result,)
            for (out_name, dtype), value in zip(outs, results):
                env[out_name] = self.round_to(value, dtype)
            for name in dead:
                del env[name]
        return {name: widened(env[name]).numpy() for name in self.outputs}


class MilPackage:
    """A saved .mlpackage's functions, run by MilFunction: every function built at load, over one set of constants;
    the program itself is not kept."""

    def __init__(self, package: str | Path, precision: str = "fp16"):
        self.package, self.precision = Path(package), precision
        program, shared = load_program(self.package), {}
        self.functions = {name: MilFunction(program, name, self.package, precision, shared)
                          for name in program.functions}
        del program
        release_freed_memory()

    def function(self, name: str) -> MilFunction:
        if name not in self.functions:
            raise InputError(f"{self.package}: has no function {name} (it has {', '.join(self.functions)})")
        return self.functions[name]
