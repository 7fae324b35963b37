"""The output folder is a dataset: OUTPUT/data reads, with no glob, as exactly the result rows
in polars, pyarrow.dataset and DuckDB; metadata starts with "_"; outputs written before this
layout are still inspected, reported and resumed."""

import json

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ossbatch.flows.cli import main
from flow_helpers import ossbatch, write_jsonl

ROWS = [{"id": f"r{i}", "prompt": f"say {i}", "score": i, "tag": None if i % 3 else f"t{i}"} for i in range(7)]


def _run(model, inputs, out, *extra):
    assert main(["run", "--model", str(model), "--input", str(inputs), "--output", str(out), "--orchestrator", "none",
                 "--quiet", "--max-tokens", "3", "--temperature", "0", "--shard-rows", "3", *extra]) == 0


def test_the_data_folder_reads_as_exactly_the_result_rows_in_every_reader(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    _run(tiny_model_dir, write_jsonl(tmp_path / "in.jsonl", ROWS), out)
    assert main(["report", str(out)]) == 0  # a report beside the results must not disturb the readers either
    assert sorted(p.name for p in out.iterdir()) == ["_job.json", "_manifest.json", "_report.html", "_shards", "data"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["shards"]) == 3
    expected = sorted(r["id"] for r in ROWS)
    parts = [pq.read_table(out / part) for part in manifest["output"]["parts"]]
    columns = parts[0].column_names

    with_polars = pl.read_parquet(out / "data")
    with_pyarrow = ds.dataset(out / "data").to_table()
    with_duckdb = duckdb.sql(f"select * from read_parquet('{out / 'data'}')").arrow().read_all()
    for name, table in (("polars", with_polars.to_arrow()), ("pyarrow.dataset", with_pyarrow), ("duckdb", with_duckdb)):
        assert sorted(table.column("id").to_pylist()) == expected, name
        assert table.column_names == columns, name
        assert table.num_rows == manifest["rows"]["total"] == sum(p.num_rows for p in parts), name
    # One schema across parts (every part has every column, null where a shard had no value).
    assert len({p.schema.remove_metadata() for p in parts}) == 1
    # pyarrow.dataset also reads the output folder itself: it skips the "_" metadata.
    assert sorted(ds.dataset(out).to_table().column("id").to_pylist()) == expected


def _to_the_old_layout(out):
    """What ossbatch wrote before data/: parts and manifest.json beside _job.json."""
    for part in (out / "data").iterdir():
        part.rename(out / part.name)
    (out / "data").rmdir()
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["output"]["parts"] = [p.removeprefix("data/") for p in manifest["output"]["parts"]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "_manifest.json").unlink()
    for marker in (out / "_shards").iterdir():
        data = json.loads(marker.read_text())
        marker.write_text(json.dumps(data | {"part": data["part"].removeprefix("data/")}))
    return manifest


def test_outputs_in_the_old_layout_are_still_inspected_reported_and_resumed(tiny_model_dir, tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "old"
    _run(tiny_model_dir, inputs, out)
    manifest = _to_the_old_layout(out)

    shown = ossbatch("inspect", out)
    assert shown.returncode == 0 and "7 total" in shown.stdout, shown.stderr
    assert json.loads(ossbatch("inspect", out, "--json").stdout) == manifest
    assert main(["report", str(out)]) == 0 and (out / "_report.html").exists()
    # The same job again: finished, so nothing is redone and its manifest is kept.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    _run(tiny_model_dir, inputs, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before
    assert json.loads((out / "manifest.json").read_text()) == manifest

    # An unfinished old output: inspect shows its progress from the markers' part names.
    (out / "manifest.json").unlink()
    (out / "_shards" / "shard-00002.json").unlink()
    shown = ossbatch("inspect", out)
    assert shown.returncode == 0 and "in progress, 2 of 3 shards (6 of 7 rows) committed" in shown.stdout
