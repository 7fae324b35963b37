"""What a job cost: its tokens at per-million prices and its GPU hours at an hourly price.

GPU hours are the larger of the job's wall time and its summed shard time (the time each shard
held a worker): one worker also pays for start-up, several workers in parallel each hold a GPU.
The cost goes into the manifest (``cost``) when any price is given; `ossbatch inspect` and the
report show it, with the cost per 1,000 rows.
"""

from __future__ import annotations

from ossbatch.pipeline.config import CostOptions
from ossbatch.pipeline.job import manifest_path, output_layout
from ossbatch.pipeline.storage import Storage, write_json_atomic


def job_cost(manifest: dict, prices: CostOptions) -> dict:
    price_in, price_out = prices.price_per_million_tokens
    tokens = manifest["tokens"]
    token_in = tokens.get("prompt", 0) * price_in / 1e6
    token_out = tokens.get("completion", 0) * price_out / 1e6
    gpu_hours = max(manifest.get("wall_seconds", 0.0), manifest.get("shard_seconds", 0.0)) / 3600
    gpu = gpu_hours * prices.gpu_hour_price
    total = token_in + token_out + gpu
    rows = manifest["rows"]["total"]
    return {
        "input": token_in, "output": token_out, "gpu": gpu, "total": total,
        "per_1000_rows": total / rows * 1000 if rows else 0.0,
        "price_per_million_tokens": [price_in, price_out], "gpu_hour_price": prices.gpu_hour_price,
        "gpu_hours": gpu_hours,
    }


def record_cost(manifest: dict, prices: CostOptions, storage: Storage) -> dict:
    """The manifest with its ``cost`` at ``prices``, rewritten in place when any price is given
    (a finished job run again with new prices gets the new cost); unchanged otherwise."""
    if not prices.priced:
        return manifest
    priced = {**manifest, "cost": job_cost(manifest, prices)}
    fs, work = storage.filesystem(output_layout(manifest["output"]["uri"])[1])
    write_json_atomic(fs, manifest_path(fs, work), priced)
    return priced


def format_cost(cost: dict | None) -> str:
    if not cost:
        return "not priced (give --price-per-million-tokens IN OUT and/or --gpu-hour-price P)"
    price_in, price_out = cost["price_per_million_tokens"]
    return (f"${cost['total']:,.4f} (${cost['per_1000_rows']:,.4f} per 1,000 rows): tokens ${cost['input']:,.4f} in + "
            f"${cost['output']:,.4f} out at ${price_in:g}/${price_out:g} per million, GPU ${cost['gpu']:,.4f} for "
            f"{cost['gpu_hours']:,.3f} h at ${cost['gpu_hour_price']:g}/h")

