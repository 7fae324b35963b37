"""Compile every Triton kernel, at every launch configuration the engine would use,
for real GPUs (no GPU needed: triton's wheel ships ptxas and cuobjdump).

    python benchmarks/gpu_compile.py --arch sm_90,sm_100 --out DIR [--models 120b,20b] [--check]

The kernels' own launchers run on meta tensors at gpt-oss shapes with their
launches captured (`kernels.triton_compat.capture_launches`), so the arguments,
constexprs, warps and stages compiled are the ones kernels/configs.py's table
makes them launch.  Each distinct compilation writes
``DIR/<kernel>.<shape>.<config>.sm_XX.cubin``; ``DIR/table.json`` and the printed
table give per launch: registers, spill (stack) bytes, shared memory, CTAs per SM
and occupancy (64K registers, 228 KB shared, 64 warps per SM), the tensor-core
instruction class and shape in the SASS, the share of each MMA's token side that
carries real rows, and the roofline time of that kernel at that shape
(benchmarks/kernel_roofline.py).

``--check`` exits 1 naming every launch that spills, does not fit on an SM, or
(MoE and attention) issues no tensor-core instruction.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, whatever the caller's environment says

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)  # benchmarks/ must not shadow anything

import importlib.util  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ossbatch.engine.config import GPT_OSS_20B, GPT_OSS_120B, ModelConfig  # noqa: E402
from ossbatch.kernels import configs  # noqa: E402
from ossbatch.kernels.attention import attention_triton  # noqa: E402
from ossbatch.kernels.moe import moe_triton  # noqa: E402
from ossbatch.kernels.rmsnorm import rmsnorm_triton  # noqa: E402
from ossbatch.kernels.routing import RoutingPlan, route_triton  # noqa: E402
from ossbatch.kernels.triton_compat import capture_launches  # noqa: E402

_spec = importlib.util.spec_from_file_location("kernel_roofline", ROOT / "benchmarks" / "kernel_roofline.py")
kernel_roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_roofline)

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MODELS = {"120b": GPT_OSS_120B, "20b": GPT_OSS_20B}
CONTEXTS = {"4k": 4096, "32k": 32768}

# The SM, Hopper and Blackwell datacenter parts alike.
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
CTA_RESERVED_SHARED = 1024  # the driver reserves 1 KB per CTA
CTA_MAX_SHARED = 227 * 1024
SM_MAX_WARPS = 64
SM_MAX_CTAS = 32
REGISTER_ALLOCATION_UNIT = 256  # registers per warp are allocated in 256-register chunks


@dataclass
class Launch:
    """One kernel launch at one shape, as the engine would issue it."""

    kernel: str  # a readable name (both MoE launches share one Triton kernel)
    shape: str  # "120b.decode1", "120b.decode8.ctx32k.window", ...
    config: str  # the table's configuration name
    tokens_on_mma_side: float  # mean real rows on the MMA's token side (MoE: rows per expert hit; attention: q rows)
    roofline_s: float
    fn: object = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _capture(call) -> list:
    with capture_launches() as launches:
        call()
    return launches


def _rows_per_expert_hit(model: ModelConfig, tokens: int) -> float:
    return tokens * model.num_experts_per_tok / kernel_roofline.experts_hit(model, tokens)


def _roofline(model: ModelConfig, name: str, tokens: int, context: int = 0) -> float:
    for row in kernel_roofline.kernel_rows(model, tokens, context or 4096):
        if row.kernel.startswith(name):
            return row.roofline_s
    raise KeyError(name)


def moe_launches(model: ModelConfig, shape: str, tokens: int) -> list[Launch]:
    h, e, k, i = model.hidden_size, model.num_local_experts, model.num_experts_per_tok, model.intermediate_size
    out = []
    if True:
        config = configs.moe_config(tokens, k, e)
        blocks = max(1, -(-tokens * k // config.block_m))
        plan = RoutingPlan(
            slot_order=meta(tokens * k, dtype=torch.int64), expert_counts=meta(e, dtype=torch.int64),
            expert_offsets=meta(e + 1, dtype=torch.int64), block_expert=meta(blocks, dtype=torch.int32),
            block_start=meta(blocks, dtype=torch.int32), top_k=k, block_m=config.block_m,
        )
        groups_h, groups_i = -(-h // 32), -(-i // 32)
        moe_launches = _capture(lambda: moe_triton(
            meta(tokens, h), meta(tokens, k, dtype=torch.float32), plan,
            meta(e, 2 * i, groups_h, 16, dtype=torch.uint8), meta(e, 2 * i, groups_h, dtype=torch.uint8), meta(e, 2 * i),
            meta(e, h, groups_i, 16, dtype=torch.uint8), meta(e, h, groups_i, dtype=torch.uint8), meta(e, h), 7.0))
        rows = _rows_per_expert_hit(model, tokens)
        for name, (fn, grid, args, kwargs) in zip(("moe_up_swiglu", "moe_down_scatter"), moe_launches):
            out.append(Launch(name, shape, config.name, rows, _roofline(model, "moe", tokens), fn, args, kwargs))
    return out


def launches_for(model_name: str, model: ModelConfig) -> list[Launch]:
    h, e, k = model.hidden_size, model.num_local_experts, model.num_experts_per_tok
    hq, hkv, d = model.num_attention_heads, model.num_key_value_heads, model.head_dim
    out: list[Launch] = []
    steps = [(f"decode{b}", b) for b in configs.DECODE_BATCHES] + [("prefill", configs.PREFILL_TOKENS)]
    for step, tokens in steps:
        shape = f"{model_name}.{step}"
        (fn, grid, args, kwargs), = _capture(lambda: rmsnorm_triton(meta(tokens, h), meta(h)))
        out.append(Launch("rmsnorm", shape, configs.RMSNORM.name, 0, _roofline(model, "rmsnorm", tokens), fn, args, kwargs))
        (fn, grid, args, kwargs), = _capture(lambda: route_triton(meta(tokens, e), k))
        out.append(Launch("route", shape, configs.ROUTE.name, 0, _roofline(model, "route", tokens), fn, args, kwargs))
        out += moe_launches(model, shape, tokens)
        for context_name, context in CONTEXTS.items():
            for window in (0, model.sliding_window):
                if step == "prefill":  # 8,192 new tokens: whole prompts of the context's length, or its last chunk
                    batch, q_len = max(1, tokens // context), min(tokens, context)
                else:
                    batch, q_len = tokens, 1
                span = min(context, window + q_len) if window else context
                config = configs.attention_config(batch, q_len, hq // hkv, hkv, span)
                attn = _capture(lambda: attention_triton(
                    meta(batch, q_len, hq, d), meta(batch, context, hkv, d), meta(batch, context, hkv, d),
                    meta(hq, dtype=torch.float32), meta(batch, q_len, dtype=torch.int64), meta(batch, dtype=torch.int64),
                    window, model.sm_scale))
                (fn, grid, args, kwargs), = attn
                label = f"{shape}.ctx{context_name}.{'window' if window else 'full'}"
                out.append(Launch("attention", label, config.name, q_len * hq // hkv,
                                  kernel_roofline.attention_roofline(model, batch, q_len, context, window).roofline_s, fn, args, kwargs))
    return out


# ----------------------------------------------------------------------------- compiling


def compile_launch(launch: Launch, arch: int):
    """triton.compile of the captured launch, specialized as the JIT would (alignment, ints == 1)."""
    fn = launch.fn
    names = [p.name for p in fn.params]
    bound = dict(zip(names, launch.args))
    bound.update({key: value for key, value in launch.kwargs.items() if key in names})
    options = {key: value for key, value in launch.kwargs.items() if key not in names and key != "options_by_arch"}
    options.update(launch.kwargs.get("options_by_arch", {}).get(arch // 10, {}))  # what the launcher adds on this GPU
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = attr
        elif isinstance(attr, str):
            attrs[(index,)] = CUDABackend.parse_attr(attr)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str, *args: str) -> str:
    return subprocess.run([str(BIN / name), *args], check=True, capture_output=True, text=True).stdout


def resources(cubin: Path) -> dict:
    text = _tool("cuobjdump", "--dump-resource-usage", str(cubin))
    found = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return {"registers": found.get("REG", 0), "stack": found.get("STACK", 0), "local": found.get("LOCAL", 0),
            "static_shared": found.get("SHARED", 0)}


MMA_PATTERN = re.compile(r"\b((?:U?TC\w*MMA|HGMMA|HMMA|IMMA|QGMMA|UTC\w+)\S*)")


def mma_instructions(cubin: Path) -> tuple[str, dict]:
    """(class, {full opcode: count}) of the tensor-core instructions in the SASS."""
    sass = _tool("cuobjdump", "-sass", str(cubin))
    counts: dict = {}
    for opcode in MMA_PATTERN.findall(sass):
        if "MMA" in opcode:
            counts[opcode] = counts.get(opcode, 0) + 1
    spills = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    classes = {op.split(".")[0] for op in counts}
    for family in ("HGMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCMMA", "HMMA"):
        if family in classes:
            return family, counts, spills
    return (sorted(classes)[0] if classes else "none"), counts, spills


def mma_token_side(kernel: str, family: str, counts: dict, config_name: str) -> int:
    """Rows the MMA instruction gives the token side: the N of a wgmma/tcgen05 shape (MxNxK) when
    swapped, else its M (64 per warpgroup for wgmma, 16 for mma.sync's m16n8k16)."""
    shape = next((re.search(r"\.(\d+)x(\d+)x(\d+)", op) for op in counts if re.search(r"\.(\d+)x(\d+)x(\d+)", op)), None)
    swapped = "swap" in config_name
    if family == "HMMA":
        return 8 if swapped else 16
    if shape:
        m, n = int(shape.group(1)), int(shape.group(2))
        return n if swapped else m
    return 0


def occupancy(registers: int, shared: int, warps: int) -> tuple[int, float]:
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = SM_REGISTERS // max(per_warp * warps, 1)
    by_shared = SM_SHARED_BYTES // (shared + CTA_RESERVED_SHARED) if shared <= CTA_MAX_SHARED else 0
    ctas = min(by_registers, by_shared, SM_MAX_WARPS // warps, SM_MAX_CTAS)
    return ctas, ctas * warps / SM_MAX_WARPS


def compile_all(launches: list[Launch], archs: list[int], out: Path, log=print) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    compiled: dict = {}
    rows = []
    for launch in launches:
        for arch in archs:
            key = (launch.kernel, launch.config, arch, repr(sorted((k, str(v)) for k, v in launch.kwargs.items())),
                   tuple(str(getattr(a, "dtype", type(a).__name__)) for a in launch.args),
                   tuple(native_specialize_impl(CUDABackend, a, False, True, True)[1] for a in launch.args if not isinstance(a, float)))
            cubin = out / f"{launch.kernel}.{launch.shape}.{launch.config}.sm_{arch}.cubin"
            started = time.perf_counter()
            reused = key in compiled
            if not reused:
                try:
                    kernel = compile_launch(launch, arch)
                except Exception as error:  # a configuration that does not compile is a finding, not a crash
                    compiled[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
                else:
                    cubin.write_bytes(kernel.asm["cubin"])
                    info = resources(cubin)
                    family, counts, spill_instructions = mma_instructions(cubin)
                    warps = launch.kwargs.get("num_warps", 4)
                    shared = kernel.metadata.shared + info["static_shared"]
                    ctas, occ = occupancy(info["registers"], shared, warps)
                    compiled[key] = dict(
                        info, shared=shared, spill_bytes=max(info["stack"], info["local"]), spill_instructions=spill_instructions,
                        warps=warps, stages=launch.kwargs.get("num_stages", 3), ctas_per_sm=ctas, occupancy=occ,
                        mma=family, mma_counts=counts, cubin=cubin.name, compile_s=time.perf_counter() - started,
                    )
            result = dict(compiled[key])
            if "cubin" in result and result["cubin"] != cubin.name:
                cubin.write_bytes((out / result["cubin"]).read_bytes())  # the same binary, under this shape's name
            result["cubin"] = cubin.name if "error" not in result else None
            side = mma_token_side(launch.kernel, result.get("mma", "none"), result.get("mma_counts", {}), launch.config)
            useful = min(1.0, launch.tokens_on_mma_side / side) if side and launch.tokens_on_mma_side else None
            rows.append(dict(kernel=launch.kernel, shape=launch.shape, config=launch.config, arch=f"sm_{arch}", reused=reused,
                             mma_token_rows=side, mma_useful_share=useful, roofline_s=launch.roofline_s, **result))
            if log:
                log(f"  {launch.kernel} {launch.shape} {launch.config} sm_{arch}: "
                    + (result["error"] if "error" in result else f"{result['registers']} regs, {result['mma']}"), file=sys.stderr)
    return rows


def violations(rows: list[dict]) -> list[str]:
    found = []
    for row in rows:
        where = f"{row['kernel']} {row['shape']} {row['config']} {row['arch']}"
        if "error" in row:
            found.append(f"{where}: does not compile ({row['error']})")
            continue
        if row["spill_bytes"]:
            found.append(f"{where}: spills {row['spill_bytes']} bytes ({row['registers']} registers)")
        if not row["ctas_per_sm"]:
            found.append(f"{where}: does not fit on an SM ({row['shared']} bytes shared, {row['registers']} registers)")
        if row["kernel"].startswith(("moe", "attention")) and row["mma"] == "none":
            found.append(f"{where}: no tensor-core instruction")
    return found


def format_table(rows: list[dict]) -> str:
    header = ["kernel", "shape", "config", "arch", "regs", "spill B", "shared KB", "CTAs/SM", "occupancy",
              "MMA (SASS)", "MMA useful", "roofline"]
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([row["kernel"], row["shape"], row["config"], row["arch"], "error: " + row["error"][:60]] + [""] * 7)
            continue
        shapes = sorted({re.sub(r"^\w+\.", "", op) for op in row["mma_counts"]})
        mma = row["mma"] + (f" {shapes[0]}" if row["mma"] != "none" and shapes else "")
        useful = f"{100 * row['mma_useful_share']:.0f}%" if row["mma_useful_share"] is not None else "-"
        lines.append([row["kernel"], row["shape"], row["config"], row["arch"], row["registers"], row["spill_bytes"],
                      f"{row['shared'] / 1024:.1f}", row["ctas_per_sm"], f"{100 * row['occupancy']:.0f}%", mma, useful,
                      kernel_roofline._fmt_s(row["roofline_s"])])
    cells = [[str(c) for c in line] for line in [header, *lines]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90,sm_100", help="comma-separated: sm_90 (H100/H200), sm_100 (B200)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the cubins and table.json")
    parser.add_argument("--models", default="120b,20b", help="comma-separated of " + ",".join(MODELS))
    parser.add_argument("--kernels", default="", help="only launches whose kernel name starts with one of these (comma-separated)")
    parser.add_argument("--shapes", default="", help="only shapes containing one of these (comma-separated)")
    parser.add_argument("--moe-config", default="", help="override the table's MoE configuration, e.g. m128n128k64w4s4 (to test a bad one)")
    parser.add_argument("--check", action="store_true", help="exit 1 on any spill, misfit or missing tensor-core MMA")
    args = parser.parse_args(argv)
    archs = []
    for arch in args.arch.split(","):
        if not re.fullmatch(r"sm_\d+", arch.strip()):
            parser.error(f"--arch takes sm_XX names, got {arch!r}")
        archs.append(int(arch.strip()[3:]))
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))} (known: {', '.join(MODELS)})")
    if args.moe_config:
        match = re.fullmatch(r"m(\d+)n(\d+)k(\d+)w(\d+)s(\d+)(swap)?", args.moe_config)
        if not match:
            parser.error(f"--moe-config must look like m64n64k64w8s3[swap], got {args.moe_config!r}")
        override = configs.MoeConfig(*map(int, match.groups()[:5]), swap_ab=bool(match.group(6)))
        for bucket_name in configs.MOE_BY_ROWS_PER_EXPERT:
            configs.MOE_BY_ROWS_PER_EXPERT[bucket_name] = override
    launches = [launch for name in args.models.split(",") for launch in launches_for(name, MODELS[name])]
    # A table entry no bucket of these models reaches is still compiled, at the tokens that hit its bound.
    first = args.models.split(",")[0]
    model = MODELS[first]
    for bucket_name, config in configs.MOE_BY_ROWS_PER_EXPERT.items():
        if config.name not in {launch.config for launch in launches} and bucket_name.startswith("rows<="):
            tokens = int(bucket_name[len("rows<="):]) * model.num_local_experts // model.num_experts_per_tok
            launches += moe_launches(model, f"{first}.tokens{tokens}", tokens)
    if args.kernels:
        launches = [launch for launch in launches if launch.kernel.startswith(tuple(args.kernels.split(",")))]
    if args.shapes:
        launches = [launch for launch in launches if any(s in launch.shape for s in args.shapes.split(","))]
    started = time.perf_counter()
    rows = compile_all(launches, archs, args.out)
    elapsed = time.perf_counter() - started
    (args.out / "table.json").write_text(json.dumps({"triton": triton.__version__, "compile_s": elapsed, "rows": rows}, indent=1))
    print(f"triton {triton.__version__}; {len(rows)} launches, {sum(not r['reused'] for r in rows)} distinct compilations, "
          f"compiled in {elapsed:.0f} s; SM: 64K registers, 228 KB shared, 64 warps")
    print(format_table(rows))
    found = violations(rows)
    if found:
        print("\n" + "\n".join(found), file=sys.stderr if args.check else sys.stdout)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
