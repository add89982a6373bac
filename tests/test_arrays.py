"""numpy <-> Arrow through buffers (stages.artifacts.arrays): the values pyarrow's own conversion gives, and no
pandas import on the way (pyarrow 26 imports it for ``to_numpy`` / ``pa.array`` when it is installed)."""

import subprocess
import sys

import numpy as np
import pyarrow as pa

from stages.artifacts.arrays import to_arrow, to_numpy
from stages.artifacts.parquet import write_parquet
from tests.factories import make_logits, random_shards


def test_numeric_and_boolean_columns_convert_like_pyarrow_with_offsets_and_chunks():
    ints = pa.array(np.arange(20, dtype=np.int16))
    chunked = pa.chunked_array([ints.slice(3, 5), ints.slice(11, 7)])
    assert to_numpy(chunked).tolist() == list(range(3, 8)) + list(range(11, 18))
    assert to_numpy(chunked).dtype == np.int16
    flags = pa.array([True, False, True, True, False, False, True, False, True, True])
    assert to_numpy(flags.slice(3, 6)).tolist() == [True, False, False, True, False, True]
    assert to_numpy(pa.array([1.5, None])).tolist()[0] == 1.5  # nulls: pyarrow's conversion (NaN)
    assert to_numpy(pa.chunked_array([], pa.float32())).dtype == np.float32


def test_to_arrow_shares_memory_casts_and_falls_back_for_other_kinds():
    values = np.arange(6, dtype=np.int64)[::2]  # not contiguous: copied once
    assert to_arrow(values).to_pylist() == [0, 2, 4]
    assert to_arrow(values, pa.int32()).type == pa.int32()
    contiguous = np.arange(4, dtype=np.float32)
    assert np.shares_memory(to_numpy(to_arrow(contiguous)), contiguous)
    assert to_arrow(np.array([True, False])).to_pylist() == [True, False]


def test_a_select_never_imports_pandas(tmp_path):
    """`kdpipe select` (with its report) in a fresh interpreter: pandas stays out (0.3 s and 49 MiB saved)."""
    rng = np.random.default_rng(3)
    manifest = make_logits(tmp_path / "l", random_shards(rng, 3, 50, 5, prefix="p"), topk=3)
    code = ("import sys; from pipeline.cli import main; "
            f"assert main(['select', '--logits', {str(manifest)!r}, '--out', {str(tmp_path / 's')!r}, "
            "'--per-class', '7', '--top-p', '2', '--soft-targets']) == 0; "
            "print('pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr[-2000:]


def test_parquet_bytes_do_not_depend_on_the_chunks_of_the_table(tmp_path):
    """400k distinct floats: where the column falls back from dictionary to plain pages depended on the chunks
    pyarrow was handed (a 2M-row selection read back in 16 chunks, or built in one, gave different bytes)."""
    scores = np.random.default_rng(5).random(400_000).astype(np.float32)
    table = pa.table({"label": to_arrow(np.arange(400_000, dtype=np.int32) // 400), "score": to_arrow(scores)})
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=1 << 17))
    write_parquet(table, tmp_path / "one.parquet")
    write_parquet(chunked, tmp_path / "many.parquet")
    assert chunked.column("score").num_chunks == 4
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "many.parquet").read_bytes()
